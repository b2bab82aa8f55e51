"""Per-sequence logits rules, one small class per rule, composed in order (as transformers'
`generation/logits_process.py` does, but per sequence: rows of a continuous batch have different
parameters and different histories)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch

from lethe.guards.enforcement import SequenceBans
from lethe.guards.plan import GuardPlan
from lethe.models.engine import SamplingParams


def forbid(logits: torch.Tensor, token_ids: Iterable[int]) -> torch.Tensor:
    """A copy of `logits` in which `token_ids` can never be chosen."""
    ids = sorted(token_ids)
    if not ids:
        return logits
    logits = logits.clone()
    logits[torch.tensor(ids, dtype=torch.long)] = -torch.inf
    return logits


class LogitsRule(Protocol):
    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """Return adjusted logits [vocab] for the next token given the tokens produced so far."""


class PresenceFrequencyPenalty:
    """OpenAI's penalties: subtract `presence` once and `frequency` per occurrence of each generated token."""

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence = presence
        self.frequency = frequency

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if not output_ids:
            return logits
        counts = Counter(output_ids)
        ids = torch.tensor(list(counts), dtype=torch.long)
        occurrences = torch.tensor(list(counts.values()), dtype=logits.dtype)
        logits = logits.clone()
        logits[ids] -= self.presence + self.frequency * occurrences
        return logits


class BanTokens:
    """Forbid fixed tokens (end-of-sequence while `ignore_eos` asks for a fixed length)."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = frozenset(token_ids)

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        return forbid(logits, self.token_ids)


class GuardPlanRule:
    """Apply a request's guard plan: never complete one of its banned token sequences."""

    def __init__(self, plan: GuardPlan) -> None:
        self.bans = SequenceBans(plan.banned_sequences)

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        return forbid(logits, self.bans.next_tokens(output_ids))


class SemanticPenalty:
    """Push down tokens close in meaning to a fired target's content: one indexed subtraction a step."""

    def __init__(self, token_ids: Sequence[int], penalty: float) -> None:
        self.token_ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long)
        self.penalty = penalty

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[self.token_ids] -= self.penalty
        return logits


class PositionBans:
    """Tokens banned at one output position: where an undone forbidden match started, the token
    that began it may not be chosen again (otherwise greedy decoding would repeat it forever)."""

    def __init__(self) -> None:
        self.banned: dict[int, set[int]] = {}

    def ban(self, position: int, token_id: int) -> None:
        self.banned = {p: tokens for p, tokens in self.banned.items() if p <= position}
        self.banned.setdefault(position, set()).add(token_id)

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        return forbid(logits, self.banned.get(len(output_ids), ()))


class Temperature:
    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature


class TopP:
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`."""

    def __init__(self, top_p: float) -> None:
        self.top_p = top_p

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= self.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        return logits.masked_fill(drop, -torch.inf)


class SequenceSampler:
    """Everything that turns one row's logits into its next token."""

    def __init__(
        self,
        sampling: SamplingParams,
        plan: GuardPlan,
        eos_token_ids: Sequence[int],
        position_bans: PositionBans,
    ) -> None:
        rules: list[LogitsRule] = [position_bans]
        if plan.banned_sequences:
            rules.append(GuardPlanRule(plan))
        if plan.penalized_tokens and plan.penalty:
            rules.append(SemanticPenalty(plan.penalized_tokens, plan.penalty))
        if sampling.ignore_eos and eos_token_ids:
            rules.append(BanTokens(eos_token_ids))
        if sampling.presence_penalty or sampling.frequency_penalty:
            rules.append(PresenceFrequencyPenalty(sampling.presence_penalty, sampling.frequency_penalty))
        self.greedy = sampling.temperature == 0 or sampling.top_p == 0
        if not self.greedy:
            if sampling.temperature != 1.0:
                rules.append(Temperature(sampling.temperature))
            if sampling.top_p < 1.0:
                rules.append(TopP(sampling.top_p))
        self.rules = rules
        self.generator = torch.Generator()
        if sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(sampling.seed)

    def next_token(self, output_ids: Sequence[int], logits: torch.Tensor) -> int:
        for rule in self.rules:
            logits = rule(output_ids, logits)
        if not torch.isfinite(logits).any():
            raise ValueError("every token is banned at this position")
        if self.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
