"""Batched generation outside the engine (training data on any device): the same greedy answers
and hidden states as the engine's, left padding and early EOS included, and seeded sampling."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from falconet.methods.speculative.eagle import EagleHead
from falconet.sampling_params import SamplingParams
from falconet.train.distill_draft import draft_vocabulary
from falconet.train.generate import generate
from falconet.train.train_head import collect_features, top1_agreement, train_head


def test_greedy_answers_and_features_match_the_engines(tiny, prompts_of):
    prompts = prompts_of(7, seed=3)  # 4 to 12 tokens: batches of mixed lengths, left-padded
    engine = collect_features(tiny, prompts, 10, max_num_seqs=4)
    dense = generate(tiny.model, prompts, 10, batch_size=3, features=True)
    for p, e, g in zip(prompts, engine, dense, strict=True):
        assert p + g.output_ids == e.ids
        assert g.features.shape == e.features.shape
        torch.testing.assert_close(g.features, e.features, atol=1e-4, rtol=1e-4)


def test_generation_stops_at_eos_per_sequence(tiny, prompts_of, run):
    prompts = prompts_of(6, seed=4)
    free = generate(tiny.model, prompts, 12, batch_size=6)
    # an EOS id that some answers reach early and others not at all
    eos = free[0].output_ids[3]
    want, _ = run(tiny, prompts, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[eos]))
    got = generate(tiny.model, prompts, 12, eos_ids=[eos], batch_size=6)
    assert [g.output_ids for g in got] == want
    assert any(len(w) < 12 for w in want) and any(len(w) == 12 for w in want)


def test_sampling_is_seeded_and_follows_temperature(tiny, prompts_of):
    prompts = prompts_of(8, seed=5)
    a = generate(tiny.model, prompts, 8, temperature=1.0, top_p=0.95, seed=1)
    b = generate(tiny.model, prompts, 8, temperature=1.0, top_p=0.95, seed=1)
    c = generate(tiny.model, prompts, 8, temperature=1.0, top_p=0.95, seed=2)
    greedy = generate(tiny.model, prompts, 8)
    assert [x.output_ids for x in a] == [x.output_ids for x in b]
    assert [x.output_ids for x in a] != [x.output_ids for x in c]
    assert [x.output_ids for x in a] != [x.output_ids for x in greedy]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_generation_on_cuda_matches_cpu(tiny, prompts_of):
    prompts = prompts_of(9, seed=6)
    on_gpu = copy.deepcopy(tiny.model).to("cuda")
    cpu = generate(tiny.model, prompts, 12, batch_size=4, features=True)
    gpu = generate(on_gpu, prompts, 12, batch_size=4, features=True)
    for c, g in zip(cpu, gpu, strict=True):
        assert g.output_ids == c.output_ids
        torch.testing.assert_close(g.features.cpu(), c.features, atol=2e-3, rtol=2e-3)


@cuda
def test_head_training_on_cuda_follows_cpu(tiny, prompts_of):
    """The same head, data and seed: the loss curves on CUDA and CPU agree (bf16 autocast on
    both; the tolerance covers their different matmul rounding)."""
    examples = collect_features(tiny, prompts_of(32, seed=7), 16)
    vocab = draft_vocabulary(examples, 64, 97, always=[2])
    losses, agreement = {}, {}
    for device in ("cpu", "cuda"):
        target = copy.deepcopy(tiny.model).to(device)
        head = EagleHead(target, vocab)
        head.init_from_target()
        head.to(device)
        data = [dataclasses.replace(e, features=e.features.to(device)) for e in examples]
        losses[device] = train_head(head, data, steps=30, batch_size=8, lr=3e-3, log=None)
        agreement[device] = top1_agreement(head, data[:8])
    cpu, gpu = losses["cpu"], losses["cuda"]
    assert sum(gpu[-5:]) < 0.95 * sum(gpu[:5])  # it learns (30 small steps: a few percent)
    assert all(abs(a - b) <= 0.02 * a for a, b in zip(cpu, gpu, strict=True)), (cpu, gpu)
    assert abs(agreement["cpu"] - agreement["cuda"]) <= 0.1, agreement
