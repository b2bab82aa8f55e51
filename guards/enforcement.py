"""Pure enforcement primitives: given what a request has produced, which tokens are forbidden next."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence


class SequenceBans:
    """Banned token sequences indexed by their prefix, built once per request.

    A sequence of length k is completed by its last token when the previous k-1 output tokens
    equal its prefix. Grouping the sequences by prefix length makes a step one dictionary lookup
    per distinct length (a handful) instead of a comparison per sequence: a fired target with
    hundreds of key terms has thousands of spellings.
    """

    def __init__(self, sequences: Iterable[Sequence[int]]) -> None:
        by_length: dict[int, dict[tuple[int, ...], set[int]]] = defaultdict(lambda: defaultdict(set))
        for sequence in sequences:
            if sequence:
                by_length[len(sequence) - 1][tuple(sequence[:-1])].add(sequence[-1])
        self._by_length = {length: dict(prefixes) for length, prefixes in by_length.items()}

    def next_tokens(self, output_ids: Sequence[int]) -> set[int]:
        """Tokens that would complete a banned sequence right now."""
        banned: set[int] = set()
        for length, prefixes in self._by_length.items():
            if length > len(output_ids):
                continue
            tail = tuple(output_ids[len(output_ids) - length :]) if length else ()
            banned |= prefixes.get(tail, set())
        return banned
