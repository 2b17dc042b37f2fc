"""SamplingParams: what a request asks of decoding, validated once at submission."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from falconet.errors import FalconetError

# Below this temperature a request decodes greedily (vLLM's _SAMPLING_EPS): dividing by a tinier
# temperature would overflow the logits to inf, and the distribution is an argmax anyway.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """Defaults and meanings follow vLLM: temperature 1.0 samples; temperature 0 is greedy.

    `n` and `best_of` are carried out by the engine (several sequences per request); the sampler
    sees one row per sequence.
    """

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0  # drop tokens below min_p * (probability of the most likely token)
    seed: int | None = None
    n: int = 1  # sequences returned per request
    best_of: int | None = None  # sequences generated, the best n returned; None means n
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in the prompt or the output
    presence_penalty: float = 0.0  # subtracted once from tokens already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    logit_bias: dict[int, float] | None = None  # token id -> value added to its logit
    stop: list[str] | str | None = None  # normalised to a list
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives per generated token; 0 = only the chosen one's
    prompt_logprobs: int | None = None  # the same for each prompt token
    skip_special_tokens: bool = True
    speculative: str | None = None  # a registered speculative method (`falconet methods`)
    num_speculative_tokens: int | None = None  # drafts per step; None: the method's default

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise FalconetError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise FalconetError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FalconetError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or not -1 <= self.top_k < 2**31:
            raise FalconetError(f"top_k must be -1, 0 (disabled) or a positive int32, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise FalconetError(f"min_p must be in [0, 1], got {self.min_p}")
        # torch generators take seeds in [-2**63, 2**64); n > 1 adds the sample index.
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**63):
            raise FalconetError(f"seed must be None or an integer in [-2**63, 2**63), got {self.seed!r}")
        self._check_counts()
        self._check_speculative()
        self._check_penalties()
        self._normalise_logit_bias()
        self._normalise_stops()

    def _check_counts(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise FalconetError(f"n must be a positive integer, got {self.n!r}")
        if self.best_of is not None and (not _is_int(self.best_of) or self.best_of < self.n):
            raise FalconetError(f"best_of must be an integer >= n ({self.n}), got {self.best_of!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise FalconetError(f"{name} must be None or an integer >= 0, got {value!r}")

    def _check_speculative(self) -> None:
        if self.speculative is not None:
            from falconet.methods.registry import SPECULATIVE_METHODS

            SPECULATIVE_METHODS.lookup(self.speculative)  # an unknown name lists the valid ones
        k = self.num_speculative_tokens
        if k is not None and (not _is_int(k) or not 0 <= k <= 16):
            raise FalconetError(f"num_speculative_tokens must be an integer in [0, 16], got {k!r}")

    def _check_penalties(self) -> None:
        # Bounded so that dividing or multiplying a logit by it cannot overflow float32.
        if not 0.01 <= self.repetition_penalty <= 100:
            raise FalconetError(f"repetition_penalty must be in [0.01, 100], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise FalconetError(f"{name} must be in [-2, 2], got {value}")

    def _normalise_logit_bias(self) -> None:
        if not self.logit_bias:
            self.logit_bias = None
            return
        bias = {}
        for token, value in self.logit_bias.items():
            # JSON objects (the OpenAI API) carry the ids as strings.
            try:
                token_id = int(token)
            except (TypeError, ValueError):
                raise FalconetError(f"logit_bias keys must be token ids, got {token!r}") from None
            # OpenAI's range: enough to ban or force a token, too small to overflow a logit.
            if token_id < 0 or not -100 <= value <= 100:
                raise FalconetError(
                    f"logit_bias needs ids >= 0 and values in [-100, 100], got {token!r}: {value!r}"
                )
            bias[token_id] = float(value)
        self.logit_bias = bias

    def _normalise_stops(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        # An empty stop string would match before the first character.
        if not all(isinstance(s, str) and s for s in self.stop):
            raise FalconetError(f"stop strings must be non-empty strings, got {self.stop!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise FalconetError(f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
