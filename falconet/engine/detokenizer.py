"""Streaming detokenization: turn generated ids into text deltas as they arrive.

Decoding one token at a time is wrong twice over: a byte-level token can hold half a UTF-8
character, and SentencePiece decoders treat the first token of a sequence specially (they drop
its leading space). So each step decodes a short window that starts a few tokens back
(`prefix_offset`) and emits only what goes beyond the text already read (`read_offset`); both
decodes see the same first token, so its special treatment cancels out.

Text is held back while it may still change: while it ends in U+FFFD (a character still missing
bytes), and while the last token is a <0xNN> byte-fallback token, because that decoder turns a
whole run of byte tokens into U+FFFDs if the run as a whole turns out invalid.
"""

from __future__ import annotations

from falconet.models.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0  # window start: tokens before it are settled for good
        self.read_offset = 0  # tokens before it have had their text emitted

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def _advance(self, final: bool) -> str:
        last = self.token_ids[-1] if self.token_ids else None
        if not final and (
            last in self.tokenizer.byte_fallback_ids
            # a skipped special token adds no text, and byte runs join across it: wait for more
            or (self.skip_special_tokens and last in self.tokenizer.special_ids)
        ):
            return ""
        prefix = self._decode(self.prefix_offset, self.read_offset)
        full = self._decode(self.prefix_offset, len(self.token_ids))
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += delta
        return delta

    def add(self, token_id: int) -> str:
        """Append one generated id; return the new text it completes (possibly "")."""
        self.token_ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """End of stream: return text still held back (e.g. a truncated character, as U+FFFD)."""
        return self._advance(final=True)
