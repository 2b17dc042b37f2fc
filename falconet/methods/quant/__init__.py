"""Weight quantization: one module per method, each registered by name (methods/registry.py)."""
