"""A request's state as it moves through the engine."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from falconet.sampling_params import SamplingParams

_ids = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the queue, its KV freed, to be recomputed
    FINISHED = "finished"


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    detokenizer: object  # IncrementalDetokenizer
    prompt: str | None = None
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    block_table: list[int] = field(default_factory=list)  # KV cache blocks, in position order
    num_computed: int = 0  # tokens whose keys and values are in the KV cache
    finish_reason: str | None = None  # "stop" (EOS, a stop token or string), "length", "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    output_text: str = ""  # text emitted so far (stop strings already cut)
    stop_checker: object | None = None  # StopChecker when the request has stop strings
    logprobs: list = field(default_factory=list)  # TokenLogprobs per output token, if asked
    prompt_logprobs: list = field(default_factory=lambda: [None])  # entry i: prompt token i's
    cumulative_logprob: float = 0.0  # sum of the chosen tokens' logprobs (raw model distribution)
    num_lookahead: int = 0  # speculative slots wanted next step, beyond the tokens it needs
    num_preemptions: int = 0  # times its KV cache was freed and recomputed
    spec_stats: object | None = None  # SpecStats of a speculative request

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
