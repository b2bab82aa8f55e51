"""`lethe worker`: run queued unlearning jobs; and how `lethe serve` starts and stops one as its child."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from types import FrameType

from lethe.gateway.config import Settings

logger = logging.getLogger(__name__)

STOP_SECONDS = 15.0
"""How long `lethe serve` lets its worker wind a job down after SIGTERM before killing it."""


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "worker",
        help="run queued unlearning jobs (also started by `lethe serve` unless LETHE_WORKER=false)",
        description="Claim unlearning jobs from the store (LETHE_DATABASE) one at a time and run them, "
        "writing checkpoints under LETHE_HOME/checkpoints. Several workers may share one store. "
        "SIGTERM stops the running job (it is marked failed, nothing is written) and exits.",
    )
    parser.add_argument("--model", help="the base model folder jobs start from (LETHE_MODEL)")
    parser.add_argument(
        "--once", action="store_true", help="run at most one queued job, then exit (for cron-style use)"
    )
    parser.add_argument(
        "--runner",
        default=None,
        help="the function that runs a job, as package.module:function "
        "(default: gateway.unlearning:run_unlearning)",
    )
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(run=run)


EVAL_MODULES = ("rouge_score", "nltk")
"""What a job's before/after evaluation scores with (the `eval` extra), which serving does not need."""


def missing_eval_extra() -> str | None:
    """Why this installation cannot run jobs, or None when it can."""
    missing = [name for name in EVAL_MODULES if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"jobs score the model before and after with {', '.join(missing)}, which this installation lacks: "
        "pip install 'lethe[eval]'"
    )


def run(args: argparse.Namespace) -> int:
    problem = missing_eval_extra()
    if problem is not None:
        print(f"lethe worker: {problem}", file=sys.stderr)
        return 2
    from lethe.gateway.jobs.worker import Worker, load_runner
    from lethe.gateway.store import open_store

    settings = Settings(**({"model": args.model} if args.model else {}))
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    store = open_store(settings)
    worker = Worker(
        settings,
        store,
        load_runner(args.runner) if args.runner else None,
        parent_pid=args.parent_pid,
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        logger.info("worker got %s: finishing up", signal.Signals(signum).name)
        worker.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if args.once:
            worker.run_once()
        else:
            worker.run_forever()
    finally:
        store.close()
    return 0


def start_child(overrides: Mapping[str, object]) -> subprocess.Popen[bytes]:
    """Start `lethe worker` as a child of this process, with this process's settings (the CLI
    `overrides` passed on as LETHE_* variables). It exits by itself if this process dies."""
    environment = {**os.environ, **{f"LETHE_{k.upper()}": str(v) for k, v in overrides.items()}}
    process = subprocess.Popen(
        [sys.executable, "-m", "lethe.gateway.cli.main", "worker", "--parent-pid", str(os.getpid())],
        env=environment,
    )
    logger.info("started lethe worker (pid %d)", process.pid)
    return process


def stop_child(process: subprocess.Popen[bytes], timeout: float = STOP_SECONDS) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("lethe worker (pid %d) did not stop in %.0f s: killing it", process.pid, timeout)
            process.kill()
            process.wait()
    logger.info("lethe worker (pid %d) exited with %s", process.pid, process.returncode)
