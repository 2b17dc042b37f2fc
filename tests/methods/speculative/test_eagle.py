"""The EAGLE head's int8 copy (what a bf16 head drafts with on the CPU kernels)."""

from __future__ import annotations

import torch

from falconet.methods.quant.int8 import Int8Linear
from falconet.methods.speculative.eagle import EagleHead, int8_draft_head
from falconet.models.linear import Linear
from falconet.models.loader import load_model


def test_int8_draft_head_is_a_close_copy_sharing_the_target(tiny_llama64_dir):
    target = load_model(tiny_llama64_dir, dtype=torch.bfloat16, with_tokenizer=False).model
    head = EagleHead(target, torch.arange(0, 97, 2))
    head.init_from_target()
    head = head.to(torch.bfloat16)
    copy = int8_draft_head(head)
    assert copy is not head and copy.target is head.target
    assert torch.equal(copy.draft_vocab, head.draft_vocab)
    # the caller's head is untouched; the copy's layer and LM head are int8, its fc is not
    assert isinstance(head.lm_head, Linear) and isinstance(head.layer.self_attn.qkv_proj, Linear)
    assert isinstance(copy.lm_head, Int8Linear) and isinstance(copy.layer.self_attn.qkv_proj, Int8Linear)
    assert isinstance(copy.fc, Linear) and copy.fc.weight.dtype == torch.bfloat16
    x = torch.randn(5, target.config.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
    exact, approx = head.compute_logits(x), copy.compute_logits(x)
    assert (approx - exact).abs().max() <= 0.05 * exact.abs().max()
