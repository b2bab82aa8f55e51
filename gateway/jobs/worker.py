"""The job worker: claims queued unlearning jobs from the store and runs them, one at a time, in this
process (never in a gateway's request path).

While a job runs, a heartbeat thread records every LETHE_WORKER_HEARTBEAT_SECONDS that the worker
is alive. A worker that dies (SIGKILL, OOM, power cut) stops beating; any worker that starts or
polls afterwards fails that job ("worker died") once its heartbeat is LETHE_WORKER_STALE_SECONDS
old. A checkpoint is renamed into place only when complete (models/checkpoints.py), so a dead job
leaves nothing that could be promoted, and the serving checkpoint is never touched by a job.

Progress, ETA and log lines go to the job row, throttled to one write per `REPORT_SECONDS`. The
job's `cancelled()` turns true when an operator cancels it, when this worker is asked to stop
(SIGTERM/SIGINT, or its parent `lethe serve` is gone), or when the job was taken from this worker;
the unlearning method checks it between steps and unwinds without writing anything.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from lethe.gateway.config import Settings
from lethe.gateway.store import LOG_TAIL_LINES, Job, Store

logger = logging.getLogger(__name__)

REPORT_SECONDS = 0.5
"""At most one progress write per job per this many seconds (the last one is always written)."""
DEFAULT_RUNNER = "lethe.gateway.jobs.runner:run_unlearning"

RunFunction = Callable[..., Any]
"""`run(spec, *, settings, store, progress, cancelled) -> CheckpointManifest` (gateway/jobs/runner.py)."""


def load_runner(reference: str) -> RunFunction:
    """`package.module:function` -> the function."""
    module, _, name = reference.partition(":")
    if not module or not name:
        raise ValueError(f"runner {reference!r}: expected 'package.module:function'")
    return getattr(importlib.import_module(module), name)


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class JobProgress:
    """The `ProgressSink` of one job: progress, ETA and a bounded log tail, written to the job row."""

    def __init__(
        self, store: Store, job: Job, worker_id: str, report_seconds: float = REPORT_SECONDS
    ) -> None:
        self._store = store
        self._job_id = job.id
        self._worker_id = worker_id
        self._report_seconds = report_seconds
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._fraction: float | None = None
        self._message: str | None = None
        self._estimated_finish: datetime | None = None
        self._lines: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._dirty = False
        self._last_write = 0.0
        self.cancel_requested = job.cancel_requested
        self.lost = False
        """The job is no longer running under this worker (declared dead, or finished elsewhere)."""

    def update(self, fraction: float, message: str) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        with self._lock:
            self._fraction, self._message, self._dirty = fraction, message, True
            elapsed = time.monotonic() - self._started
            if fraction >= 0.01:
                remaining = elapsed * (1.0 - fraction) / fraction
                self._estimated_finish = datetime.now(UTC) + timedelta(seconds=remaining)
        self.flush()

    def log(self, line: str) -> None:
        logger.info("%s: %s", self._job_id, line)
        with self._lock:
            self._lines.extend(str(line).splitlines() or [""])
            self._dirty = True
        self.flush()

    @property
    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def flush(self, force: bool = False) -> None:
        """Write what changed (and a heartbeat) unless a write happened less than REPORT_SECONDS ago;
        learn whether the job was cancelled or taken away meanwhile."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_write < self._report_seconds:
                return
            self._last_write = now
            values: dict[str, Any] = {}
            if self._dirty:
                values = {
                    "progress": self._fraction,
                    "message": self._message,
                    "estimated_finish": self._estimated_finish,
                    "logs": list(self._lines),
                }
                self._dirty = False
            try:
                job = self._store.report_job(self._job_id, self._worker_id, **values)
            except Exception:  # a busy or briefly unavailable store must not kill the job
                logger.exception("could not report the progress of %s", self._job_id)
                self._dirty = self._dirty or bool(values)
                return
            if job is None:
                self.lost = True
            else:
                self.cancel_requested = job.cancel_requested


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        run: RunFunction | None = None,
        *,
        worker_id: str | None = None,
        stop: threading.Event | None = None,
        parent_pid: int | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._run = run
        self.worker_id = worker_id or new_worker_id()
        self.stop_event = stop or threading.Event()
        self._parent_pid = parent_pid

    @property
    def run_function(self) -> RunFunction:
        if self._run is None:
            self._run = load_runner(DEFAULT_RUNNER)
        return self._run

    def should_stop(self) -> bool:
        if self._parent_pid is not None and os.getppid() != self._parent_pid:
            if not self.stop_event.is_set():
                logger.warning("parent process %d is gone: stopping", self._parent_pid)
            self.stop_event.set()
        return self.stop_event.is_set()

    def recover(self) -> list[Job]:
        """Fail the running jobs of workers that stopped beating."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.settings.worker_stale_seconds)
        failed = self.store.fail_stale_jobs(cutoff)
        for job in failed:
            logger.warning("job %s failed: %s", job.id, job.error)
        return failed

    def run_forever(self) -> None:
        logger.info("worker %s polling for jobs", self.worker_id)
        while not self.should_stop():
            try:
                self.recover()
                job = self.store.claim_job(self.worker_id)
            except Exception:  # the store may be briefly locked or away: try again later
                logger.exception("polling the store failed")
                job = None
            if job is None:
                self.stop_event.wait(self.settings.worker_poll_seconds)
                continue
            self.run_job(job)
        logger.info("worker %s stopped", self.worker_id)

    def run_once(self) -> Job | None:
        """Claim and run one job if one is queued; the finished job, or None."""
        self.recover()
        job = self.store.claim_job(self.worker_id)
        return self.run_job(job) if job is not None else None

    def run_job(self, job: Job) -> Job | None:
        """Run a claimed job to its end and record how it ended (None if the job was taken away)."""
        from lethe.models.unlearning.progress import UnlearnCancelled
        from lethe.models.unlearning.spec import parse_spec

        logger.info("job %s: running %s", job.id, job.spec)
        progress = JobProgress(self.store, job, self.worker_id)
        beating = threading.Event()
        heart = threading.Thread(target=self._heartbeat, args=(progress, beating), name="lethe-heartbeat")
        heart.start()

        def cancelled() -> bool:
            progress.flush()
            return self.should_stop() or progress.cancel_requested or progress.lost

        state: Literal["succeeded", "failed", "cancelled"]
        checkpoint_id = error = message = None
        try:
            spec = parse_spec(job.spec)
            manifest = self.run_function(
                spec, settings=self.settings, store=self.store, progress=progress, cancelled=cancelled
            )
            state, checkpoint_id = "succeeded", manifest.id
            message = f"wrote checkpoint {checkpoint_id}"
            if progress.cancel_requested:
                message += " (it finished before the cancel took effect)"
        except UnlearnCancelled:
            if progress.cancel_requested:
                state, message = "cancelled", "cancelled; nothing was written"
            else:
                state = "failed"
                error = "interrupted: the worker was stopped before the job finished; nothing was written"
        except Exception as failure:
            state, error = "failed", f"{type(failure).__name__}: {failure}"
            logger.exception("job %s failed", job.id)
            for line in traceback.format_exc().splitlines()[-20:]:
                progress.log(line)
        finally:
            beating.set()
            heart.join()
        finished = self.store.finish_job(
            job.id,
            self.worker_id,
            state,
            checkpoint_id=checkpoint_id,
            error=error,
            message=message,
            logs=progress.lines,
        )
        if finished is None:
            logger.warning("job %s was taken from this worker before it ended (%s)", job.id, state)
        else:
            logger.info("job %s %s%s", job.id, state, f": {error}" if error else "")
        return finished

    def _heartbeat(self, progress: JobProgress, done: threading.Event) -> None:
        while not done.wait(self.settings.worker_heartbeat_seconds):
            self.should_stop()
            progress.flush(force=True)
