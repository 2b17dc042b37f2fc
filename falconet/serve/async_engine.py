"""The engine loop: one thread owns the LLMEngine; HTTP handlers submit work and read outputs.

`LLMEngine` is not thread-safe, and a step is a long, blocking forward pass, so neither can run
on the server's event loop. One thread calls `add_request`, `step` and `abort`, and talks to the
handlers only through queues: commands come in on a thread-safe queue (`queue.Queue`), outputs
go back to each submission's `asyncio.Queue` through `loop.call_soon_threadsafe`, once per step
for all of them.

A submission is one HTTP request: one or more prompts, each a group of samples (n, best_of).
It is admitted or refused as a whole, on the engine thread, where the queue length and the
engine's own checks (prompt length, cache size) are exact.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from falconet.engine.engine import LLMEngine
from falconet.engine.group import submit_group
from falconet.engine.request import Request
from falconet.engine.sampler import TokenLogprobs
from falconet.engine.speculator import metrics_of
from falconet.errors import FalconetError
from falconet.sampling_params import SamplingParams
from falconet.serve.metrics import ServerMetrics

logger = logging.getLogger("falconet.serve")

IDLE_POLL_S = 0.1  # how often an idle loop looks at the shutdown flag


class QueueFull(Exception):
    """Refused: admitting the request would leave more than max_queue sequences waiting for a
    free slot in the running batch."""


class TooManySequences(FalconetError):
    """Refused for good: the request has more samples than running slots and queue together."""


class ShuttingDown(Exception):
    """Refused: the server is shutting down."""


class EngineFailure(Exception):
    """The engine raised while serving the request (a bug, not bad input)."""


@dataclass(frozen=True)
class TokenEvent:
    """One output token of one sample, or (token_id None) the end of an aborted sample."""

    prompt: int  # index of the prompt in its submission
    sample: int  # index of the sample in the prompt's group
    token_id: int | None
    text: str  # the text this token completes (may be "", held back)
    logprobs: TokenLogprobs | None
    finish_reason: str | None  # set on the sample's last event
    speculative_metrics: dict | None = None  # on a speculative sample's last event


_END = object()  # queued after the last event of a submission


class RequestStream:
    """The handler's side of one submission: admission, then token events, then the end.

    After the end, `groups` holds the finished engine requests (the engine thread no longer
    touches them), which is all a non-streaming response needs.
    """

    def __init__(self, prompts: Sequence[tuple[list[int], str | None]], params: SamplingParams, stream: bool):
        self.prompts = list(prompts)
        self.params = params
        self.stream_tokens = stream  # only streaming handlers want per-token events
        self.arrival = time.monotonic()
        self.groups: list[list[Request]] = []  # written by the engine thread at admission
        self.finished = False  # the end has been read
        self.loop = asyncio.get_running_loop()
        self._admission: asyncio.Future = self.loop.create_future()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._remaining = 0  # engine thread: samples not finished yet

    @property
    def num_sequences(self) -> int:
        return len(self.prompts) * (self.params.best_of or self.params.n)

    async def admitted(self) -> None:
        """Wait for admission; raises QueueFull, ShuttingDown, FalconetError or EngineFailure."""
        await self._admission

    async def get(self, timeout: float | None = None) -> list[TokenEvent]:
        """The events that arrived, waiting up to `timeout` for the first ([] if none came).
        Sets `finished` on reading the end; raises EngineFailure if the engine failed."""
        if self.finished:
            return []
        try:
            items = [await asyncio.wait_for(self._queue.get(), timeout)]
        except TimeoutError:
            return []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        events = []
        for item in items:
            if isinstance(item, Exception):
                self.finished = True
                raise item
            if item is _END:
                self.finished = True
            else:
                events.append(item)
        return events

    async def wait_end(self, timeout: float | None = None) -> bool:
        """Skip events until the end; True once it came, False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            await self.get(left)
        return True


@dataclass
class _Owner:
    request: Request
    stream: RequestStream
    prompt: int
    sample: int
    first_token: float | None = None


class AsyncEngine:
    """Runs `engine` on its own thread; `submit` and `abort` may be called from any thread."""

    def __init__(self, engine: LLMEngine, max_queue: int = 256, metrics: ServerMetrics | None = None):
        if max_queue < 1:
            raise FalconetError(f"max_queue must be positive, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or ServerMetrics()
        self._commands: queue.Queue = queue.Queue()
        self._owners: dict[str, _Owner] = {}  # engine thread only: request id -> its submission
        self._thread = threading.Thread(target=self._run, name="falconet-engine", daemon=True)
        # Set from a signal handler, so a plain attribute (no lock): seconds of grace, polled by the loop.
        self._shutdown_grace: float | None = None
        self._deadline: float | None = None

    # --- any thread -------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def draining(self) -> bool:
        return self._shutdown_grace is not None

    def start(self) -> None:
        self._thread.start()

    def submit(
        self, prompts: Sequence[tuple[list[int], str | None]], params: SamplingParams, stream: bool
    ) -> RequestStream:
        """Queue a submission (call from the event loop); await its `admitted()` next."""
        req_stream = RequestStream(prompts, params, stream)
        self._commands.put((self._admit, req_stream))
        return req_stream

    def abort(self, stream: RequestStream) -> None:
        """Abort what is left of a submission (its KV blocks are freed); a no-op once it ended."""
        self._commands.put((self._abort, stream))

    def forget(self) -> None:
        """Speculative methods forget earlier requests (Speculator.forget), in the engine thread,
        before any submission queued after this call."""
        self._commands.put((lambda _: self.engine.speculator.forget(), None))

    def begin_shutdown(self, grace_s: float) -> None:
        """Refuse new submissions; abort the ones still running after `grace_s` seconds.
        Safe to call from a signal handler."""
        self._shutdown_grace = max(0.0, grace_s)

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything left and end the thread."""
        self._commands.put((None, None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        running = True
        while running:
            try:
                running = self._iterate()
            except Exception:  # a bug: the loop must survive it, or every later request would hang
                logger.exception("engine loop failed; aborting every request")
                self._fail_all()

    def _iterate(self) -> bool:
        """Commands, then one step; False once told to stop."""
        for command, arg in self._take_commands(block=not self.engine.has_unfinished()):
            if command is None:
                self._abort_all()
                return False
            command(arg)
        self._check_deadline()
        if self.engine.has_unfinished():
            self._step()
        self._update_gauges()
        return True

    def _take_commands(self, block: bool) -> list:
        """Every queued command; an idle engine waits a little for one (a busy one never waits)."""
        commands = []
        if block:
            try:
                commands.append(self._commands.get(timeout=IDLE_POLL_S))
            except queue.Empty:
                return []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _check_deadline(self) -> None:
        if self._shutdown_grace is not None and self._deadline is None:
            self._deadline = time.monotonic() + self._shutdown_grace
        if self._deadline is not None and time.monotonic() >= self._deadline and self._owners:
            self._abort_all()

    def _admit(self, stream: RequestStream) -> None:
        count, scheduler = stream.num_sequences, self.engine.scheduler
        if self.draining:
            return self._settle(stream, ShuttingDown("the server is shutting down"))
        if count > self.max_queue + scheduler.max_num_seqs:
            error = TooManySequences(
                f"the request asks for {count} sequences; the server holds {scheduler.max_num_seqs} "
                f"running and the queue {self.max_queue}"
            )
            return self._settle(stream, error)
        # Sequences that will run at the next step (free slots) are not queued.
        free_slots = max(0, scheduler.max_num_seqs - len(scheduler.running))
        if len(scheduler.waiting) + count - free_slots > self.max_queue:
            self.metrics.rejected.inc()
            return self._settle(stream, QueueFull(f"the queue is full ({self.max_queue} waiting sequences)"))
        groups: list[list[Request]] = []
        try:
            for ids, text in stream.prompts:
                groups.append(submit_group(self.engine, ids, stream.params, prompt=text))
        except Exception as e:
            for req in (r for g in groups for r in g):
                self.engine.abort(req)
            if isinstance(e, FalconetError):  # bad input: the engine's own checks
                return self._settle(stream, e)
            logger.exception("engine failed to admit a request")
            return self._settle(stream, EngineFailure("the engine failed to admit the request"))
        stream.groups = groups
        stream._remaining = count
        for p, group in enumerate(groups):
            for s, req in enumerate(group):
                self._owners[req.request_id] = _Owner(req, stream, p, s)
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in stream.prompts))
        self._settle(stream, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            logger.exception("engine step failed; aborting every request")
            return self._fail_all()
        now = time.monotonic()
        deliveries: list[tuple[RequestStream, object]] = []
        for out in outputs:
            req = out.request
            owner = self._owners.get(req.request_id)
            if owner is None:
                continue
            if owner.first_token is None:
                owner.first_token = now
                self.metrics.ttft.observe(now - owner.stream.arrival)
            if owner.stream.stream_tokens:
                logprobs = req.logprobs[out.index] if req.params.logprobs is not None else None
                metrics = metrics_of(req) if out.finish_reason is not None else None
                event = TokenEvent(
                    owner.prompt, owner.sample, out.new_token_id, out.text_delta, logprobs, out.finish_reason,
                    speculative_metrics=metrics,
                )  # fmt: skip
                deliveries.append((owner.stream, event))
            if out.finish_reason is not None:
                self._retire(req, now, deliveries)
        self.metrics.observe_step(now, len(outputs))
        self.metrics.observe_speculation(self.engine.speculator.stats)
        self._deliver(deliveries)

    def _retire(self, req: Request, now: float, deliveries: list) -> None:
        owner = self._owners.pop(req.request_id)
        arrival, n = owner.stream.arrival, len(req.output_ids)
        self.metrics.observe_finished(req.finish_reason, arrival, owner.first_token, now, n)
        owner.stream._remaining -= 1
        if owner.stream._remaining == 0:
            deliveries.append((owner.stream, _END))

    def _abort(self, stream: RequestStream) -> None:
        now = time.monotonic()
        deliveries: list[tuple[RequestStream, object]] = []
        for req in (r for g in stream.groups for r in g):
            owner = self._owners.get(req.request_id)
            if owner is None:
                continue  # already finished
            self.engine.abort(req)
            if stream.stream_tokens:
                deliveries.append((stream, TokenEvent(owner.prompt, owner.sample, None, "", None, "abort")))
            self._retire(req, now, deliveries)
        self._deliver(deliveries)

    def _abort_all(self) -> None:
        for stream in {id(o.stream): o.stream for o in self._owners.values()}.values():
            self._abort(stream)

    def _fail_all(self) -> None:
        """After an engine exception: abort everything and tell every handler."""
        streams = {id(o.stream): o.stream for o in self._owners.values()}
        for owner in self._owners.values():
            try:
                self.engine.abort(owner.request)
            except Exception:  # the engine's state may be broken; the handlers must hear anyway
                logger.exception("abort after an engine failure failed")
        self._owners.clear()
        failure = EngineFailure("the engine failed while serving the request")
        self._deliver([(stream, failure) for stream in streams.values()])

    def _update_gauges(self) -> None:
        m, bm = self.metrics, self.engine.block_manager
        m.running.set(len(self.engine.scheduler.running))
        m.waiting.set(len(self.engine.scheduler.waiting))
        m.kv_usage.set(1 - bm.num_free_blocks / bm.num_blocks if bm.num_blocks else 0.0)
        m.prefix_hit_rate.set(self.engine.prefix_cache_hit_rate)

    @staticmethod
    def _settle(stream: RequestStream, error: Exception | None) -> None:
        def settle() -> None:
            if stream._admission.done():
                return  # the handler gave up (cancelled) and aborts
            if error is None:
                stream._admission.set_result(None)
            else:
                stream._admission.set_exception(error)

        _call_soon(stream.loop, settle)

    @staticmethod
    def _deliver(deliveries: list[tuple[RequestStream, object]]) -> None:
        if not deliveries:
            return
        by_loop: dict[int, list] = {}
        for stream, item in deliveries:
            by_loop.setdefault(id(stream.loop), []).append((stream, item))

        def put(items) -> None:
            for stream, item in items:
                stream._queue.put_nowait(item)

        for items in by_loop.values():
            _call_soon(items[0][0].loop, put, items)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
        pass
