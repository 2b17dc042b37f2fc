"""Loading Hugging Face folders: sharded weights, and clear errors for broken ones."""

from __future__ import annotations

import json

import pytest
import torch

from falconet.errors import FalconetError
from falconet.models.loader import load_model, parse_dtype


def test_sharded_checkpoint_loads_like_single(tiny_llama_hf, tmp_path):
    tiny_llama_hf.save_pretrained(tmp_path / "one")
    tiny_llama_hf.save_pretrained(tmp_path / "shards", max_shard_size="40KB")
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) > 1
    one = load_model(tmp_path / "one", with_tokenizer=False).model.state_dict()
    shards = load_model(tmp_path / "shards", with_tokenizer=False).model.state_dict()
    assert one.keys() == shards.keys()
    assert all(torch.equal(one[k], shards[k]) for k in one)


def test_bfloat16_weights(tiny_llama_hf, tmp_path):
    tiny_llama_hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="bfloat16", with_tokenizer=False).model
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16


def test_missing_weight_is_named(tiny_llama_hf, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_llama_hf.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    weights = load_file(f)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, f)
    with pytest.raises(FalconetError, match="missing weights: layers.1.mlp.gate_up_proj.weight"):
        load_model(tmp_path, with_tokenizer=False)


def test_corrupt_safetensors(tiny_llama_hf, tmp_path):
    tiny_llama_hf.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(FalconetError, match="model.safetensors"):
        load_model(tmp_path, with_tokenizer=False)


def test_folder_without_config(tmp_path):
    with pytest.raises(FalconetError, match="config.json"):
        load_model(tmp_path, with_tokenizer=False)


def test_unsupported_architecture_named(tmp_path):
    config = {"model_type": "falcon", "architectures": ["FalconForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FalconetError, match="FalconForCausalLM"):
        load_model(tmp_path, with_tokenizer=False)


def test_bad_dtype():
    with pytest.raises(FalconetError, match="float16"):
        parse_dtype("float16")
