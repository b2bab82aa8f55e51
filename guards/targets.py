"""Forget targets as operators register them: the wire and storage shape shared by the admin API,
the store and the guard compiler."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

Policy = Literal["steer", "refuse"]
"""`steer`: decode around the target silently; `refuse`: answer with a refusal template and stop."""

ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
LongText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=20_000)]


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
    enabled: bool = True

    @field_validator("aliases", "forbidden")
    @classmethod
    def _unique(cls, values: list[str]) -> list[str]:
        seen: dict[str, str] = {}
        for value in values:
            seen.setdefault(value.casefold(), value)
        return list(seen.values())


class TargetSpec(TargetFields):
    """What an operator registers (`POST /admin/targets`)."""

    name: ShortText


class TargetPatch(BaseModel):
    """A partial update (`PATCH /admin/targets/{id}`): only the fields sent change."""

    model_config = ConfigDict(extra="forbid")

    name: ShortText | None = None
    aliases: list[ShortText] | None = Field(default=None, max_length=100)
    description: Annotated[str, StringConstraints(strip_whitespace=True, max_length=2_000)] | None = None
    documents: list[LongText] | None = Field(default=None, max_length=2_000)
    examples: (
        list[Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2_000)]] | None
    ) = Field(default=None, max_length=1_000)
    forbidden: list[ShortText] | None = Field(default=None, max_length=200)
    policy: Policy | None = None
    enabled: bool | None = None


class Target(TargetSpec):
    """A stored target; `version` grows by one with every change to it."""

    id: str
    version: int
    created_at: datetime
    updated_at: datetime
