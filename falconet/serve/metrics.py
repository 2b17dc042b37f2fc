"""Prometheus metrics of the server (GET /metrics).

Written by the engine loop thread (prometheus-client's metrics are thread-safe) and read by the
scrape. Each server gets its own registry, so that several apps can live in one process (tests).
Names follow vLLM's, with a `falconet_` prefix.
"""

from __future__ import annotations

from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 (re-exported)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 300)
RATE_WINDOW_S = 10.0  # tokens/s is averaged over this many seconds


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.running = Gauge("falconet_num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("falconet_num_requests_waiting", "Sequences waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("falconet_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.prefix_hit_rate = Gauge(
            "falconet_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache", registry=r
        )
        self.tokens_per_s = Gauge(
            "falconet_generation_tokens_per_second",
            f"Output tokens/s over the last {RATE_WINDOW_S:g} s",
            registry=r,
        )
        self.prompt_tokens = Counter("falconet_prompt_tokens", "Prompt tokens received", registry=r)
        self.generation_tokens = Counter("falconet_generation_tokens", "Output tokens generated", registry=r)
        self.ttft = Histogram(
            "falconet_time_to_first_token_seconds", "Arrival to first token", buckets=TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "falconet_time_per_output_token_seconds",
            "Mean time between output tokens of a sequence",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "falconet_e2e_request_latency_seconds", "Arrival to last token", buckets=E2E_BUCKETS, registry=r
        )
        self.finished = Counter(
            "falconet_requests_finished", "Sequences finished", ["finish_reason"], registry=r
        )
        self.rejected = Counter(
            "falconet_requests_rejected", "Requests refused because the queue was full", registry=r
        )
        self.spec_steps = Counter(
            "falconet_spec_decode_num_verify_steps", "Target forwards that verified drafts", registry=r
        )
        self.spec_drafted = Counter(
            "falconet_spec_decode_num_draft_tokens", "Draft tokens proposed", registry=r
        )
        self.spec_accepted = Counter(
            "falconet_spec_decode_num_accepted_tokens", "Draft tokens accepted", registry=r
        )
        self.spec_accepted_by_position = Counter(
            "falconet_spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by position in the draft",
            ["position"],
            registry=r,
        )
        self._spec_seen = (0, 0, 0, [])  # engine totals already counted
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._recent_tokens = 0

    def observe_step(self, now: float, num_tokens: int) -> None:
        """Count one step's output tokens and refresh the tokens/s gauge."""
        self.generation_tokens.inc(num_tokens)
        if num_tokens:
            self._recent.append((now, num_tokens))
            self._recent_tokens += num_tokens
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent_tokens -= self._recent.popleft()[1]
        self.tokens_per_s.set(self._recent_tokens / RATE_WINDOW_S)

    def observe_speculation(self, stats) -> None:
        """Count what the engine's speculative totals (SpecStats) added since the last call."""
        steps, drafted, accepted, by_position = self._spec_seen
        if stats.num_steps == steps:
            return
        self.spec_steps.inc(stats.num_steps - steps)
        self.spec_drafted.inc(stats.num_drafted - drafted)
        self.spec_accepted.inc(stats.num_accepted - accepted)
        for j, count in enumerate(stats.accepted_by_position):
            before = by_position[j] if j < len(by_position) else 0
            if count > before:
                self.spec_accepted_by_position.labels(position=str(j)).inc(count - before)
        self._spec_seen = (
            stats.num_steps,
            stats.num_drafted,
            stats.num_accepted,
            list(stats.accepted_by_position),
        )

    def observe_finished(self, reason: str, arrival: float, first_token: float | None, now: float, n: int):
        """One sequence ended: its latency, and its time per output token after the first."""
        self.finished.labels(finish_reason=reason).inc()
        self.e2e.observe(now - arrival)
        if first_token is not None and n > 1:
            self.tpot.observe((now - first_token) / (n - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
