"""The ONNX route: export (traced or onnxruntime-genai's builder), int4 quantization, assets and its parity check."""
