"""One small module per architecture; each defines ``SPEC`` (an ``ArchSpec``)."""
