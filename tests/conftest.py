"""Shared fixtures: the real default model (pulled once into the cache) and tiny random models."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_gguf():
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, pulled into the model cache if missing."""
    from falconet.models.catalog import DEFAULT_MODEL, pull

    return pull(DEFAULT_MODEL, progress=False)
