"""Guarded generation on the tiny engine: a target first reached in the answer widens the plan by
resubmitting the accepted prefix, and the stream stays one consistent answer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gateway.guarding import CHECK_EVERY_CHARS, GuardTally, guarded_stream
from guards.compiler import GuardConfig, compile_target
from guards.index import GuardIndex
from guards.targets import Target
from models.engine import GenerationRequest, SamplingParams
from models.hf_engine import TransformersEngine


@dataclass(frozen=True)
class Fired:
    target_id: str


class AnswerOnlyDetector:
    """Fires the target on generated text only, never on the prompt: the case widening exists for."""

    def __init__(self, target_id: str) -> None:
        self.target_id = target_id
        self.checked: list[int] = []

    def detect_conversation(self, messages: list[str]) -> list[Fired]:
        return []

    def detect_generated(self, text: str) -> list[Fired]:
        self.checked.append(len(text))
        return [Fired(self.target_id)]


def test_a_target_reached_mid_answer_widens_the_plan(tiny_model_dir: Path) -> None:
    now = datetime.now(UTC)
    target = Target(id="t1", version=1, created_at=now, updated_at=now, name="Zebulon Quaxworth")

    async def run() -> tuple[list, GuardTally, AnswerOnlyDetector, TransformersEngine]:
        engine = TransformersEngine(tiny_model_dir)
        await engine.start()
        try:
            detector = AnswerOnlyDetector(target.id)
            compiled = {target.id: compile_target(target, engine.encode_text, None, GuardConfig())}
            index = GuardIndex(revision=1, detector=detector, compiled=compiled)
            decision = index.check_conversation(["Once upon a time"])
            assert not decision.fired
            request = GenerationRequest(
                "r",
                tuple(engine.encode_text("Once upon a time")),
                SamplingParams(max_tokens=80, temperature=0, ignore_eos=True),
                decision.plan,
            )
            tally = GuardTally()
            outputs = [o async for o in guarded_stream(engine, index, request, decision, tally)]
            return outputs, tally, detector, engine
        finally:
            await engine.shutdown()

    outputs, tally, detector, engine = asyncio.run(run())
    assert tally.target_ids == ("t1",)
    assert detector.checked and detector.checked[0] >= CHECK_EVERY_CHARS
    tokens = [t for o in outputs for t in o.token_ids]
    text = "".join(o.text for o in outputs)
    assert outputs[-1].finish_reason == "length"
    assert outputs[-1].completion_tokens == len(tokens) == 80
    # (an incomplete UTF-8 character left by the length limit is not text yet)
    assert engine.tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd") == text
    assert all(
        o.request_id == "r" and o.prompt_tokens == len(engine.encode_text("Once upon a time"))
        for o in outputs
    )
