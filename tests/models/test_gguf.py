"""GGUF loading: tiny GGUF files written here with gguf.GGUFWriter, and the real default model."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from falconet.errors import FalconetError
from falconet.models.gguf import (
    check_tensor_type,
    config_from_gguf,
    load_gguf,
    open_gguf,
    read_metadata,
    unpermute_qk,
)

Q = gguf.GGMLQuantizationType
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 64, 2, 4, 2, 16, 128, 128
# Cycled over the tensors of each layer, so Q and K meet every type across layers.
TYPES = (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0)

# --- writing tiny GGUF files -----------------------------------------------------------------------


def random_hf_weights(qkv_bias: bool = False, tied: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny Llama/Qwen2 state dict in Hugging Face names and layout, as float32 numpy arrays."""
    rng = np.random.default_rng(seed)

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    w = {"model.embed_tokens.weight": r(VOCAB, HIDDEN), "model.norm.weight": r(HIDDEN)}
    if not tied:
        w["lm_head.weight"] = r(VOCAB, HIDDEN)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = r(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = r(HIDDEN)
        for name, shape in {"q": (q, HIDDEN), "k": (kv, HIDDEN), "v": (kv, HIDDEN), "o": (HIDDEN, q)}.items():
            w[f"{p}self_attn.{name}_proj.weight"] = r(*shape)
            if qkv_bias and name != "o":
                w[f"{p}self_attn.{name}_proj.bias"] = r(shape[0])
        w[p + "mlp.gate_proj.weight"] = r(INTER, HIDDEN)
        w[p + "mlp.up_proj.weight"] = r(INTER, HIDDEN)
        w[p + "mlp.down_proj.weight"] = r(HIDDEN, INTER)
    return w


_TO_GGUF = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


def gguf_name(hf: str) -> str:
    base, kind = hf.rsplit(".", 1)
    if base in _TO_GGUF:
        return f"{_TO_GGUF[base]}.{kind}"
    _, _, i, module = base.split(".", 3)
    return f"blk.{i}.{_TO_GGUF[module]}.{kind}"


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: interleave each head's rotary halves (the forward of unpermute_qk)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_type(hf: str, index: int) -> gguf.GGMLQuantizationType:
    """Norms and biases stay F32 (as llama.cpp keeps them); matrices cycle through TYPES."""
    return TYPES[index % len(TYPES)] if hf.endswith(".weight") and "norm" not in hf else Q.F32


def roundtrip(w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """What a loader must give back for `w` stored as `qtype`."""
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).astype(np.float32)


def write_tiny_gguf(
    path: Path,
    weights: dict[str, np.ndarray],
    arch: str = "llama",
    extra_tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
    extra_meta: dict[str, int | float | str] | None = None,
) -> dict[str, gguf.GGMLQuantizationType]:
    """Write `weights` (Hugging Face names/layout) as a llama.cpp-style GGUF; returns each HF name's type.

    Q/K are permuted for 'llama' like convert_hf_to_gguf.py does. extra_tensors are written as
    given (raw bytes for quantized types); extra_meta values go in as int/float/string fields.
    """
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0 if arch == "llama" else 1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in (extra_meta or {}).items():
        add = {int: w.add_uint32, float: w.add_float32, str: w.add_string}[type(value)]
        add(key, value)
    types = {}
    for j, (name, arr) in enumerate(weights.items()):
        qtype = types[name] = tensor_type(name, j)
        if arch == "llama" and ".q_proj." in name:
            arr = permute_qk(arr, HEADS)
        elif arch == "llama" and ".k_proj." in name:
            arr = permute_qk(arr, KV_HEADS)
        data = gguf.quants.quantize(arr, qtype)
        w.add_tensor(gguf_name(name), data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    for name, (data, qtype) in (extra_tensors or {}).items():
        w.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


# --- tiny files ----------------------------------------------------------------------------------------


def check_weights(sd: dict[str, torch.Tensor], weights: dict[str, np.ndarray], types: dict) -> None:
    assert set(sd) == set(weights)
    seen = set()
    for name, w in weights.items():
        got = sd[name].numpy()
        assert got.shape == w.shape, name
        expected = roundtrip(w, types[name])
        assert np.array_equal(got, expected), f"{name} ({types[name].name}) differs"
        if types[name] == Q.F32:
            assert np.array_equal(got, w), name
        elif types[name] == Q.F16:
            assert np.array_equal(got, w.astype(np.float16).astype(np.float32)), name
        seen.add(types[name])
    assert seen == set(TYPES)


def test_tiny_llama_roundtrip(tmp_path: Path) -> None:
    weights = random_hf_weights()
    types = write_tiny_gguf(tmp_path / "tiny-llama.gguf", weights)
    config, sd, meta = load_gguf(tmp_path / "tiny-llama.gguf", torch.float32)

    assert meta["general.architecture"] == "llama"
    assert (config.model_type, config.num_layers, config.hidden_size, config.intermediate_size) == (
        "llama", LAYERS, HIDDEN, INTER)  # fmt: skip
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (
        HEADS, KV_HEADS, HEAD_DIM, VOCAB)  # fmt: skip
    assert config.rms_norm_eps == 1e-6 and config.rope_theta == 10000.0 and config.rope_scaling is None
    assert config.max_position_embeddings == 256
    assert (config.bos_token_id, config.eos_token_ids) == (1, [2])
    assert not config.tie_word_embeddings and not config.qkv_bias
    # Q/K went through the converter's permutation and must come back in Hugging Face order.
    check_weights(sd, weights, types)
    assert all(sd[n].dtype == torch.float32 for n in sd)


def test_tiny_qwen2_biases_tied_not_permuted(tmp_path: Path) -> None:
    weights = random_hf_weights(qkv_bias=True, tied=True, seed=1)
    types = write_tiny_gguf(tmp_path / "tiny-qwen2.gguf", weights, arch="qwen2")
    config, sd, _ = load_gguf(tmp_path / "tiny-qwen2.gguf", torch.float32)

    assert config.model_type == "qwen2" and config.qkv_bias and config.tie_word_embeddings
    assert config.rope_theta == 1e6 and "lm_head.weight" not in sd
    check_weights(sd, weights, types)


def test_dtype_conversion(tmp_path: Path) -> None:
    weights = random_hf_weights()
    types = write_tiny_gguf(tmp_path / "m.gguf", weights)
    _, sd, _ = load_gguf(tmp_path / "m.gguf", torch.bfloat16)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert sd[name].dtype == torch.bfloat16
    assert torch.equal(sd[name], torch.from_numpy(roundtrip(weights[name], types[name])).bfloat16())


def test_unpermute_inverts_permute() -> None:
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert np.array_equal(unpermute_qk(permute_qk(w, 8), 8), w)
    b = np.arange(4 * 16, dtype=np.float32)
    assert np.array_equal(unpermute_qk(permute_qk(b, 4), 4), b)
    # Head 0's rows after permutation alternate between its two halves: 0, 8, 1, 9, ...
    assert permute_qk(b, 4)[:4].tolist() == [0, 8, 1, 9]


def test_rope_scaling_linear(tmp_path: Path) -> None:
    path = tmp_path / "linear.gguf"
    meta = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    write_tiny_gguf(path, random_hf_weights(), extra_meta=meta)
    reader = open_gguf(path)
    config = config_from_gguf(read_metadata(reader), reader)
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_rope_freqs_become_freq_factors(tmp_path: Path) -> None:
    path = tmp_path / "llama3.gguf"
    factors = np.linspace(1.0, 8.0, HEAD_DIM // 2).astype(np.float32)
    write_tiny_gguf(path, random_hf_weights(), extra_tensors={"rope_freqs.weight": (factors, Q.F32)})
    config, sd, _ = load_gguf(path, torch.float32)
    assert config.rope_scaling == {"rope_type": "freq_factors", "factors": [float(str(f)) for f in factors]}
    assert not any("rope" in n for n in sd)


def test_eot_token_joins_eos(tmp_path: Path) -> None:
    path = tmp_path / "eot.gguf"
    write_tiny_gguf(path, random_hf_weights(), extra_meta={"tokenizer.ggml.eot_token_id": 7})
    reader = open_gguf(path)
    assert config_from_gguf(read_metadata(reader), reader).eos_token_ids == [2, 7]


def test_tiny_files_match_transformers(tmp_path: Path) -> None:
    """transformers' GGUF loader agrees on both layouts: Q/K unpermuted for llama, untouched for qwen2."""
    transformers = pytest.importorskip("transformers")
    for arch, kwargs in (("llama", {}), ("qwen2", {"qkv_bias": True, "tied": True})):
        path = tmp_path / f"{arch}.gguf"
        write_tiny_gguf(path, random_hf_weights(**kwargs), arch, extra_meta={"tokenizer.ggml.model": "gpt2"})
        _, sd, _ = load_gguf(path, torch.float32)
        auto = transformers.AutoModelForCausalLM
        hf_sd = auto.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).state_dict()
        assert set(sd) == set(hf_sd) - ({"lm_head.weight"} if arch == "qwen2" else set())
        for name, t in sd.items():
            assert torch.equal(t, hf_sd[name]), f"{arch}: {name}"


# --- errors: each names the file ----------------------------------------------------------------------


def expect_error(path: Path, *words: str) -> None:
    with pytest.raises(FalconetError) as e:
        load_gguf(path, torch.float32)
    msg = str(e.value)
    assert path.name in msg, msg
    for word in words:
        assert word in msg, msg


def test_missing_file(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.gguf", "no such")


@pytest.mark.parametrize("keep", [100, 0.5, 0.999])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "cut.gguf"
    write_tiny_gguf(path, random_hf_weights())
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    expect_error(path)


def test_garbage_and_empty_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    expect_error(garbage, "not a valid GGUF")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    expect_error(empty)


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    path = tmp_path / "q2k.gguf"
    block, size = gguf.GGML_QUANT_SIZES[Q.Q2_K]
    raw = np.zeros((HIDDEN, 256 // block * size), dtype=np.uint8)  # 64 rows of 256 Q2_K values
    write_tiny_gguf(path, random_hf_weights(), extra_tensors={"blk.0.odd.weight": (raw, Q.Q2_K)})
    expect_error(path, "blk.0.odd.weight", "Q2_K")
    with pytest.raises(FalconetError, match="IQ4_NL"):
        check_tensor_type("x.weight", Q.IQ4_NL, "some.gguf")
    for qtype in (Q.BF16, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        check_tensor_type("x.weight", qtype, "some.gguf")


@pytest.mark.parametrize("arch", ["gpt2", "falcon"])
def test_unsupported_architecture(tmp_path: Path, arch: str) -> None:
    path = tmp_path / f"{arch}.gguf"
    write_tiny_gguf(path, random_hf_weights(), arch=arch)
    expect_error(path, repr(arch))


def test_unexpected_tensor(tmp_path: Path) -> None:
    path = tmp_path / "extra.gguf"
    extra = {"blk.0.attn_q_norm.weight": (np.ones(HEAD_DIM, dtype=np.float32), Q.F32)}
    write_tiny_gguf(path, random_hf_weights(), extra_tensors=extra)
    expect_error(path, "blk.0.attn_q_norm.weight")


def test_missing_tensor_and_bad_shape(tmp_path: Path) -> None:
    weights = random_hf_weights()
    del weights["model.layers.1.mlp.up_proj.weight"]
    write_tiny_gguf(tmp_path / "missing.gguf", weights)
    expect_error(tmp_path / "missing.gguf", "model.layers.1.mlp.up_proj.weight")

    weights = random_hf_weights()
    weights["model.layers.0.mlp.down_proj.weight"] = weights["model.layers.0.mlp.down_proj.weight"][:32]
    write_tiny_gguf(tmp_path / "shape.gguf", weights)
    expect_error(tmp_path / "shape.gguf", "blk.0.ffn_down.weight", "shape")


# --- the real default model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_loaded(default_gguf: Path):
    return load_gguf(default_gguf, torch.float32)


@pytest.mark.slow
def test_default_gguf_config(default_loaded) -> None:
    config, _, meta = default_loaded
    assert meta["general.architecture"] == "llama"
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert (config.head_dim, config.vocab_size, config.intermediate_size) == (64, 49152, 1536)
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5 and config.rope_scaling is None
    assert config.tie_word_embeddings and not config.qkv_bias and config.model_type == "llama"
    assert (config.bos_token_id, config.eos_token_ids) == (1, [2])


@pytest.mark.slow
def test_default_gguf_state_dict(default_loaded) -> None:
    _, sd, _ = default_loaded
    assert len(sd) == 2 + 30 * 9 and "lm_head.weight" not in sd
    assert sd["model.embed_tokens.weight"].shape == (49152, 576)
    assert sd["model.norm.weight"].shape == (576,)
    p = "model.layers.29."
    assert sd[p + "self_attn.q_proj.weight"].shape == (576, 576)
    assert sd[p + "self_attn.k_proj.weight"].shape == sd[p + "self_attn.v_proj.weight"].shape == (192, 576)
    assert sd[p + "self_attn.o_proj.weight"].shape == (576, 576)
    assert sd[p + "mlp.gate_proj.weight"].shape == sd[p + "mlp.up_proj.weight"].shape == (1536, 576)
    assert sd[p + "mlp.down_proj.weight"].shape == (576, 1536)
    assert sd[p + "input_layernorm.weight"].shape == sd[p + "post_attention_layernorm.weight"].shape == (576,)
    assert all(t.dtype == torch.float32 for t in sd.values())


@pytest.mark.slow
def test_default_gguf_matches_transformers(default_gguf: Path, default_loaded) -> None:
    """transformers' own GGUF loader undoes the Q/K permutation too: every tensor must agree exactly."""
    transformers = pytest.importorskip("transformers")
    _, sd, _ = default_loaded
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32
    )
    hf_sd = hf.state_dict()
    assert set(sd) == set(hf_sd) - {"lm_head.weight"}  # tied: transformers lists the shared tensor twice
    for name, t in sd.items():
        assert torch.equal(t, hf_sd[name]), name
