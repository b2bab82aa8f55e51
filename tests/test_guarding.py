"""Guarded generation on the tiny engine: a target first reached in the answer widens the plan by
resubmitting the accepted prefix, and the stream stays one consistent answer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from lethe.gateway.runtime.guarded_generation import CHECK_EVERY_CHARS, GuardTally, guarded_stream
from lethe.guards.compiler import compile_target
from lethe.guards.config import GuardConfig
from lethe.guards.index import GuardIndex
from lethe.guards.targets import Target
from lethe.models.engine import GenerationRequest, SamplingParams
from lethe.models.engines.hf_engine import TransformersEngine


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


class NamedInTextDetector(AnswerOnlyDetector):
    """Fires the target only when the text it reads spells the target's name."""

    def __init__(self, target_id: str, name: str) -> None:
        super().__init__(target_id)
        self.name = name.casefold()

    def detect_generated(self, text: str) -> list[Fired]:
        self.checked.append(len(text))
        return [Fired(self.target_id)] if self.name in text.casefold() else []


def test_an_undone_name_fires_its_target_at_once(tiny_model_dir: Path) -> None:
    """A prompt that missed the target, then an answer that spells its name: the engine undoes the
    name (registered strings are forbidden everywhere) and the undone text fires the target long
    before the next periodic check, so the rest of the answer is under the target's plan."""
    prompt = "Once upon a time"

    async def run() -> tuple[str, list, GuardTally, NamedInTextDetector, str]:
        engine = TransformersEngine(tiny_model_dir)
        await engine.start()
        try:
            prompt_ids = tuple(engine.encode_text(prompt))
            sampling = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
            plain = [o async for o in engine.generate(GenerationRequest("plain", prompt_ids, sampling))]
            tokens = [t for o in plain for t in o.token_ids]
            # The tiny model's own words: the first alphabetic token after a few of its answer.
            name = next(
                piece.strip()
                for piece in (engine.decode_token(t) for t in tokens[2:])
                if piece.strip().isalpha() and len(piece.strip()) >= 3
            )
            now = datetime.now(UTC)
            target = Target(id="t1", version=1, created_at=now, updated_at=now, name=name)
            detector = NamedInTextDetector(target.id, name)
            compiled = {target.id: compile_target(target, engine.encode_text, None, GuardConfig())}
            index = GuardIndex(revision=1, detector=detector, compiled=compiled)
            decision = index.check_conversation([prompt])
            assert not decision.fired
            tally = GuardTally()
            request = GenerationRequest("r", prompt_ids, sampling, decision.plan)
            outputs = [o async for o in guarded_stream(engine, index, request, decision, tally)]
            return name, outputs, tally, detector, "".join(o.text for o in plain)
        finally:
            await engine.shutdown()

    name, outputs, tally, detector, plain_text = asyncio.run(run())
    assert name.casefold() in plain_text.casefold()
    assert tally.target_ids == ("t1",)
    assert tally.suppressed_tokens >= 1
    assert detector.checked[0] < CHECK_EVERY_CHARS  # fired by the undo, not by the periodic check
    text = "".join(o.text for o in outputs)
    assert name.casefold() not in text.casefold()
    assert outputs[-1].completion_tokens == 40
