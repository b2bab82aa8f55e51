"""The transformers engine in a child process: the model, the scheduler and the guard plan's
per-step rules run there; tokenising, detection and HTTP stay in the gateway's process.

Why a process: in-process, torch's OpenMP threads and the scheduler thread compete with the event
loop for the cores and the interpreter lock, which slows every decode step; and a fault in the
model (OOM, a native crash, kill -9) takes the whole gateway down. Here the child owns its cores
(`torch_threads`, default: all this process may use) and the gateway's torch runs single-threaded
(`lethe serve` sets that); when the child dies, every request in flight ends with
`EngineUnavailable` (a 503 for clients) and the gateway's switcher starts a new engine on the same
checkpoint (gateway/runtime/switcher.py).

The child runs an unchanged `TransformersEngine`, including `SequenceProgress` (stop strings,
forbidden-string hold-back and the in-place undo of a forbidden match), because an undo drops KV
entries before the next decode step: deciding it in the gateway would cost a round trip per step.
Its increments cross as finished `GenerationOutput`s.

Channel: one `multiprocessing` pipe (a Unix socket pair), pickled tuples. Measured on this machine
(8 increments, one decode step's worth): pickled tuples 38 us to encode and decode, msgpack via
msgspec 20 us, pickled dataclasses 112 us; a round trip 70 us over the pipe, 78 us over ZeroMQ
IPC. A decode step takes tens of milliseconds, so either is noise; the pipe needs no dependency
beyond the standard library, and the child sends each step's outputs as one message. The gateway
reads the pipe from its event loop (`add_reader`), without a thread of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from lethe.models.engine import (
    EngineError,
    EngineUnavailable,
    GenerationOutput,
    GenerationRequest,
    HookHandle,
    LayerHook,
    TokenLogprob,
)
from lethe.models.tokenization import TokenizerMethods

logger = logging.getLogger(__name__)

_PICKLE = pickle.HIGHEST_PROTOCOL
_PRELOAD = "lethe.models.engines.hf_engine"
"""Imported once by multiprocessing's fork server (torch and transformers with it), so that each
engine process, the first and every restart, is forked with them already imported: a restart
costs the model's load, not seconds of imports."""
EncodedOutput = tuple[Any, ...]


def encode_output(output: GenerationOutput) -> EncodedOutput:
    """A `GenerationOutput` as plain tuples (a third of the cost of pickling the dataclasses)."""
    return (
        output.text,
        output.token_ids,
        tuple((item.token_id, item.logprob, item.top) for item in output.logprobs),
        output.prompt_tokens,
        output.completion_tokens,
        output.finish_reason,
        output.suppressed_tokens,
        output.suppressed_text,
    )


def decode_output(request_id: str, encoded: EncodedOutput) -> GenerationOutput:
    text, token_ids, logprobs, prompt_tokens, completion_tokens, finish, suppressed, suppressed_text = encoded
    return GenerationOutput(
        request_id=request_id,
        text=text,
        token_ids=token_ids,
        logprobs=tuple(TokenLogprob(token_id, logprob, top) for token_id, logprob, top in logprobs),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason=finish,
        suppressed_tokens=suppressed,
        suppressed_text=suppressed_text,
    )


@dataclass(frozen=True)
class ChildSpec:
    """What the child needs to build its engine (pickled into the spawned process)."""

    model_path: Path
    model_name: str
    max_batch_size: int
    max_prefill_tokens: int
    torch_threads: int
    log_level: int


# ------------------------------------------------------------------------------------ the child
class _EngineServer:
    """The child's side: a `TransformersEngine` driven by messages from the gateway.

    The main thread reads requests off the pipe; the engine's scheduler thread produces outputs,
    collects one step's worth in `pending` and sends them as one message from `step_done`."""

    def __init__(self, engine: Any, conn: Connection) -> None:
        self.engine = engine
        self.conn = conn
        self.send_lock = threading.Lock()
        self.pending: list[tuple[int, EncodedOutput | None, str | None]] = []
        self.sequences: dict[int, Any] = {}
        self.hooks: dict[str, Any] = {}
        engine.step_done = self.flush

    def send(self, message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message, _PICKLE)
        with self.send_lock:
            self.conn.send_bytes(data)

    def sink_for(self, sid: int) -> Any:
        def sink(item: GenerationOutput | BaseException) -> None:
            if isinstance(item, BaseException):
                self.sequences.pop(sid, None)
                self.pending.append((sid, None, f"{type(item).__name__}:{item}"))
                return
            if item.finish_reason is not None:
                self.sequences.pop(sid, None)
            self.pending.append((sid, encode_output(item), None))

        return sink

    def flush(self) -> None:
        if self.pending:
            batch, self.pending = self.pending, []
            with contextlib.suppress(OSError):  # the gateway went away: the main thread exits
                self.send(("outputs", batch))

    def serve(self) -> None:
        while True:
            try:
                message = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                logger.info("the gateway closed the engine channel; stopping")
                return
            kind = message[0]
            if kind == "generate":
                _, sid, request = message
                try:
                    self.sequences[sid] = self.engine.submit(request, self.sink_for(sid))
                except EngineError as error:
                    self.send(("outputs", [(sid, None, f"{type(error).__name__}:{error}")]))
            elif kind == "cancel":
                sequence = self.sequences.pop(message[1], None)
                if sequence is not None:
                    sequence.cancelled = True
            elif kind == "add_hook":
                _, key, layer_index, payload = message
                try:
                    self.hooks[key] = self.engine.install_layer_hook(layer_index, pickle.loads(payload))
                    self.send(("hook", key, None))
                except Exception as error:  # reported to the caller of add_layer_hook
                    self.send(("hook", key, f"{type(error).__name__}: {error}"))
            elif kind == "remove_hook":
                handle = self.hooks.pop(message[1], None)
                if handle is not None:
                    handle.handle.remove()
                self.send(("hook", message[1], None))
            elif kind == "shutdown":
                return


def serve_engine(conn: Connection, spec: ChildSpec) -> None:
    """The child process's entry point: load, say ready, serve until told to stop or orphaned."""
    logging.basicConfig(
        level=spec.log_level, format="%(asctime)s %(levelname)s %(name)s [engine process]: %(message)s"
    )
    import torch

    torch.set_num_threads(spec.torch_threads)
    from lethe.models.engines.hf_engine import TransformersEngine

    engine = TransformersEngine(
        spec.model_path,
        model_name=spec.model_name,
        max_batch_size=spec.max_batch_size,
        max_prefill_tokens=spec.max_prefill_tokens,
    )
    try:
        engine.start_blocking()
    except BaseException as error:
        conn.send_bytes(pickle.dumps(("failed", f"{type(error).__name__}: {error}"), _PICKLE))
        return
    server = _EngineServer(engine, conn)
    server.send(("ready", engine.max_context, engine.vocab_size))
    try:
        server.serve()
    finally:
        engine.step_done = None
        engine.shutdown_blocking()


# ------------------------------------------------------------------------------------ the gateway
@dataclass
class _Stream:
    request_id: str
    queue: asyncio.Queue[GenerationOutput | BaseException] = field(default_factory=asyncio.Queue)
    started: bool = False


@dataclass(frozen=True)
class _ProcessHook:
    engine: ProcessEngine
    key: str

    async def remove(self) -> None:
        await self.engine._remove_hook(self.key)


_ERRORS: dict[str, type[EngineError]] = {"EngineUnavailable": EngineUnavailable}


class ProcessEngine(TokenizerMethods):
    """Engine protocol implementation: a `TransformersEngine` in a spawned child process."""

    def __init__(
        self,
        model_path: Path,
        model_name: str | None = None,
        max_batch_size: int = 16,
        max_prefill_tokens: int = 4096,
        torch_threads: int | None = None,
        start_timeout: float = 600.0,
    ) -> None:
        self.model_path = Path(model_path)
        self.model_name = model_name or self.model_path.name
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.torch_threads = torch_threads or len(os.sched_getaffinity(0))
        self.start_timeout = start_timeout
        self.max_context = 0
        self.vocab_size = 0
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count()
        self._hooks: dict[str, asyncio.Future[None]] = {}
        self._ready = False
        self._dead = False
        self._stopping = False

    @property
    def pid(self) -> int | None:
        """The child's process id (tests kill it)."""
        return self._process.pid if self._process is not None else None

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        from transformers import AutoTokenizer

        self._loop = asyncio.get_running_loop()
        self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_path)
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([_PRELOAD])
        parent, child = context.Pipe(duplex=True)
        spec = ChildSpec(
            model_path=self.model_path,
            model_name=self.model_name,
            max_batch_size=self.max_batch_size,
            max_prefill_tokens=self.max_prefill_tokens,
            torch_threads=self.torch_threads,
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        process = context.Process(target=serve_engine, args=(child, spec), name="lethe-engine", daemon=True)
        await asyncio.to_thread(process.start)
        child.close()  # only the child holds its end now: its death reads as end-of-file here
        self._process, self._conn = process, parent
        try:
            first = await asyncio.to_thread(self._wait_ready)
        except BaseException:
            await self._stop_process()
            raise
        if first[0] != "ready":
            await self._stop_process()
            raise EngineError(f"the engine process failed to start: {first[1]}")
        _, self.max_context, self.vocab_size = first
        self._ready = True
        self._loop.add_reader(parent.fileno(), self._readable)
        logger.info("engine process %d serving %s", process.pid, self.model_path)

    def _wait_ready(self) -> tuple[Any, ...]:
        assert self._conn is not None and self._process is not None
        remaining = self.start_timeout
        while remaining > 0:
            if self._conn.poll(0.5):
                try:
                    return pickle.loads(self._conn.recv_bytes())
                except (EOFError, OSError):
                    break
            if not self._process.is_alive():
                break
            remaining -= 0.5
        else:
            raise EngineError(f"the engine process did not start within {self.start_timeout:.0f} s")
        self._process.join(5)
        raise EngineError(f"the engine process exited while starting (exit code {self._process.exitcode})")

    async def shutdown(self) -> None:
        self._stopping = True
        if self._conn is not None and not self._dead:
            with contextlib.suppress(OSError):
                self._conn.send_bytes(pickle.dumps(("shutdown",), _PICKLE))
        await self._stop_process()
        self._close(EngineUnavailable("the engine stopped"))

    async def _stop_process(self) -> None:
        process = self._process
        if process is None:
            return
        await asyncio.to_thread(process.join, 30)
        if process.is_alive():
            logger.warning("engine process %d did not stop in 30 s; killing it", process.pid)
            process.kill()
            await asyncio.to_thread(process.join, 10)

    def is_healthy(self) -> bool:
        return (
            self._ready
            and not self._dead
            and not self._stopping
            and self._process is not None
            and self._process.is_alive()
        )

    def load(self) -> tuple[int, int]:
        """Counted on this side: requests with output are running, the rest are waiting."""
        running = sum(1 for stream in self._streams.values() if stream.started)
        return running, len(self._streams) - running

    # ----------------------------------------------------------------- the channel
    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._write(pickle.dumps(message, _PICKLE))
        except OSError as error:
            self._died()
            raise EngineUnavailable(f"the engine process is gone: {error}") from error

    def _write(self, data: bytes) -> None:
        """Write one whole message (any thread). The pipe's end may be non-blocking (uvloop, which
        `lethe serve` runs, makes every fd it watches so), and a large message (a hook carrying an
        SAE's weights) would then fail halfway with EAGAIN and corrupt the channel: each message is
        written with the fd blocking, under a lock."""
        conn = self._conn
        if conn is None or self._dead:
            raise EngineUnavailable("the engine process is not running")
        with self._send_lock:
            blocking = os.get_blocking(conn.fileno())
            os.set_blocking(conn.fileno(), True)
            try:
                conn.send_bytes(data)
            finally:
                os.set_blocking(conn.fileno(), blocking)

    def _readable(self) -> None:
        conn = self._conn
        try:
            while conn is not None and not self._dead and conn.poll():
                self._dispatch(pickle.loads(conn.recv_bytes()))
        except (EOFError, OSError):
            self._died()

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "outputs":
            for sid, encoded, error in message[1]:
                stream = self._streams.get(sid)
                if stream is None:  # cancelled here already
                    continue
                if encoded is None:
                    name, _, text = (error or "").partition(":")
                    stream.queue.put_nowait(_ERRORS.get(name, EngineError)(text))
                else:
                    stream.started = True
                    stream.queue.put_nowait(decode_output(stream.request_id, encoded))
        elif kind == "hook":
            _, key, error = message
            future = self._hooks.pop(key, None)
            if future is not None and not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(EngineError(f"layer hook failed in the engine process: {error}"))

    def _died(self) -> None:
        if self._dead:
            return
        self._dead = True
        process = self._process
        if not self._stopping:
            code = process.exitcode if process is not None else None
            logger.error(
                "the engine process %s died (exit code %s); failing %d requests in flight",
                process.pid if process is not None else "?",
                code if code is not None else "not yet known",
                len(self._streams),
            )
        self._close(EngineUnavailable("the engine process died; it is being restarted, retry shortly"))

    def _close(self, error: EngineError) -> None:
        """Stop reading the channel and fail everything still waiting on it."""
        self._dead = True
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._loop is not None and not self._loop.is_closed():
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(conn.fileno())
            conn.close()
        for stream in self._streams.values():
            stream.queue.put_nowait(error)
        for future in self._hooks.values():
            if not future.done():
                future.set_exception(error)
        self._hooks.clear()

    # ----------------------------------------------------------------- requests
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if not self.is_healthy():
            raise EngineUnavailable("the engine is not running")
        if len(request.prompt_ids) + request.sampling.max_tokens > self.max_context:
            raise EngineError("prompt plus max_tokens exceeds the model's context")
        sid = next(self._ids)
        stream = _Stream(request.request_id)
        self._streams[sid] = stream
        finished = False
        try:
            self._send(("generate", sid, request))
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(sid, None)
            if not finished and not self._dead:
                with contextlib.suppress(EngineError):
                    self._send(("cancel", sid))

    # ----------------------------------------------------------------- hooks
    async def add_layer_hook(self, layer_index: int, hook: LayerHook) -> HookHandle:
        """The hook runs in the engine process: it must pickle (with cloudpickle where installed,
        as for vLLM, which also takes closures and lambdas)."""
        try:
            import cloudpickle

            payload = cloudpickle.dumps(hook)
        except ImportError:
            payload = pickle.dumps(hook, _PICKLE)
        key = uuid.uuid4().hex
        await self._call_hook(key, ("add_hook", key, layer_index, payload))
        return _ProcessHook(self, key)

    async def _remove_hook(self, key: str) -> None:
        if not self._dead:
            await self._call_hook(key, ("remove_hook", key))

    async def _call_hook(self, key: str, message: tuple[Any, ...]) -> None:
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        self._hooks[key] = future
        try:
            # A hook may weigh megabytes: written from a thread, so that this loop keeps reading the
            # engine's outputs meanwhile (the engine cannot stall on a full pipe to us).
            await asyncio.to_thread(self._write, pickle.dumps(message, _PICKLE))
        except OSError as error:
            self._hooks.pop(key, None)
            self._died()
            raise EngineUnavailable(f"the engine process is gone: {error}") from error
        except EngineError:
            self._hooks.pop(key, None)
            raise
        await future
