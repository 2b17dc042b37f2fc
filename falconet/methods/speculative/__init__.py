"""Speculative decoding: the Proposer interface (base.py), exact speculative sampling
(verifier.py) and one module per draft source, each registered by name."""
