"""What every store backend shares: the `Store` contract, the records it returns, its errors and
constants. Backends (`sqlite.py`, later Postgres) implement `Store`; callers import from
`lethe.gateway.store`.

Replicas share nothing but the store, so every change is one transaction: the target row, the
store-wide revision and the change's audit record are written together or not at all, and a crash
halfway leaves the previous state. `revision()` is the one cheap number a replica polls to learn that
its guard index is stale; `snapshot()` then gives the targets and the revision they belong to, read
consistently.

Jobs are claimed atomically (the claim is one write transaction that moves the oldest queued job to
`running` under the claiming worker's id), and a worker may change only the jobs it holds: a job
taken from it (declared dead for a stale heartbeat) ignores its later reports.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Literal, Protocol, TypeVar

from pydantic import AwareDatetime, BaseModel, Field

from lethe.guards.features import TargetFeatures
from lethe.guards.targets import Target, TargetPatch, TargetSpec

AuditKind = Literal["admin", "request"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ServingAction = Literal["promote", "rollback"]
BASE_CHECKPOINT = "base"
"""The checkpoint id of the model the gateway was started on (`--model` or the embedded one)."""
LOG_TAIL_LINES = 200
"""Log lines a job keeps (the newest); older ones are dropped."""
LOG_LINE_CHARS = 1000
Item = TypeVar("Item", bound=BaseModel)


def utc_now() -> datetime:
    return datetime.now(UTC)


class AuditRecord(BaseModel):
    """One entry of the audit trail: an admin change to a target, or a request on which targets fired.

    `action` is `target.create`, `target.update` or `target.delete` for admin entries (their
    `detail` holds the target's `name` and the changed `fields`), and the policy that acted
    (`steer` or `refuse`) for request entries. `prompt` is kept only when LETHE_AUDIT_PROMPTS is
    on: prompts can be personal data, and the trail must not become a second copy of them.
    """

    id: int | None = Field(default=None, description="Assigned by the store when the record is appended.")
    time: AwareDatetime = Field(default_factory=utc_now)
    kind: AuditKind
    action: str
    target_ids: list[str] = Field(default_factory=list)
    request_id: str | None = None
    suppressed_tokens: int = Field(default=0, ge=0)
    detail: dict[str, Any] = Field(default_factory=dict)
    prompt: str | None = None


class Page(BaseModel, Generic[Item]):
    """One page of a listing; pass `next_cursor` as `after` to get the next one."""

    object: Literal["list"] = "list"
    data: list[Item]
    has_more: bool
    next_cursor: str | None


class Job(BaseModel):
    """An offline unlearning job: its spec as submitted and what the worker running it last reported."""

    id: str
    object: Literal["unlearning.job"] = "unlearning.job"
    state: JobState
    spec: dict[str, Any] = Field(description="The UnlearnSpec as submitted (method, targets, params, ...).")
    progress: float = Field(ge=0, le=100, description="Percent done, as the worker last reported it.")
    message: str | None = Field(default=None, description="The worker's last progress message.")
    eta_seconds: float | None = Field(
        default=None, description="Estimated seconds left (from the pace so far), while running."
    )
    estimated_finish: AwareDatetime | None = None
    logs: list[str] = Field(default_factory=list, description=f"The last {LOG_TAIL_LINES} log lines.")
    created_at: AwareDatetime
    started_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None
    updated_at: AwareDatetime
    worker_id: str | None = None
    heartbeat_at: AwareDatetime | None = None
    cancel_requested: bool = False
    checkpoint_id: str | None = Field(default=None, description="The checkpoint written, once succeeded.")
    error: str | None = None


@dataclass(frozen=True)
class JobStats:
    """Counts for metrics: jobs per state, and the oldest heartbeat among running jobs."""

    counts: dict[str, int]
    oldest_heartbeat: datetime | None


class ServingCheckpoint(BaseModel):
    """Which checkpoint every replica serves; `revision` grows with every change."""

    object: Literal["serving_checkpoint"] = "serving_checkpoint"
    checkpoint: str
    previous: str | None = Field(default=None, description="What served before the last change.")
    revision: int
    updated_at: AwareDatetime | None = None


@dataclass(frozen=True)
class TargetSnapshot:
    """Every target as of one revision, so an index built from it knows exactly what it reflects."""

    revision: int
    targets: tuple[Target, ...]


class StoreError(Exception):
    """A store call refused for a reason its caller can report (never a storage failure)."""


class TargetNotFound(StoreError):
    def __init__(self, target_id: str) -> None:
        super().__init__(f"No target with id '{target_id}'.")


class DuplicateTargetName(StoreError):
    def __init__(self, name: str, existing_id: str) -> None:
        super().__init__(f"A target named '{name}' already exists ({existing_id}); names ignore case.")


class VersionMismatch(StoreError):
    def __init__(self, target_id: str, current: int, expected: int) -> None:
        super().__init__(f"Target '{target_id}' is at version {current}, not {expected}; fetch it again.")


class InvalidCursor(StoreError):
    def __init__(self, cursor: str) -> None:
        super().__init__(f"'{cursor}' is not a cursor from a previous page.")


class JobNotFound(StoreError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"No job with id '{job_id}'.")


class JobFinished(StoreError):
    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(f"Job '{job_id}' has already {state}; only queued or running jobs can be cancelled.")


class ServingChanged(StoreError):
    def __init__(self, current: str, expected: str) -> None:
        super().__init__(
            f"The serving checkpoint changed meanwhile (now '{current}', expected '{expected}'); try again."
        )


class NotServing(StoreError):
    def __init__(self, checkpoint_id: str, current: str) -> None:
        super().__init__(
            f"Checkpoint '{checkpoint_id}' is not serving ('{current}' is); only the serving checkpoint "
            "can be rolled back."
        )


class NothingToRollBack(StoreError):
    def __init__(self, checkpoint_id: str) -> None:
        super().__init__(
            f"Checkpoint '{checkpoint_id}' was never promoted: there is nothing to roll back to."
        )


class Store(Protocol):
    """What the gateway needs from durable storage. Calls block: run them off the event loop."""

    def create_target(self, spec: TargetSpec) -> Target:
        """Raises DuplicateTargetName."""

    def get_target(self, target_id: str) -> Target:
        """Raises TargetNotFound."""

    def list_targets(self, limit: int = 50, after: str | None = None) -> Page[Target]:
        """In registration order. Raises InvalidCursor."""

    def update_target(
        self, target_id: str, patch: TargetPatch, expected_version: int | None = None
    ) -> Target:
        """Apply the non-null fields of `patch`; a patch that changes nothing writes nothing.
        Raises TargetNotFound, VersionMismatch, DuplicateTargetName."""

    def delete_target(self, target_id: str, expected_version: int | None = None) -> Target:
        """Returns the target as it was. Raises TargetNotFound, VersionMismatch."""

    def snapshot(self) -> TargetSnapshot: ...

    def revision(self) -> int:
        """Grows with every change to the targets, from any replica."""

    def put_target_features(self, target_id: str, features: TargetFeatures) -> bool:
        """Store a target's SAE features (replacing those chosen under the same SAE before) if the
        target is still at `features.target_version`; the revision grows, so every replica's guard
        picks them up. False (nothing written) when the target changed or was deleted meanwhile."""

    def target_features(self, sae: str | None = None, target_id: str | None = None) -> list[TargetFeatures]:
        """Feature selections that are current (chosen from the target's present version), under one
        SAE and/or for one target."""

    def append_audit(self, record: AuditRecord) -> AuditRecord:
        """Store a record (its `prompt` only if prompts are audited); returns it with its id."""

    async def append_audit_async(self, record: AuditRecord) -> AuditRecord:
        """`append_audit` without blocking the event loop, for the request path."""

    def list_audit(
        self,
        limit: int = 50,
        after: str | None = None,
        kind: AuditKind | None = None,
        target_id: str | None = None,
    ) -> Page[AuditRecord]:
        """Newest first. Raises InvalidCursor."""

    # ------------------------------------------------------------------ jobs
    def create_job(self, spec: dict[str, Any]) -> Job:
        """Queue a job (audited as `job.create`)."""

    def get_job(self, job_id: str) -> Job:
        """Raises JobNotFound."""

    def list_jobs(
        self, limit: int = 50, after: str | None = None, state: JobState | None = None
    ) -> Page[Job]:
        """Newest first. Raises InvalidCursor."""

    def cancel_job(self, job_id: str) -> Job:
        """A queued job is cancelled at once, a running one is asked to stop (`cancel_requested`), a
        cancelled one is returned as it is. Audited as `job.cancel`. Raises JobNotFound, JobFinished."""

    def claim_job(self, worker_id: str) -> Job | None:
        """Atomically move the oldest queued job to `running` under `worker_id`; None when none waits."""

    def report_job(
        self,
        job_id: str,
        worker_id: str,
        *,
        progress: float | None = None,
        message: str | None = None,
        estimated_finish: datetime | None = None,
        logs: list[str] | None = None,
    ) -> Job | None:
        """Record progress and a heartbeat; None when the job is no longer running under this worker."""

    def finish_job(
        self,
        job_id: str,
        worker_id: str,
        state: Literal["succeeded", "failed", "cancelled"],
        *,
        checkpoint_id: str | None = None,
        error: str | None = None,
        message: str | None = None,
        logs: list[str] | None = None,
    ) -> Job | None:
        """End a job this worker holds; None when it no longer holds it."""

    def fail_stale_jobs(self, heartbeat_before: datetime) -> list[Job]:
        """Fail every running job whose worker's last heartbeat is older than `heartbeat_before`."""

    def job_stats(self) -> JobStats: ...

    # ------------------------------------------------------------------ serving checkpoint
    def serving_checkpoint(self) -> ServingCheckpoint:
        """Which checkpoint serves (BASE_CHECKPOINT until something is promoted)."""

    def set_serving_checkpoint(
        self, checkpoint_id: str, action: ServingAction, expected: str | None = None
    ) -> ServingCheckpoint:
        """Make `checkpoint_id` the serving one, audited as `checkpoint.<action>`. With `expected`, only
        if that is still the serving one (else ServingChanged)."""

    def rollback_target(self, checkpoint_id: str) -> str:
        """What served before `checkpoint_id` was last promoted. Raises NotServing when it is not the
        serving checkpoint, NothingToRollBack when it was never promoted."""

    def close(self) -> None: ...


def new_target_id() -> str:
    return f"tgt_{secrets.token_hex(12)}"


def new_job_id() -> str:
    return f"job_{secrets.token_hex(12)}"
