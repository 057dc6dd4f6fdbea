"""ONNX deployment: per-tower export wrappers with their input contracts (towers), the export and its parity
check (onnx_export), and zero-shot prediction with onnxruntime alone (onnx_predict, preprocess)."""
