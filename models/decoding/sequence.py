"""What a client has been told about one sequence, shared by every engine.

Engines differ in how they produce the next token and in how they take tokens back (the
transformers engine drops the KV entries of a row; vLLM aborts and resubmits the accepted prefix),
but not in what a token means for the client: its text through the incremental detokenizer, the
end of the sequence (end-of-sequence token, stop string, length), the undo of a completed
forbidden string with a ban on the token that began it, and which tokens are final enough to report.
Keeping that here is what makes both engines answer the same for the same tokens.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from lethe.guards.forbidden import matcher_for
from lethe.models.decoding.detokenizer import Decoder, IncrementalDetokenizer
from lethe.models.decoding.logits_rules import PositionBans
from lethe.models.engine import FinishReason, GenerationOutput, GenerationRequest, TokenLogprob

MAX_ROLLBACKS = 64
"""Undone forbidden matches after which a sequence ends rather than keep searching for a way around."""


@dataclass(frozen=True)
class Advance:
    output: GenerationOutput
    undone: int = 0
    """Output tokens (the newest included) that this token made the engine take back."""


@dataclass
class SequenceProgress:
    request: GenerationRequest
    tokenizer: Decoder
    eos_ids: Collection[int]
    max_context: int
    detokenizer: IncrementalDetokenizer = field(init=False)
    position_bans: PositionBans = field(default_factory=PositionBans)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    reported: int = 0
    """Leading output tokens already sent to the consumer."""
    suppressed: int = 0
    suppressed_text: str = ""
    """Text undone since the last output was made."""
    rollbacks: int = 0

    def __post_init__(self) -> None:
        plan = self.request.plan
        self.detokenizer = IncrementalDetokenizer(
            self.tokenizer,
            self.request.sampling.stop,
            matcher_for(plan.forbidden_strings, plan.forbidden_words, plan.forbidden_names),
        )

    @property
    def last_token(self) -> int:
        """The token the next forward pass must be fed (the prompt's last one before any output)."""
        return self.output_ids[-1] if self.output_ids else self.request.prompt_ids[-1]

    def push(self, token: int, logprob: TokenLogprob | None = None) -> Advance:
        """Take one token produced by the engine; say what became final and what must be undone."""
        request = self.request
        self.output_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        finish: FinishReason | None = None
        undone = 0
        if token in self.eos_ids and not request.sampling.ignore_eos:
            finish = "stop"
            text = self.detokenizer.flush()
        else:
            step = self.detokenizer.push(token)
            text = step.text
            if step.violation is not None:
                undone = self._undo(step.violation)
                if self.rollbacks > MAX_ROLLBACKS:  # cornered: end with the text known to be clean
                    finish = "stop"
                    text = self.detokenizer.flush()
            elif self.detokenizer.stopped:
                finish = "stop"
            elif self.at_length():
                finish = "length"
                text += self.detokenizer.flush()
        return Advance(self._output(text, finish), undone)

    def at_length(self) -> bool:
        return (
            len(self.output_ids) >= self.request.sampling.max_tokens
            or len(self.request.prompt_ids) + len(self.output_ids) >= self.max_context
        )

    def finish(self, reason: FinishReason) -> GenerationOutput:
        """End the sequence where the engine stopped on its own (releasing any held-back text)."""
        return self._output(self.detokenizer.flush(), reason)

    def _output(self, text: str, finish: FinishReason | None) -> GenerationOutput:
        final = len(self.output_ids) if finish else self.detokenizer.final_tokens()
        start, self.reported = self.reported, max(self.reported, final)
        suppressed_text, self.suppressed_text = self.suppressed_text, ""
        return GenerationOutput(
            request_id=self.request.request_id,
            text=text,
            token_ids=tuple(self.output_ids[start : self.reported]),
            logprobs=tuple(self.logprobs[start : self.reported]),
            prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=len(self.output_ids),
            finish_reason=finish,
            suppressed_tokens=self.suppressed,
            suppressed_text=suppressed_text,
        )

    def _undo(self, first: int) -> int:
        """Forget the output from token `first` on, which began a forbidden string, and ban that
        token at that position (otherwise greedy decoding would choose it again forever)."""
        undone = len(self.output_ids) - first
        self.suppressed_text += self.tokenizer.decode(self.output_ids[first:], skip_special_tokens=True)
        self.position_bans.ban(first, self.output_ids[first])
        del self.output_ids[first:]
        del self.logprobs[first:]
        self.detokenizer.rollback(first)
        self.suppressed += undone
        self.rollbacks += 1
        return undone
