"""``edgemed serve``: a local OpenAI-compatible server with continuous batching and a PHI-free audit log."""
