"""Model formats and untrusted bytes: the format sniffer, the bounded GGUF header reader, the conversion report's schema, the nesting check run before a parser."""
