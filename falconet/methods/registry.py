"""Name -> implementation registries through which a request chooses a method.

A request names a speculative method or a decoding strategy (the server's `speculative` and
`decoding_strategy` fields); the name is looked up here, so an unknown name fails at submission
with the list of valid ones instead of deep inside the engine. Implementations register
themselves on import. None exists yet: the registries start empty and only the plumbing is in
place.
"""

from __future__ import annotations

from typing import Any

from falconet.errors import FalconetError


class Registry:
    """Implementations of one kind of method, by name."""

    def __init__(self, kind: str):
        self.kind = kind  # e.g. "speculative method", used in error messages
        self._entries: dict[str, Any] = {}

    def register(self, name: str, implementation: Any) -> Any:
        """Add `implementation` under `name`; returns it, so it also works as a decorator's body."""
        if not name or name in self._entries:
            raise ValueError(f"{self.kind} name {name!r} is empty or already registered")
        self._entries[name] = implementation
        return implementation

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def lookup(self, name: str) -> Any:
        if name not in self._entries:
            valid = ", ".join(sorted(self._entries)) or "none (no method of this kind is registered yet)"
            raise FalconetError(f"unknown {self.kind} {name!r}; valid: {valid}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)


SPECULATIVE_METHODS = Registry("speculative method")
DECODING_STRATEGIES = Registry("decoding strategy")
