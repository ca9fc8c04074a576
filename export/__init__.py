"""Everything that needs PyTorch: checkpoint loaders, the model, ONNX export, engine build."""
