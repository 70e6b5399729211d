"""The GGUF route: writer, llama.cpp's quantizer, the importance matrix and its calibration text, the tokenizer check, and `--quant auto`."""
