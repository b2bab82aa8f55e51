"""Incremental detokenisation with stop strings, shared by every engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into final text increments.

    Decoding every token alone breaks multi-byte characters and word-initial spaces, and decoding
    the whole list every step is quadratic; so, as TGI and vLLM do, we decode a short window that
    starts a few tokens back and emit only what lies past the previous window. Text that could
    still be the beginning of a stop string is held back until it can't.
    """

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""
        self._emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """All final text so far (the stop string and anything after it excluded)."""
        return self._text if self.stopped else self._text[: self._emitted]

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now final (may be empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix = self._tokenizer.decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True
        )
        window = self._tokenizer.decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(window) > len(prefix) and not window.endswith("\ufffd"):
            search_from = max(0, len(self._text) - max((len(s) for s in self._stop), default=0))
            self._text += window[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return self._release(search_from)
        return ""

    def flush(self) -> str:
        """At the end of generation: release held-back text (it can no longer become a stop string)."""
        if self.stopped:
            return ""
        chunk = self._text[self._emitted :]
        self._emitted = len(self._text)
        return chunk

    def _release(self, search_from: int) -> str:
        earliest = min(
            (pos for pos in (self._text.find(s, search_from) for s in self._stop) if pos >= 0),
            default=-1,
        )
        if earliest >= 0:
            self._text = self._text[:earliest]
            self.stopped = True
            chunk = self._text[self._emitted :]
            self._emitted = len(self._text)
            return chunk
        safe_end = len(self._text) - self._held_back()
        chunk = self._text[self._emitted : safe_end]
        self._emitted = max(self._emitted, safe_end)
        return chunk

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
