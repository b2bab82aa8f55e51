"""`lethe serve`: start the gateway under uvicorn."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType
from typing import Any

from pydantic import BaseModel

from lethe.gateway.config import Settings


def _settings_help() -> str:
    """Every setting with its default; a group of settings (detection, guard) one variable per knob."""
    lines = ["configuration (environment variables; flags above override them):"]
    for name, field in Settings.model_fields.items():
        variable = f"LETHE_{name.upper()}"
        group = field.annotation
        if isinstance(group, type) and issubclass(group, BaseModel):
            lines.append(f"  {variable + '__*':<30} {field.description}")
            for inner, spec in group.model_fields.items():
                knob = f"{variable}__{inner.upper()}"
                lines.append(f"    {knob:<42} {spec.description} [default: {spec.default}]")
        else:
            default = field.default if field.default is not None else "unset"
            lines.append(f"  {variable:<30} {field.description} [default: {default}]")
    return "\n".join(lines)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve",
        help="start the OpenAI-compatible gateway",
        description="Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) "
        "on a local model.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", help="address to listen on (LETHE_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (LETHE_PORT)")
    parser.add_argument(
        "--model",
        help="local Hugging Face causal-LM folder (LETHE_MODEL; default: embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--engine", choices=["hf", "vllm"], help="generation engine (LETHE_ENGINE)")
    parser.add_argument(
        "--sae",
        help="sparse autoencoder folder (sae-lens format) whose features are clamped on fired requests"
        " (LETHE_SAE)",
    )
    parser.add_argument(
        "--worker",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run a `lethe worker` child process for unlearning jobs (LETHE_WORKER; default: on)",
    )
    parser.set_defaults(run=run)


KEEP_ALIVE_SECONDS = 5.0
"""uvicorn's default: an idle keep-alive connection closes this long after its last answer."""


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How `lethe serve` runs uvicorn (tests start in-process servers the same way): idle and slow
    clients are cut off after LETHE_CLIENT_TIMEOUT_SECONDS (gateway/cli/client_timeout.py)."""
    from lethe.gateway.cli.client_timeout import protocol_with_deadline

    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": 10,
        "http": protocol_with_deadline(settings.client_timeout_seconds),
        "timeout_keep_alive": min(KEEP_ALIVE_SECONDS, settings.client_timeout_seconds),
    }


def sae_problem(settings: Settings) -> str | None:
    """Why the SAE of the settings cannot be served on their model (None when it can): found before
    the server starts, as one line, rather than as a traceback from inside its startup."""
    from lethe.models.loading import resolve_model_path
    from lethe.models.sae.sparse_autoencoder import SparseAutoencoder

    assert settings.sae is not None
    try:
        sae = SparseAutoencoder.load(settings.sae)
        sae.check_fits(resolve_model_path(settings.engine_config()))
    except (OSError, ValueError) as error:
        return f"cannot serve the SAE in {settings.sae}: {error}"
    return None


class _Terminated(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(signum)


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from lethe.gateway.api.app import create_app
    from lethe.gateway.cli.worker import missing_eval_extra, start_child, stop_child

    overrides = {name: getattr(args, name) for name in ("host", "port", "model", "engine", "sae", "worker")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.engine_process is None:  # the default under `lethe serve`: the engine in its own process
        settings = settings.model_copy(update={"engine_process": settings.engine == "hf"})
    if settings.engine_process and settings.engine == "hf":
        torch.set_num_threads(1)  # the engine's child process owns the cores (LETHE_TORCH_THREADS)
    elif settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.sae is not None and (problem := sae_problem(settings)) is not None:
        print(f"lethe serve: {problem}", file=sys.stderr)
        return 2
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it under the handler found before it
    # started: this one, so that the worker child is stopped before this process goes.
    signal.signal(signal.SIGTERM, _terminated)
    worker = None
    if settings.worker:
        problem = missing_eval_extra()
        if problem is None:
            worker = start_child(overrides)
        else:  # a serving-only install: jobs wait for a worker elsewhere
            logging.getLogger(__name__).warning("no job worker started here: %s", problem)
    received: int | None = None
    try:
        uvicorn.run(create_app(settings), **uvicorn_options(settings))
    except _Terminated as terminated:
        received = terminated.signum
    finally:
        if worker is not None:
            stop_child(worker)
    if received is not None:
        signal.signal(received, signal.SIG_DFL)
        signal.raise_signal(received)
    return 0
