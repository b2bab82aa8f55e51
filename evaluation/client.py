"""Sending probes to an OpenAI-compatible server, many at once.

Requests go out concurrently (bounded by `concurrency`) so that a continuous-batching server has
a full batch to work on; results come back in probe order whatever order they finish in.
Decoding is greedy with a fixed seed so that a rerun, or a peer server, answers the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from openai import NOT_GIVEN, APIError, AsyncOpenAI
from pydantic import BaseModel

from lethe.evaluation.records import Probe


class ServerError(RuntimeError):
    """The server cannot be evaluated as asked (e.g. it lists no model to default to)."""


class Completion(BaseModel):
    output: str
    finish_reason: str | None = None
    error: str | None = None
    response_id: str | None = None
    """The response's `id`: what Lethe's audit trail names the request by."""


class ChatClient:
    def __init__(self, base_url: str, api_key: str, *, timeout: float, seed: int) -> None:
        self._openai = AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=2)
        self._seed = seed

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._openai.close()

    async def default_model(self) -> str:
        """The first model the server lists: what a run evaluates when --model is not given."""
        page = await self._openai.models.list()
        if not page.data:
            raise ServerError("the server lists no models: pass --model")
        return page.data[0].id

    async def complete(self, model: str, probe: Probe) -> Completion:
        """One greedy chat completion; an API failure becomes a recorded error, not an exception.

        One failed probe must not throw away an hour of answers: the run goes on and reports
        how many failed.
        """
        try:
            response = await self._openai.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": probe.prompt}],
                temperature=0.0,
                top_p=1.0,
                seed=self._seed,
                max_tokens=probe.max_tokens,
                stop=list(probe.stop) or NOT_GIVEN,
            )
        except APIError as error:
            return Completion(output="", error=f"{type(error).__name__}: {error}")
        if not response.choices:
            return Completion(output="", error="the response has no choices")
        choice = response.choices[0]
        return Completion(
            output=choice.message.content or "", finish_reason=choice.finish_reason, response_id=response.id
        )

    async def complete_all(
        self,
        model: str,
        probes: Sequence[Probe],
        concurrency: int,
        on_done: Callable[[Probe, Completion], None] = lambda _probe, _completion: None,
    ) -> list[Completion]:
        gate = asyncio.Semaphore(concurrency)

        async def one(probe: Probe) -> Completion:
            async with gate:
                completion = await self.complete(model, probe)
            on_done(probe, completion)
            return completion

        return list(await asyncio.gather(*(one(probe) for probe in probes)))
