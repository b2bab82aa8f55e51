"""Forget targets as operators register them: the wire and storage shape shared by the admin API,
the store and the guard compiler.

The strings a target forbids (its name, aliases and forbidden strings) are checked at the edge:
each must keep at least two letters or digits once case and accents are folded away, and none may
hold an invisible character (controls, NUL, zero-width or bidi-override characters). A string
that folds to nothing would match everywhere and empty every answer for every user. A stored
target (`Target`) is read back as it was stored, without these checks, so that one bad row of an
old or hand-edited database cannot hide the others: the guard compiler refuses it instead
(guards/compiler.py) and the gateway fails closed.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    field_validator,
)

from lethe.guards.names import normalize

Policy = Literal["steer", "refuse"]
"""`steer`: decode around the target silently; `refuse`: answer with a refusal template and stop."""

Suppression = Literal["both", "decoding", "sae"]
"""How a fired `steer` target is kept out of the answer: `decoding` restrictions (forbidden strings,
token bans, semantic penalty), the `sae` feature clamp inside the model (when the gateway serves an
SAE), or `both`. Detection is the same for all three."""

ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
LongText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=20_000)]

MIN_FOLDED_CHARS = 2
"""Letters or digits a forbidden string must keep after folding (guards.names.normalize)."""

_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})
"""Controls (NUL, tabs, newlines), format characters (zero-width spaces and joiners, bidi
embeddings, overrides and isolates, the byte-order mark, soft hyphens), lone surrogates,
private-use characters, and line and paragraph separators."""


def term_problem(text: str) -> str | None:
    """Why `text` cannot be a forbidden string (a name, alias, forbidden string or key term), or
    None when it can."""
    for char in text:
        if unicodedata.category(char) in _INVISIBLE_CATEGORIES:
            return f"contains the invisible or control character U+{ord(char):04X}; use plain visible text"
    folded = normalize(text)
    if sum(char.isalnum() for char in folded) < MIN_FOLDED_CHARS:
        return (
            f"must keep at least {MIN_FOLDED_CHARS} letters or digits once case and accents are "
            f"folded (it folds to {folded.strip()!r})"
        )
    return None


def _forbiddable(text: str) -> str:
    problem = term_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


Term = Annotated[ShortText, AfterValidator(_forbiddable)]
"""A name, alias or forbidden string as an operator sends it."""


class TargetFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    aliases: list[ShortText] = Field(default_factory=list, max_length=100)
    description: Annotated[str, StringConstraints(strip_whitespace=True, max_length=2_000)] = ""
    documents: list[LongText] = Field(default_factory=list, max_length=2_000)
    examples: list[
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2_000)]
    ] = Field(default_factory=list, max_length=1_000)
    forbidden: list[ShortText] = Field(default_factory=list, max_length=200)
    policy: Policy = "steer"
    suppression: Suppression = "both"
    enabled: bool = True

    @field_validator("aliases", "forbidden")
    @classmethod
    def _unique(cls, values: list[str]) -> list[str]:
        seen: dict[str, str] = {}
        for value in values:
            seen.setdefault(value.casefold(), value)
        return list(seen.values())


class TargetSpec(TargetFields):
    """What an operator registers (`POST /admin/targets`): forbidden strings checked, booleans
    strict (`"yes"` is not true)."""

    name: Term
    aliases: list[Term] = Field(default_factory=list, max_length=100)
    forbidden: list[Term] = Field(default_factory=list, max_length=200)
    enabled: StrictBool = True


class TargetPatch(BaseModel):
    """A partial update (`PATCH /admin/targets/{id}`): only the fields sent change."""

    model_config = ConfigDict(extra="forbid")

    name: Term | None = None
    aliases: list[Term] | None = Field(default=None, max_length=100)
    description: Annotated[str, StringConstraints(strip_whitespace=True, max_length=2_000)] | None = None
    documents: list[LongText] | None = Field(default=None, max_length=2_000)
    examples: (
        list[Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2_000)]] | None
    ) = Field(default=None, max_length=1_000)
    forbidden: list[Term] | None = Field(default=None, max_length=200)
    policy: Policy | None = None
    suppression: Suppression | None = None
    enabled: StrictBool | None = None


class Target(TargetSpec):
    """A stored target; `version` grows by one with every change to it. Read back without the
    edge's checks on forbidden strings (see the module's docstring)."""

    name: ShortText
    aliases: list[ShortText] = Field(default_factory=list, max_length=100)
    forbidden: list[ShortText] = Field(default_factory=list, max_length=200)
    enabled: bool = True
    id: str
    version: int
    created_at: datetime
    updated_at: datetime
