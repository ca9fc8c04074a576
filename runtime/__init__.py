"""Thin DeltaLM inference runtime: tokenizer, fairseq-exact search, ONNX Runtime / TensorRT backends.

Nothing under this package imports torch (tests/test_runtime_no_torch.py proves it)."""
