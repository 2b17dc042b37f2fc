"""Blockwise 4-bit weights: rounding, the kernel against the dequantized weights, the default
model's Q4_1 grid found again, and a quantized model close to the float one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from falconet.kernels import cpu_kernels
from falconet.methods.quant.int4 import Int4Linear, dequantize_int4, pack_int4, quantize_int4
from falconet.methods.quant.int8 import Int8Linear
from falconet.methods.registry import catalogue
from falconet.models.loader import load_model

kernels = cpu_kernels()
has_kernel = kernels is not None and kernels.has_bf16_linear()


def test_round_to_nearest_per_block():
    w = torch.randn(24, 128) * torch.linspace(0.01, 3, 24)[:, None]
    q, d, m = quantize_int4(w, 32)
    assert q.dtype == torch.uint8 and int(q.max()) == 15 and d.shape == m.shape == (24, 4)
    err = (dequantize_int4(q, d, m) - w).abs().reshape(24, 4, 32)
    # half a step, plus what fp16 scales and minimums round away
    assert (err <= d.float()[..., None] * 0.5 + w.abs().max() * 2e-3).all()
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(torch.randn(4, 40), 32)


def test_weights_already_on_a_block_grid_come_back_exactly():
    """Q4_1-style blocks (each using its 0 and 15) are found again: the default model's case."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (16, 64), generator=g, dtype=torch.uint8)
    q[:, ::32] = 0
    q[:, 1::32] = 15
    d = (torch.rand(16, 2, generator=g) * 0.1).half()
    m = (-torch.rand(16, 2, generator=g)).half()
    w = dequantize_int4(q, d, m)
    q2, d2, m2 = quantize_int4(w, 32)
    assert torch.equal(q2, q) and torch.equal(m2, m)
    torch.testing.assert_close(dequantize_int4(q2, d2, m2), w, rtol=0, atol=1e-3 * w.abs().max().item())


@pytest.mark.skipif(not has_kernel, reason="needs the AVX512-BF16 kernel")
@pytest.mark.parametrize("n,k,group", [(64, 64, 32), (40, 96, 32), (960, 576, 32), (16, 1536, 32),
                                       (960, 576, 64), (40, 1536, 128)])  # fmt: skip
@pytest.mark.parametrize("m", [1, 3, 4, 17, 300])
def test_kernel_matches_the_dequantized_weights(m, n, k, group):
    """Against the float32 product with the dequantized weights: no worse than torch's bf16
    linear over those weights rounded to bf16 (the kernel never rounds a weight)."""
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g)
    q, d, mins = quantize_int4(w, group)
    weight = dequantize_int4(q, d, mins)
    ours = kernels.linear_q4(x, *pack_int4(q, d, mins), n, torch.empty(0), group)
    ref = x.float() @ weight.T
    torch_err = (F.linear(x, weight.bfloat16()).float() - ref).abs().max().item()
    assert ours.shape == (m, n) and ours.dtype == torch.bfloat16
    assert (ours.float() - ref).abs().max().item() <= max(torch_err, 1e-6) * 1.01


@pytest.mark.skipif(not has_kernel, reason="needs the AVX512-BF16 kernel")
@pytest.mark.parametrize("m", [1, 9, 700])
def test_bias_rows_independence_and_bad_inputs(m):
    lin = nn.Linear(1536, 40, bias=True)
    layer = Int4Linear(lin, 64)
    x = torch.randn(m, 1536).bfloat16()
    out = layer(x)
    ref = F.linear(x.float(), layer.dequantized(torch.float32), lin.bias.float())
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)
    for i in (0, m - 1):
        assert torch.equal(layer(x[i : i + 1].contiguous())[0], out[i])
    with pytest.raises(RuntimeError, match="linear_q4"):
        kernels.linear_q4(x, layer._packed, layer._d, layer._m, 40, torch.empty(0), 32)  # wrong group


def test_float32_activations_use_the_dequantized_weight():
    lin = nn.Linear(64, 24)
    layer = Int4Linear(lin)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantized(torch.float32), lin.bias))


def test_default_model_blocks_are_found_again(default_gguf):
    """The GGUF's linear weights are Q4_1 blocks of 32 along each row: 4-bit blocks of 32 give
    the loaded float32 weights back to within fp16 rounding of their scales."""
    model = load_model(default_gguf, with_tokenizer=False).model
    for linear in (model.layers[0].self_attn.qkv_proj, model.layers[7].mlp.down_proj):
        w = linear.weight.detach()
        q, d, m = quantize_int4(w, 32)
        err = (dequantize_int4(q, d, m) - w).abs().max().item()
        assert err <= 1e-3 * w.abs().max().item(), err


def test_gguf_4bit_blocks_load_exactly(default_gguf):
    """`-q int4` on a Q4_1 GGUF takes the file's blocks as they are: every 4-bit layer's weights
    are exactly what gguf's own dequantization gives (Q/K rows in our order)."""
    import gguf

    from falconet.models.gguf import open_gguf, unpermute_qk

    model = load_model(default_gguf, dtype=torch.bfloat16, with_tokenizer=False, quantization="int4").model
    tensors = {t.name: t for t in open_gguf(default_gguf).tensors}

    def ref(name):
        t = tensors[name]
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))

    layer = model.layers[5]
    c = model.config
    q_rows = unpermute_qk(ref("blk.5.attn_q.weight").numpy(), c.num_heads)
    k_rows = unpermute_qk(ref("blk.5.attn_k.weight").numpy(), c.num_kv_heads)
    qkv = torch.cat([torch.from_numpy(q_rows), torch.from_numpy(k_rows), ref("blk.5.attn_v.weight")])
    assert torch.equal(layer.self_attn.qkv_proj.dequantize(), qkv)
    gate_up = torch.cat([ref("blk.5.ffn_gate.weight"), ref("blk.5.ffn_up.weight")])
    assert torch.equal(layer.mlp.gate_up_proj.dequantize(), gate_up)
    assert torch.equal(layer.mlp.down_proj.dequantize(), ref("blk.5.ffn_down.weight"))


def test_rows_a_group_does_not_divide_take_a_smaller_one():
    from falconet.methods.quant.int4 import Int4G128WeightOnly

    model = nn.Sequential(nn.Linear(576, 32), nn.Linear(1536, 32), nn.Linear(48, 32))
    Int4G128WeightOnly().apply(model)
    assert [getattr(m, "group_size", None) for m in model] == [64, 128, None]  # the last: int8
    assert isinstance(model[2], Int8Linear)


def test_gguf_4bit_layers_are_never_dequantized(default_gguf, monkeypatch):
    """No float detour: with -q int4 the file's Q4_1 tensors are read only as blocks."""
    import gguf as gguf_lib

    from falconet.models import gguf

    dequantized = []
    real = gguf._dequantize
    monkeypatch.setattr(
        gguf, "_dequantize", lambda t, source: dequantized.append(t.tensor_type) or real(t, source)
    )
    load_model(default_gguf, dtype=torch.bfloat16, with_tokenizer=False, quantization="int4")
    assert dequantized and gguf_lib.GGMLQuantizationType.Q4_1 not in dequantized
    dequantized.clear()
    load_model(default_gguf, dtype=torch.bfloat16, with_tokenizer=False, quantization="int4-g64")
    assert gguf_lib.GGMLQuantizationType.Q4_1 in dequantized  # other block sizes re-round the floats


def test_q4_0_blocks_read_exactly():
    """Q4_0 ((q - 8) d) becomes q d + m with m = -8 d, exact in fp16."""
    import gguf
    import numpy as np

    from falconet.models.gguf import four_bit_blocks

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
    tensor = type("T", (), {"tensor_type": gguf.GGMLQuantizationType.Q4_0, "data": raw})()
    q, d, m = four_bit_blocks(tensor)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_0)
    assert q.max() <= 15 and d.shape == m.shape == (8, 2)
    assert torch.equal(dequantize_int4(*(torch.from_numpy(x) for x in (q, d, m))), torch.from_numpy(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,group", [("int4", 32), ("int4-g64", 64), ("int4-g128", 128)])
def test_a_quantized_model_stays_close_to_the_float_one(next_token_kl, dtype, method, group):
    kl, quant = next_token_kl(method, dtype)
    assert isinstance(quant.lm_head, Int8Linear)
    layers = [m for m in quant.modules() if isinstance(m, Int4Linear)]
    assert layers and all(m.group_size == group for m in layers)  # the tiny rows are 256 long
    assert not [m for m in quant.modules() if isinstance(m, nn.Linear)]
    assert kl < 0.05, kl
    assert next(m for m in catalogue() if m.name == method).kind == "quantization"


def test_speculative_decoding_stays_lossless_on_quantized_weights(tiny_llama64_dir):
    """A row's result does not depend on the batch in the 4-bit kernel either, so verifying
    drafts in one forward gives exactly the tokens of plain decoding."""
    from falconet.engine.engine import EngineConfig, LLMEngine
    from falconet.sampling_params import SamplingParams

    loaded = load_model(tiny_llama64_dir, dtype=torch.bfloat16, with_tokenizer=False, quantization="int4")
    prompt = [5, 6, 7, 8, 9] * 6
    outs = []
    for method in (None, "ngram"):
        engine = LLMEngine(loaded, EngineConfig(max_num_seqs=2))
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, speculative=method)
        reqs = [engine.add_request(prompt, params), engine.add_request(prompt[3:], params)]
        while engine.has_unfinished():
            engine.step()
        outs.append([r.output_ids for r in reqs])
    assert outs[0] == outs[1]
