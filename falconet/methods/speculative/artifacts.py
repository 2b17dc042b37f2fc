"""Trained drafting artifacts on disk (a distilled draft, an EAGLE head): a folder holding
config.json (the target's ModelConfig, or the draft's), model.safetensors and a marker file naming
what made it. Made by a `falconet` training command for one target; found by default under
$FALCONET_HOME."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from falconet.config import ModelConfig
from falconet.errors import FalconetError
from falconet.methods.speculative.base import ProposerError


def save_artifact(path: Path, tensors: dict, config: ModelConfig, marker: str, info: dict) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().contiguous() for n, t in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    (path / marker).write_text(json.dumps({"format": 1, **info}, indent=1))


def read_artifact(path, what: str, target: ModelConfig) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of a saved artifact made for a model like `target` (same vocabulary and
    width); a clear error otherwise. `what` names it in messages ("draft", "EAGLE head")."""
    path = Path(path)
    try:
        config = ModelConfig(**json.loads((path / "config.json").read_text()))
        tensors = load_file(str(path / "model.safetensors"))
    except (OSError, ValueError, TypeError) as e:
        raise FalconetError(f"{path}: not a readable falconet {what} ({e})") from None
    if (config.vocab_size, config.hidden_size) != (target.vocab_size, target.hidden_size):
        raise FalconetError(f"{path}: this {what} was made for another model (vocabulary or width differs)")
    return config, tensors


def find_artifact(given, default: Path, marker: str, missing: str):
    """`given` if set, else `default` when it holds an artifact (has `marker`); raises
    ProposerError(`missing`) when neither."""
    if given is not None:
        return given
    if (Path(default) / marker).is_file():
        return default
    raise ProposerError(missing)
