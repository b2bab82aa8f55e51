"""Layer hooks inside vLLM's worker process, installed through `collective_rpc` (eager mode only:
under torch.compile or CUDA graphs a forward hook silently never runs).

vLLM flattens the batch into one token axis and its decoder layers return `(hidden, residual)` with
the residual add fused into the next norm, so the residual stream a layer hook must see is
`hidden + residual`. The adaptor gives the hook what the Engine protocol promises, one request at a
time: the residual stream of that request's tokens in this forward pass as [1, tokens, hidden] and
its `GenerationRequest` (id and fired targets, which is what a feature clamp needs), and writes a
replacement back as `replacement - residual`, leaving vLLM's fused add intact.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cloudpickle
import torch

from lethe.guards.plan import GuardPlan
from lethe.models.engine import GenerationRequest, LayerHook, SamplingParams

REQUEST_ARGS_KEY = "lethe_request"
"""`SamplingParams.extra_args` entry with the gateway's request id, fired target ids and SAE clamp."""

_installed: dict[str, torch.utils.hooks.RemovableHandle] = {}


def _batch_rows(runner: Any) -> Iterator[tuple[int, int, GenerationRequest]]:
    count = runner.input_batch.num_reqs
    starts = runner.query_start_loc.np[: count + 1].tolist()
    for row, vllm_id in enumerate(runner.input_batch.req_ids[:count]):
        state = runner.requests[vllm_id]
        extra = (state.sampling_params.extra_args or {}).get(REQUEST_ARGS_KEY, {})
        request = GenerationRequest(
            request_id=extra.get("id", vllm_id),
            prompt_ids=tuple(state.prompt_token_ids or ()),
            sampling=SamplingParams(max_tokens=state.sampling_params.max_tokens or 0),
            plan=GuardPlan(
                target_ids=tuple(extra.get("target_ids", ())),
                sae_clamp=tuple((int(f), float(v)) for f, v in extra.get("sae_clamp", ())),
            ),
        )
        yield starts[row], starts[row + 1], request


def install(worker: Any, key: str, layer_index: int, pickled_hook: bytes) -> None:
    """Runs in the worker. The hook comes pickled by the caller: vLLM's own encoder would turn a
    dataclass hook into a plain dict on the way."""
    hook: LayerHook = cloudpickle.loads(pickled_hook)
    runner = worker.model_runner
    layer = runner.get_model().model.layers[layer_index]

    def forward_hook(module: torch.nn.Module, args: object, output: Any) -> Any:
        hidden, residual = output
        stream = hidden + residual
        changed = False
        for start, end, request in _batch_rows(runner):
            replaced = hook(stream[start:end].unsqueeze(0), [request])
            if replaced is not None:
                stream[start:end] = replaced[0]
                changed = True
        return (stream - residual, residual) if changed else None

    _installed[key] = layer.register_forward_hook(forward_hook)


def remove(worker: Any, key: str) -> None:
    handle = _installed.pop(key, None)
    if handle is not None:
        handle.remove()
