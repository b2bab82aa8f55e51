"""The guard index: one immutable, compiled view of every registered target.

A new index is built whenever the targets change and swapped in whole (copy-on-write): a request
keeps the index it started with, and the next request sees the new one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from lethe.guards.compiler import CompiledTarget, Vocabulary, compile_target, plan_for
from lethe.guards.config import GuardConfig
from lethe.guards.features import TargetFeatures
from lethe.guards.plan import GuardPlan
from lethe.guards.targets import Target

logger = logging.getLogger(__name__)


class Fired(Protocol):
    target_id: str


class Detector(Protocol):
    def detect_conversation(self, messages: Sequence[str]) -> Sequence[Fired]: ...

    def detect_generated(self, text: str) -> Sequence[Fired]: ...


@dataclass(frozen=True)
class Decision:
    """What a request must obey: the plan for the fired targets, or a refusal."""

    plan: GuardPlan
    target_ids: tuple[str, ...]
    refuse: bool

    @property
    def fired(self) -> bool:
        return bool(self.target_ids)


NOTHING_FIRED = Decision(GuardPlan(), (), refuse=False)


class TargetsUnenforceable(RuntimeError):
    """The index holds enabled targets it could not compile: no request may be answered under it
    (fail closed), because detection cannot tell whether a request touches one of them."""

    def __init__(self, reasons: dict[str, str]) -> None:
        super().__init__(f"{len(reasons)} enabled target(s) cannot be enforced: {sorted(reasons)}")
        self.target_ids = tuple(sorted(reasons))


@dataclass(frozen=True)
class GuardIndex:
    revision: int
    detector: Detector | None
    compiled: dict[str, CompiledTarget] = field(default_factory=dict)
    config: GuardConfig = field(default_factory=GuardConfig)
    unenforceable: dict[str, str] = field(default_factory=dict)
    """Enabled targets that failed to compile, with the reason (for the log, never for users)."""

    @cached_property
    def registered_strings(self) -> tuple[str, ...]:
        """Every enabled target's name, aliases and explicit forbidden strings.

        These are matched on every answer, fired or not: detection decides how hard to steer, but
        a registered string must never reach a client even when detection missed the prompt.
        Matching only holds text back and undoes a completed match, so an answer that never
        spells one is decoded exactly as without the guard."""
        return tuple(dict.fromkeys(s for t in self.compiled.values() for s in t.forbidden_strings))

    @classmethod
    def build(
        cls,
        revision: int,
        targets: Sequence[Target],
        build_detector: Callable[[Sequence[Target]], Detector],
        encode: Callable[[str], list[int]],
        vocabulary: Vocabulary | None,
        config: GuardConfig,
        features: Mapping[str, TargetFeatures] | None = None,
    ) -> GuardIndex:
        """Compile every enabled target. One that fails to compile (a string that folds to nothing,
        from a store edited by hand) is left out of detection and matching and recorded in
        `unenforceable`, which makes every decision under this index fail (fail closed) until the
        operator fixes or deletes it; the other targets still compile, and the admin API works.
        `features` maps target ids to their SAE features under the served SAE (current versions only)."""
        features = features or {}
        compiled: dict[str, CompiledTarget] = {}
        unenforceable: dict[str, str] = {}
        for target in (t for t in targets if t.enabled):
            try:
                compiled[target.id] = compile_target(
                    target, encode, vocabulary, config, features.get(target.id)
                )
            except Exception as error:
                unenforceable[target.id] = str(error)
                logger.error(
                    "target %s cannot be enforced, so no request is answered until it is fixed or "
                    "deleted (PATCH or DELETE /admin/targets/%s): %s",
                    target.id,
                    target.id,
                    error,
                )
        enforceable = [t for t in targets if t.id in compiled]
        return cls(
            revision=revision,
            detector=build_detector(enforceable) if enforceable else None,
            compiled=compiled,
            config=config,
            unenforceable=unenforceable,
        )

    def decide(self, fired_ids: Sequence[str]) -> Decision:
        if self.unenforceable:
            raise TargetsUnenforceable(self.unenforceable)
        fired = [self.compiled[i] for i in dict.fromkeys(fired_ids) if i in self.compiled]
        plan = plan_for(fired, self.config)
        everywhere = self.registered_strings
        if everywhere:
            plan = plan.model_copy(update={"forbidden_strings": everywhere})
        return Decision(
            plan=plan,
            target_ids=tuple(t.target_id for t in fired),
            refuse=any(t.policy == "refuse" for t in fired),
        )

    def check_conversation(self, messages: Sequence[str]) -> Decision:
        if self.detector is None:
            return self.decide(())
        return self.decide([d.target_id for d in self.detector.detect_conversation(messages)])

    def check_generated(self, text: str) -> Decision:
        if self.detector is None:
            return self.decide(())
        return self.decide([d.target_id for d in self.detector.detect_generated(text)])
