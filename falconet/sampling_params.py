"""SamplingParams: what a request asks of decoding, validated once at submission."""

from __future__ import annotations

from dataclasses import dataclass, field

from falconet.errors import FalconetError


@dataclass
class SamplingParams:
    """Defaults follow vLLM: temperature 1.0 samples; temperature 0 is greedy."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise FalconetError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise FalconetError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FalconetError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise FalconetError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
