"""vlmdeploy exporter: HF checkpoint -> ONNX graphs + manifest (needs torch)."""
