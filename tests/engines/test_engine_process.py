"""The child-process engine on its own (its contract is tests/test_engine_contract.py, `hf-process`):
what a dead child does to requests in flight and to later ones, and the layer-hook channel."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from lethe.guards.plan import GuardPlan
from lethe.models.engine import (
    EngineError,
    EngineUnavailable,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
)
from lethe.models.engines.engine_process import ProcessEngine, decode_output, encode_output
from lethe.models.sae.clamp import FeatureClamp
from tests.support.sae import random_sae


def test_outputs_cross_the_channel_unchanged() -> None:
    output = GenerationOutput(
        request_id="r",
        text="caf\u00e9",
        token_ids=(1, 2),
        logprobs=(TokenLogprob(1, -0.5, ((1, -0.5), (7, -1.0))), TokenLogprob(2, -0.1)),
        prompt_tokens=3,
        completion_tokens=2,
        finish_reason="length",
        suppressed_tokens=4,
        suppressed_text="Paris",
    )
    assert decode_output("r", encode_output(output)) == output


def _hidden_doubler(hidden, rows):
    return hidden * 2.0


def test_killed_child_fails_requests_in_flight_and_refuses_new_ones(tiny_model_dir: Path) -> None:
    async def run() -> None:
        engine = ProcessEngine(tiny_model_dir, max_batch_size=4, torch_threads=1)
        await engine.start()
        try:
            assert engine.is_healthy()
            handle = await engine.add_layer_hook(0, _hidden_doubler)
            await handle.remove()
            prompt = tuple(engine.encode_text("Once upon a time"))
            params = SamplingParams(max_tokens=1900, temperature=0.0, ignore_eos=True)

            async def consume(rid: str) -> BaseException | None:
                try:
                    async for _ in engine.generate(GenerationRequest(rid, prompt, params)):
                        pass
                except EngineError as error:
                    return error
                return None

            tasks = [asyncio.create_task(consume(f"r{i}")) for i in range(3)]
            while engine.load()[0] < 3:
                await asyncio.sleep(0.01)
            os.kill(engine.pid, signal.SIGKILL)
            killed = time.monotonic()
            errors = await asyncio.wait_for(asyncio.gather(*tasks), 10)
            assert time.monotonic() - killed < 5
            assert all(isinstance(error, EngineUnavailable) for error in errors), errors
            assert not engine.is_healthy()
            assert engine.load() == (0, 0)
            with pytest.raises(EngineUnavailable):
                async for _ in engine.generate(GenerationRequest("late", prompt, params)):
                    pass
            with pytest.raises(EngineUnavailable):
                await engine.add_layer_hook(0, _hidden_doubler)
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_a_hook_of_many_megabytes_crosses_a_non_blocking_channel(tiny_model_dir: Path) -> None:
    """Under uvloop (what `lethe serve` runs) the pipe's end is non-blocking; a hook carrying an SAE
    of tens of megabytes must still arrive whole, and the engine keep answering afterwards."""
    uvloop = pytest.importorskip("uvloop")

    async def run() -> list[int]:
        engine = ProcessEngine(tiny_model_dir, max_batch_size=4, torch_threads=1)
        await engine.start()
        try:
            sae = random_sae(64, 60_000, layer=1)  # ~31 MB of weights
            handle = await engine.add_layer_hook(1, FeatureClamp(sae))
            prompt = tuple(engine.encode_text("Once upon a time"))
            params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            request = GenerationRequest("big", prompt, params, GuardPlan(sae_clamp=((0, -3.0),)))
            tokens = [t async for output in engine.generate(request) for t in output.token_ids]
            await handle.remove()
            return tokens
        finally:
            await engine.shutdown()

    assert len(uvloop.run(run())) == 4
