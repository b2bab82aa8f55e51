"""`lethe serve`: start the gateway under uvicorn."""

from __future__ import annotations

import argparse
import logging

from gateway.config import Settings


def _settings_help() -> str:
    lines = ["configuration (environment variables; flags above override them):"]
    for name, field in Settings.model_fields.items():
        default = field.default if field.default is not None else "unset"
        lines.append(f"  LETHE_{name.upper():<22} {field.description} [default: {default}]")
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
    parser.add_argument("--engine", choices=["hf"], help="generation engine (LETHE_ENGINE)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from gateway.app import create_app

    overrides = {name: getattr(args, name) for name in ("host", "port", "model", "engine")}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )
    return 0
