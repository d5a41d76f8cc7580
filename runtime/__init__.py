"""vlmdeploy runtime: runs exported VLM artifacts with ONNX Runtime; never imports torch."""
