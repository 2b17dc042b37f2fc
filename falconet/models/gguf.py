"""GGUF files: open them safely, read their metadata, build a ModelConfig and a state dict.

Parsing and dequantization are the `gguf` package's; this module maps llama.cpp's names and
layouts onto the Hugging Face ones our model uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from falconet.errors import FalconetError


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """Open a GGUF file; a missing, truncated or corrupt file gives a FalconetError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FalconetError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors ... on bad input
        raise FalconetError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from None


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value fields as plain Python values (str, int, float, bool, lists of them)."""
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = f.contents()
        except Exception as e:
            raise FalconetError(f"{reader.path}: unreadable metadata field {key!r} ({e})") from None
    return meta
