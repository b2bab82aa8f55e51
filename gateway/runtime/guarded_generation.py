"""Guarded generation for one choice: the plan applied by the engine, detection on the answer as it
grows, the refuse policy, and the audit record of what fired."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from lethe.gateway.runtime.guard_runtime import GuardRuntime
from lethe.guards.index import Decision, GuardIndex
from lethe.models.engine import Engine, GenerationOutput, GenerationRequest

CHECK_EVERY_CHARS = 160
"""Detection reruns on the answer each time it has grown by this much text."""


@dataclass
class GuardTally:
    """What happened to one choice, for the audit trail."""

    target_ids: tuple[str, ...] = ()
    suppressed_tokens: int = 0
    refused: bool = False


async def refusal_stream(
    request: GenerationRequest, text: str, completion_tokens: int
) -> AsyncIterator[GenerationOutput]:
    """The refuse policy's answer, shaped like an engine's output so every endpoint can send it."""
    yield GenerationOutput(
        request_id=request.request_id,
        text=text,
        token_ids=(),
        logprobs=(),
        prompt_tokens=len(request.prompt_ids),
        completion_tokens=completion_tokens,
        finish_reason="stop",
    )


async def guarded_stream(
    engine: Engine, index: GuardIndex, request: GenerationRequest, decision: Decision, tally: GuardTally
) -> AsyncIterator[GenerationOutput]:
    """Generate under `decision`'s plan; if the answer itself starts touching another target, carry on
    from the text already sent with that target's restrictions added (abort and resubmit the
    accepted prefix, which both engines can do). The answer is read every `CHECK_EVERY_CHARS` and
    whenever the engine undid a forbidden string in it."""
    tally.target_ids = decision.target_ids
    prompt_tokens = len(request.prompt_ids)
    accepted: list[int] = []
    text = ""
    checked = 0
    suppressed_before = 0
    offset = 0  # tokens accepted before the current (re)submission
    current = request
    while True:
        widened: Decision | None = None
        last: GenerationOutput | None = None
        async for output in engine.generate(current):
            last = output
            accepted += output.token_ids
            text += output.text
            tally.suppressed_tokens = suppressed_before + output.suppressed_tokens
            yield replace(
                output,
                request_id=request.request_id,
                prompt_tokens=prompt_tokens,
                completion_tokens=offset + output.completion_tokens,
                suppressed_tokens=tally.suppressed_tokens,
            )
            if output.finish_reason is not None:
                return
            # Text the engine undid (it spelled a registered name) is the answer reaching for a
            # target: read it with the rest, so that target fires even when the prompt missed it.
            if index.detector is not None and (
                output.suppressed_text or len(text) - checked >= CHECK_EVERY_CHARS
            ):
                checked = len(text)
                found = await GuardRuntime.check_generated(index, text + output.suppressed_text)
                new_ids = [t for t in found.target_ids if t not in tally.target_ids]
                if new_ids:
                    widened = index.decide([*tally.target_ids, *new_ids])
                    break
        if widened is None:
            return
        tally.target_ids = widened.target_ids
        suppressed_before = tally.suppressed_tokens
        offset = len(accepted)
        remaining = request.sampling.max_tokens - len(accepted)
        if widened.refuse or remaining <= 0 or last is None:
            tally.refused = widened.refuse
            yield replace(
                last,
                text="",
                token_ids=(),
                logprobs=(),
                completion_tokens=len(accepted),
                finish_reason="stop",
            )
            return
        current = replace(
            request,
            request_id=f"{request.request_id}-w{len(accepted)}",
            prompt_ids=(*request.prompt_ids, *accepted),
            sampling=replace(request.sampling, max_tokens=remaining),
            plan=widened.plan,
        )
