"""Serving a checkpoint outside torch: ONNX export of every stage and the text tower (`onnx_export`), and a runner
that answers zero-shot questions from the exported files with onnxruntime and numpy only (`onnx_runner`)."""
