"""The transformers engine on a tiny random Llama: continuous batching, plans, hooks, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from guards.plan import GuardPlan
from models.engine import GenerationOutput, GenerationRequest, SamplingParams
from models.hf_engine import TransformersEngine


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[TransformersEngine]:
    engine = TransformersEngine(tiny_model_dir, max_batch_size=8)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    yield engine
    loop.run_until_complete(engine.shutdown())
    loop.close()


def request(
    engine: TransformersEngine, text: str, rid: str, plan: GuardPlan | None = None, **sampling: object
) -> GenerationRequest:
    params = SamplingParams(**{"max_tokens": 12, "temperature": 0.0, **sampling})  # type: ignore[arg-type]
    return GenerationRequest(rid, tuple(engine.encode_text(text)), params, plan or GuardPlan())


async def collect(stream: AsyncIterator[GenerationOutput]) -> list[GenerationOutput]:
    return [output async for output in stream]


def reference_greedy(engine: TransformersEngine, prompt: tuple[int, ...], steps: int) -> list[int]:
    assert engine.model is not None
    out = engine.model.generate(
        torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "A B C D E F G H I J K"]


def test_concurrent_greedy_matches_unbatched_generate(engine: TransformersEngine) -> None:
    """Requests that join a running batch at different steps decode exactly as they would alone."""
    requests = [
        request(engine, p, f"g{i}", max_tokens=40 - 8 * i, ignore_eos=True) for i, p in enumerate(PROMPTS)
    ]

    async def staggered(index: int, req: GenerationRequest) -> list[GenerationOutput]:
        await asyncio.sleep(0.01 * index)
        return await collect(engine.generate(req))

    async def run() -> list[list[GenerationOutput]]:
        return await asyncio.gather(*(staggered(i, r) for i, r in enumerate(requests)))

    results = asyncio.run(run())
    for req, outputs in zip(requests, results, strict=True):
        tokens = [t for o in outputs for t in o.token_ids]
        assert tokens == reference_greedy(engine, req.prompt_ids, req.sampling.max_tokens)
        assert outputs[-1].finish_reason == "length"
        assert outputs[-1].completion_tokens == req.sampling.max_tokens


def test_late_request_joins_running_batch(engine: TransformersEngine) -> None:
    """A request arriving mid-generation starts before the running one finishes (no head-of-line wait)."""
    order: list[str] = []

    async def consume(req: GenerationRequest, delay: float) -> None:
        await asyncio.sleep(delay)
        async for output in engine.generate(req):
            order.append(req.request_id + (":end" if output.finish_reason else ""))

    async def run() -> None:
        long = request(engine, "Once upon a time", "long", max_tokens=200, ignore_eos=True)
        short = request(engine, "Hello", "short", max_tokens=3, ignore_eos=True)
        await asyncio.gather(consume(long, 0), consume(short, 0.05))

    asyncio.run(run())
    assert order.index("short:end") < order.index("long:end")
    assert order.index("short") > order.index("long")


def test_seeded_sampling_is_reproducible(engine: TransformersEngine) -> None:
    def sample(seed: int) -> list[int]:
        req = request(
            engine, "Once upon a time", f"s{seed}", temperature=1.0, seed=seed, max_tokens=16, ignore_eos=True
        )
        return [t for o in asyncio.run(collect(engine.generate(req))) for t in o.token_ids]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_string_ends_generation_and_is_not_returned(engine: TransformersEngine) -> None:
    free = asyncio.run(
        collect(engine.generate(request(engine, "A B C D", "free", max_tokens=20, ignore_eos=True)))
    )
    text = "".join(o.text for o in free)
    assert len(text) > 6
    stop = text[3:6]
    stopped = asyncio.run(
        collect(
            engine.generate(request(engine, "A B C D", "stop", max_tokens=20, ignore_eos=True, stop=(stop,)))
        )
    )
    stopped_text = "".join(o.text for o in stopped)
    assert stopped[-1].finish_reason == "stop"
    assert stopped_text == text[: text.index(stop)]


def test_guard_plan_bans_sequences_at_every_step(engine: TransformersEngine) -> None:
    free = asyncio.run(
        collect(engine.generate(request(engine, "A B C D", "free", max_tokens=12, ignore_eos=True)))
    )
    tokens = [t for o in free for t in o.token_ids]
    banned = (tokens[2], tokens[3])
    plan = GuardPlan(target_ids=("t",), banned_sequences=(banned,))
    guarded = asyncio.run(
        collect(
            engine.generate(request(engine, "A B C D", "guarded", max_tokens=12, ignore_eos=True, plan=plan))
        )
    )
    guarded_tokens = [t for o in guarded for t in o.token_ids]
    assert guarded_tokens[:3] == tokens[:3]
    assert all(guarded_tokens[i : i + 2] != list(banned) for i in range(len(guarded_tokens) - 1))


def test_logprobs_are_normalised_and_include_the_chosen_token(engine: TransformersEngine) -> None:
    outputs = asyncio.run(collect(engine.generate(request(engine, "Hello", "lp", max_tokens=4, logprobs=3))))
    for output in outputs:
        (item,) = output.logprobs
        assert len(item.top) == 3
        assert item.top[0][0] == item.token_id  # greedy picks the most likely token
        assert item.logprob == pytest.approx(item.top[0][1])
        assert all(value <= 0 for _, value in item.top)


def test_layer_hook_sees_rows_and_changes_only_its_request(engine: TransformersEngine) -> None:
    seen: list[tuple[str, ...]] = []

    def hook(hidden: torch.Tensor, rows: object) -> torch.Tensor:
        ids = tuple(r.request_id for r in rows)  # type: ignore[attr-defined]
        seen.append(ids)
        for row, rid in enumerate(ids):
            if rid == "hooked":
                hidden = hidden.clone()
                hidden[row] = hidden[row] * -3.0
        return hidden

    baseline = request(engine, "Once upon a time", "plain", max_tokens=8, ignore_eos=True)
    expected = reference_greedy(engine, baseline.prompt_ids, 8)
    handle = engine.add_layer_hook(0, hook)
    try:

        async def run() -> list[list[GenerationOutput]]:
            hooked = request(engine, "Once upon a time", "hooked", max_tokens=8, ignore_eos=True)
            return await asyncio.gather(collect(engine.generate(baseline)), collect(engine.generate(hooked)))

        plain_out, hooked_out = asyncio.run(run())
    finally:
        handle.remove()
    assert [t for o in plain_out for t in o.token_ids] == expected
    assert [t for o in hooked_out for t in o.token_ids] != expected
    assert any({"plain", "hooked"} <= set(ids) for ids in seen)


def test_leaving_the_stream_cancels_the_sequence(engine: TransformersEngine) -> None:
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

    assert asyncio.run(run()) == (0, 0)


def _text_and_tokens(outputs: list[GenerationOutput]) -> tuple[str, list[int]]:
    return "".join(o.text for o in outputs), [t for o in outputs for t in o.token_ids]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_forbidden_string_is_undone_not_emitted(engine: TransformersEngine, prompt: str) -> None:
    """Only the text matcher guards here (no token bans), so each match must be rolled back."""
    free, _ = _text_and_tokens(
        asyncio.run(collect(engine.generate(request(engine, prompt, "f", max_tokens=40))))
    )
    words = [w for w in free.split() if len(w) >= 3]
    assert words, free
    forbidden = words[len(words) // 2].upper()  # case must not matter
    plan = GuardPlan(target_ids=("t",), forbidden_strings=(forbidden,))
    outputs = asyncio.run(collect(engine.generate(request(engine, prompt, "g", plan=plan, max_tokens=40))))
    text, tokens = _text_and_tokens(outputs)
    assert forbidden.lower() not in text.lower()
    assert outputs[-1].suppressed_tokens > 0
    assert engine.tokenizer.decode(tokens, skip_special_tokens=True).startswith(text)
    assert outputs[-1].completion_tokens == len(tokens)
    # Before the token where the first match began, the guarded answer is the free one.
    head = free[: free.lower().index(forbidden.lower())].rstrip()
    assert text.startswith(head)
