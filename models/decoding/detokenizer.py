"""Incremental detokenisation with stop strings and forbidden-string hold-back, shared by every engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from lethe.guards.forbidden import ForbiddenMatcher

# Tokens decoded again before the newest one, so that word-initial spaces and multi-byte characters
# split over tokens come out as they do in a whole decode.
_CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class Step:
    text: str
    """Text that became final with this token (may be empty)."""
    violation: int | None = None
    """Index of the first output token of a completed forbidden string: the engine must roll back to it."""


class IncrementalDetokenizer:
    """Turns a growing list of token ids into final text increments.

    Decoding every token alone breaks multi-byte characters and word-initial spaces, and decoding
    the whole list every step is quadratic; so, as TGI and vLLM do, we decode a short window that
    starts a few tokens back and emit only what lies past the previous window.

    Text is held back while it could still become a stop string or a forbidden string. A forbidden
    string is held from the start of the token where it begins, so that undoing the tokens that
    spelled it never takes back text the client already has.
    """

    def __init__(
        self, tokenizer: Decoder, stop: Sequence[str] = (), forbidden: ForbiddenMatcher | None = None
    ) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._forbidden = forbidden if forbidden else None
        self._ids: list[int] = []
        self._ends: list[int] = []
        """Text length after each token whose text is decoded; tokens still pending have none yet."""
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""
        self._emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """All final text so far (a stop string and anything after it excluded)."""
        return self._text if self.stopped else self._text[: self._emitted]

    def final_tokens(self) -> int:
        """How many leading tokens produced only emitted text (their log-probabilities can be reported)."""
        count = 0
        for end in self._ends:
            if end > self._emitted:
                break
            count += 1
        return count

    def push(self, token_id: int) -> Step:
        """Add one token; return the text that is now final, or the roll-back a forbidden match needs."""
        if self.stopped:
            return Step("")
        self._ids.append(token_id)
        prefix = self._tokenizer.decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True
        )
        window = self._tokenizer.decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return Step("")
        search_from = max(0, len(self._text) - max((len(s) for s in self._stop), default=0))
        self._text += window[len(prefix) :]
        self._ends += [len(self._text)] * (len(self._ids) - len(self._ends))
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._release(search_from)

    def flush(self) -> str:
        """At the end of generation: release held-back text. It can no longer become a stop string
        or a forbidden string, and dropping it would make an answer that touched no target differ
        from the unguarded one (an answer may well end in "Is" while "Isaac Newton" is registered)."""
        if self.stopped:
            return ""
        chunk = self._text[self._emitted :]
        self._emitted = len(self._text)
        return chunk

    def rollback(self, keep: int) -> None:
        """Forget every token from index `keep` on (after a forbidden match was undone)."""
        ids = self._ids[:keep]
        self._ids = ids
        self._ends = self._ends[:keep]
        self._text = self._text[: self._ends[-1] if self._ends else 0]
        assert self._emitted <= len(self._text), "roll-back would take back emitted text"
        self._read_offset = len(ids)
        self._prefix_offset = max(0, len(ids) - _CONTEXT_TOKENS)

    def _token_start(self, char: int) -> int:
        """Start offset of the token whose text contains character `char`."""
        start = 0
        for end in self._ends:
            if end > char:
                return start
            start = end
        return start

    def _token_index(self, char: int) -> int:
        for index, end in enumerate(self._ends):
            if end > char:
                return index
        return len(self._ends)

    def _release(self, search_from: int) -> Step:
        stop_at = min(
            (pos for pos in (self._text.find(s, search_from) for s in self._stop) if pos >= 0),
            default=-1,
        )
        final = stop_at >= 0
        limit = stop_at if final else len(self._text)
        if self._forbidden is not None:
            found = self._forbidden.search(self._text[:limit], self._emitted)
            if found is not None and not found.partial:
                return Step("", violation=self._token_index(found.start))
            if found is not None:
                limit = self._token_start(found.start)
        if final:  # a stop string ends the text; a possible forbidden prefix before it is dropped
            self._text = self._text[: max(limit, self._emitted)]
            self.stopped = True
        else:
            limit = min(limit, len(self._text) - self._held_for_stop())
        chunk = self._text[self._emitted : limit]
        self._emitted = max(self._emitted, limit)
        return Step(chunk)

    def _held_for_stop(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
