"""Compiling targets into plans: what a fired target forbids, and that nothing fired forbids only the
registered strings."""

from __future__ import annotations

from lethe.guards.compiler import compile_target
from lethe.guards.config import GuardConfig
from lethe.guards.forbidden import ForbiddenMatcher
from lethe.guards.index import GuardIndex
from tests.support.targets import target


def encode(text: str) -> list[int]:
    """One token per character: no word is a single everyday token, so every key term is kept."""
    return [ord(char) for char in text]


def test_a_fired_target_forbids_its_long_name_words_misspelt() -> None:
    config = GuardConfig()
    buffett = compile_target(
        target("wb", "Warren Buffett", aliases=["Oracle of Omaha"]), encode, None, config
    )
    assert buffett.forbidden_names == ("Warren", "Buffett", "Oracle")  # "Omaha" is too short
    blair = compile_target(
        target("tb", "Tony Blair", aliases=["Anthony Charles Lynton Blair"]), encode, None, config
    )
    assert blair.forbidden_names == ("Anthony", "Charles", "Lynton")
    stricter = compile_target(
        target("wb", "Warren Buffett"), encode, None, GuardConfig(misspelt_name_min_chars=7)
    )
    assert stricter.forbidden_names == ("Buffett",)

    index = GuardIndex(revision=1, detector=None, compiled={"wb": buffett, "tb": blair})
    fired = index.decide(["wb", "tb"]).plan
    assert fired.forbidden_names == ("Warren", "Buffett", "Oracle", "Anthony", "Charles", "Lynton")
    matcher = ForbiddenMatcher(fired.forbidden_strings, fired.forbidden_words, fired.forbidden_names)
    assert matcher.contains("Warre Buffetti bought shares")
    # Nothing fired: only the registered strings are matched, so misspellings pass.
    quiet = index.decide([]).plan
    assert quiet.forbidden_names == ()
    assert not ForbiddenMatcher(quiet.forbidden_strings, quiet.forbidden_words).contains("Warre Buffetti")
    assert ForbiddenMatcher(quiet.forbidden_strings).contains("WARREN BUFFETT")
