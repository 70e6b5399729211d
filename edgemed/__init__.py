"""edgemed: run distilled medical language models well on edge devices, offline."""

__version__ = "0.1.0"
