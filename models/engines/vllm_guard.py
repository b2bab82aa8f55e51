"""The guard plan inside vLLM: one batch-level V1 logits processor, registered at engine start.

vLLM builds logits processors once per engine in the worker process and tells them how the
persistent batch changes (requests added, removed, moved). Per-request data therefore arrives
through `SamplingParams.extra_args`, as small serialisable data (`GuardArgs`): the plan's banned
token sequences and semantic penalty, the tokens banned at given output positions by earlier undos,
and how many accepted output tokens a resubmission carries at the end of its prompt (a banned
sequence may straddle that boundary, and positions count from the original answer's start).

Only rows with guard arguments cost anything per step; the others are not touched, which keeps an
unguarded request's greedy tokens identical to a plain vLLM run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from lethe.guards.enforcement import SequenceBans

EXTRA_ARGS_KEY = "lethe_guard"


class GuardArgs(BaseModel):
    """What one vLLM request carries for the guard; positions count output tokens of the answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    banned_sequences: tuple[tuple[int, ...], ...] = ()
    penalized_tokens: tuple[int, ...] = ()
    penalty: float = Field(default=0.0, ge=0.0)
    always_banned: tuple[int, ...] = Field(
        default=(), description="Tokens never allowed (end-of-sequence tokens under ignore_eos)."
    )
    position_bans: dict[int, tuple[int, ...]] = Field(
        default_factory=dict, description="Output position -> tokens banned there (from undone matches)."
    )
    resubmitted: int = Field(
        default=0, ge=0, description="Accepted output tokens appended to the prompt of this resubmission."
    )

    def is_empty(self) -> bool:
        return not (
            self.banned_sequences
            or (self.penalized_tokens and self.penalty)
            or self.always_banned
            or self.position_bans
        )


@dataclass
class _Row:
    args: GuardArgs
    bans: SequenceBans
    answer_prefix: tuple[int, ...]
    output: list[int]
    """vLLM's live list of this request's output tokens (it grows in place)."""
    penalized: torch.Tensor | None

    def banned(self) -> set[int]:
        history = [*self.answer_prefix, *self.output]
        banned = self.bans.next_tokens(history)
        banned.update(self.args.always_banned)
        banned.update(self.args.position_bans.get(len(history), ()))
        return banned


def guard_args(params: SamplingParams) -> GuardArgs | None:
    raw = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
    return None if raw is None else GuardArgs.model_validate(raw)


class GuardLogitsProcessor(LogitsProcessor):
    """Bans the tokens that would complete a banned sequence and applies the semantic penalty."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        self.rows: dict[int, _Row] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        try:
            guard_args(sampling_params)
        except ValidationError as error:
            raise ValueError(f"invalid {EXTRA_ARGS_KEY} extra_args: {error}") from error

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_row)

    def _new_row(
        self, params: SamplingParams, prompt_ids: Sequence[int] | None, output_ids: list[int]
    ) -> _Row | None:
        args = guard_args(params)
        if args is None or args.is_empty():
            return None
        prefix = ()
        if prompt_ids and args.resubmitted:
            prefix = tuple(prompt_ids[len(prompt_ids) - args.resubmitted :])
        penalized = None
        if args.penalized_tokens and args.penalty:
            penalized = torch.tensor(sorted(set(args.penalized_tokens)), dtype=torch.long, device=self.device)
        bans = SequenceBans(args.banned_sequences)
        return _Row(args=args, bans=bans, answer_prefix=prefix, output=output_ids, penalized=penalized)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, row in self.rows.items():
            if row.penalized is not None:
                logits[index, row.penalized] -= row.args.penalty
            if banned := row.banned():
                ids = torch.tensor(sorted(banned), dtype=torch.long, device=logits.device)
                logits[index, ids] = -torch.inf
        return logits
