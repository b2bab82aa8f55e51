"""Pure enforcement primitives: given what a request has produced, which tokens are forbidden next."""

from __future__ import annotations

from collections.abc import Sequence

from guards.plan import GuardPlan


def banned_next_tokens(plan: GuardPlan, output_ids: Sequence[int]) -> set[int]:
    """Tokens that would complete a banned sequence right now.

    A sequence of length k is completed by its last token when the previous k-1 output tokens
    equal its prefix, so the check looks only at the tail of the output: O(total banned length)
    per step, independent of how long the answer already is.
    """
    banned: set[int] = set()
    for sequence in plan.banned_sequences:
        prefix_length = len(sequence) - 1
        if prefix_length > len(output_ids):
            continue
        if prefix_length == 0 or tuple(output_ids[-prefix_length:]) == sequence[:-1]:
            banned.add(sequence[-1])
    return banned
