"""The samples of one prompt (n, best_of) as a group of engine requests.

Shared by `LLM` and the server so that both seed, submit and rank samples the same way.
"""

from __future__ import annotations

from falconet.engine.engine import LLMEngine
from falconet.engine.request import Request
from falconet.sampling_params import SamplingParams


def submit_group(
    engine: LLMEngine, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None
) -> list[Request]:
    """Queue best_of (default n) samples of one prompt; all or none are queued."""
    count = params.best_of or params.n
    # Each sample needs its own random stream; a seeded request stays reproducible.
    seeds = [None if params.seed is None else params.seed + i for i in range(count)]
    reqs: list[Request] = []
    try:
        for seed in seeds:
            reqs.append(engine.add_request(prompt_ids, params, prompt=prompt, seed=seed))
    except BaseException:
        for r in reqs:
            engine.abort(r)
        raise
    return reqs


def returned_samples(group: list[Request]) -> list[Request]:
    """The n samples to return: all of them, or with best_of > n the n with the highest
    cumulative logprob (the group must be finished)."""
    n = group[0].params.n
    if len(group) > n:
        return sorted(group, key=lambda r: r.cumulative_logprob, reverse=True)[:n]
    return list(group)
