"""Pluggable methods (speculative decoding, decoding strategies), found by name in registries."""
