"""Stop strings on streamed text.

Text arrives in deltas (from the detokenizer), and a stop string can span several of them, so
text that might be the start of a stop string is held back until the next deltas show whether
it is one. Only the longest tail that is a prefix of some stop string is held: everything before
it can never become part of a match. The same text therefore comes out however it was split into
deltas.
"""

from __future__ import annotations

from falconet.errors import FalconetError


class StopChecker:
    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False):
        if not all(stop):
            raise FalconetError("stop strings must be non-empty")
        self.stop = list(stop)
        self.include = include_stop_str_in_output
        self.held = ""  # text received but not yet emitted
        self.stopped = False
        self.matched: str | None = None  # the stop string found (vLLM reports it as stop_reason)

    def check(self, new_text: str) -> tuple[str, bool]:
        """Feed one delta; return the text now safe to emit and whether a stop string was found.
        After a stop, the output is final: later deltas are ignored."""
        if self.stopped:
            return "", True
        text = self.held + new_text
        match = self._first_match(text)
        if match is not None:
            start, stop_str = match
            self.stopped, self.matched, self.held = True, stop_str, ""
            return text[: start + len(stop_str) if self.include else start], True
        keep = self._held_back_length(text)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Generation ended without a stop string: release the text held back."""
        text, self.held = self.held, ""
        return text

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """The stop string that is complete earliest in the stream (smallest end; then earliest
        start), i.e. the one a character-by-character check would meet first. This makes the
        result independent of how the text was split into deltas: with stops "b" and "abc",
        "ab" stops at "b" even when "abc" arrives in one delta."""
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            start = text.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best[:2]):
                best = (start + len(s), start, s)
        return None if best is None else (best[1], best[2])

    def _held_back_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = max((len(s) for s in self.stop), default=1) - 1
        for n in range(min(longest, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
