"""The continuous-batching engine: one llama.cpp context serving several sequences (scheduler, sequences, chunked prefill, streams)."""
