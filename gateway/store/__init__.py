"""Durable state shared by every gateway replica and worker: the registered forget targets, the audit
trail, the offline unlearning jobs and which checkpoint serves.

Replicas share nothing else, so every change is one transaction: the target row, the store-wide
revision and the change's audit record are written together or not at all, and a crash halfway
leaves the previous state. `revision()` is the one cheap number a replica polls to learn that its
guard index is stale; `snapshot()` then gives the targets and the revision they belong to, read
consistently. SQLite in WAL mode is the embedded default; `Store` is the seam for Postgres.

Jobs are claimed atomically (the claim is one write transaction that moves the oldest queued job to
`running` under the claiming worker's id), and a worker may change only the jobs it holds: a job
taken from it (declared dead for a stale heartbeat) ignores its later reports.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

from pydantic import AwareDatetime, BaseModel, Field

from lethe.gateway.config import Settings
from lethe.guards.targets import Target, TargetFields, TargetPatch, TargetSpec

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


_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS targets (
    position INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so page cursors survive deletions
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    name_key TEXT NOT NULL UNIQUE,
    fields TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS revision (
    single INTEGER PRIMARY KEY CHECK (single = 1),
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO revision VALUES (1, 0);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    action TEXT NOT NULL,
    target_ids TEXT NOT NULL,
    request_id TEXT,
    suppressed_tokens INTEGER NOT NULL,
    detail TEXT NOT NULL,
    prompt TEXT
);
CREATE INDEX IF NOT EXISTS audit_by_kind ON audit (kind, id);
CREATE TABLE IF NOT EXISTS audit_targets (
    target_id TEXT NOT NULL,
    audit_id INTEGER NOT NULL REFERENCES audit (id),
    PRIMARY KEY (target_id, audit_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jobs (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    message TEXT,
    estimated_finish TEXT,
    logs TEXT NOT NULL DEFAULT '[]',
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    updated_at TEXT NOT NULL,
    worker_id TEXT,
    heartbeat_at TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    checkpoint_id TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, position);
CREATE TABLE IF NOT EXISTS serving (
    single INTEGER PRIMARY KEY CHECK (single = 1),
    checkpoint TEXT NOT NULL,
    previous TEXT,
    revision INTEGER NOT NULL,
    updated_at TEXT
);
INSERT OR IGNORE INTO serving (single, checkpoint, revision) VALUES (1, 'base', 0);
CREATE TABLE IF NOT EXISTS serving_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    checkpoint TEXT NOT NULL,
    previous TEXT NOT NULL,
    action TEXT NOT NULL,
    time TEXT NOT NULL
);
COMMIT;
"""

_TARGET_FIELDS = set(TargetFields.model_fields)


def new_target_id() -> str:
    return f"tgt_{secrets.token_hex(12)}"


def new_job_id() -> str:
    return f"job_{secrets.token_hex(12)}"


def _time(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value is not None else None


def _bounded_logs(lines: list[str]) -> str:
    return json.dumps([line[:LOG_LINE_CHARS] for line in lines[-LOG_TAIL_LINES:]])


def _job(row: sqlite3.Row) -> Job:
    data = dict(row)
    data.pop("position")
    estimated = datetime.fromisoformat(row["estimated_finish"]) if row["estimated_finish"] else None
    eta = (
        max(0.0, (estimated - utc_now()).total_seconds())
        if estimated is not None and row["state"] == "running"
        else None
    )
    return Job.model_validate(
        {
            **data,
            "spec": json.loads(row["spec"]),
            "logs": json.loads(row["logs"]),
            "progress": round(100 * row["progress"], 2),
            "cancel_requested": bool(row["cancel_requested"]),
            "eta_seconds": None if eta is None else round(eta, 1),
        }
    )


def _name_key(name: str) -> str:
    return name.casefold()


def _position(cursor: str) -> int:
    if not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
        raise InvalidCursor(cursor)
    return int(cursor)


def _target(row: sqlite3.Row) -> Target:
    stored = {key: row[key] for key in ("id", "name", "version", "created_at", "updated_at")}
    return Target.model_validate({**json.loads(row["fields"]), **stored})


def _audit(row: sqlite3.Row) -> AuditRecord:
    return AuditRecord.model_validate(
        {**dict(row), "target_ids": json.loads(row["target_ids"]), "detail": json.loads(row["detail"])}
    )


def _page(
    model: type[Item],
    rows: list[sqlite3.Row],
    limit: int,
    convert: Callable[[sqlite3.Row], Item],
    cursor: str,
) -> Page[Item]:
    """Rows are fetched with `limit + 1`: the extra row only tells that another page exists."""
    has_more = len(rows) > limit
    rows = rows[:limit]
    return Page[model](
        data=[convert(row) for row in rows],
        has_more=has_more,
        next_cursor=str(rows[-1][cursor]) if has_more else None,
    )


class SQLiteStore:
    """The `Store` on one SQLite file in WAL mode (readers never wait for the writer).

    One connection serialised by a lock: admin writes are rare and audit appends are single small
    inserts, so a pool would buy nothing. `synchronous=NORMAL` keeps every commit atomic and
    survives a process crash; only a power cut may lose the last commits, never corrupt the file.
    Several processes may share the file: writes take the write lock up front (BEGIN IMMEDIATE)
    and wait up to five seconds for it.
    """

    def __init__(self, path: Path, *, audit_prompts: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._audit_prompts = audit_prompts
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """Everything done inside commits together, or is rolled back if anything raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # some I/O errors end the transaction themselves
                    self._db.execute("ROLLBACK")
                raise

    def create_target(self, spec: TargetSpec) -> Target:
        now = utc_now()
        target = Target(**spec.model_dump(), id=new_target_id(), version=1, created_at=now, updated_at=now)
        with self._transaction() as db:
            self._put(db, target)
            self._changed(db, "target.create", target, sorted(spec.model_fields_set))
        return target

    def get_target(self, target_id: str) -> Target:
        with self._transaction(write=False) as db:
            return self._current(db, target_id, None)

    def list_targets(self, limit: int = 50, after: str | None = None) -> Page[Target]:
        start = _position(after) if after is not None else 0
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT * FROM targets WHERE position > ? ORDER BY position LIMIT ?", (start, limit + 1)
            ).fetchall()
        return _page(Target, rows, limit, _target, "position")

    def update_target(
        self, target_id: str, patch: TargetPatch, expected_version: int | None = None
    ) -> Target:
        with self._transaction() as db:
            current = self._current(db, target_id, expected_version)
            # Validated again as a whole so that the target's own normalisation (alias dedup) applies.
            candidate = Target.model_validate({**current.model_dump(), **patch.model_dump(exclude_none=True)})
            changed = [
                name for name in TargetSpec.model_fields if getattr(candidate, name) != getattr(current, name)
            ]
            if not changed:
                return current
            updated = candidate.model_copy(update={"version": current.version + 1, "updated_at": utc_now()})
            self._put(db, updated)
            self._changed(db, "target.update", updated, sorted(changed))
        return updated

    def delete_target(self, target_id: str, expected_version: int | None = None) -> Target:
        with self._transaction() as db:
            target = self._current(db, target_id, expected_version)
            db.execute("DELETE FROM targets WHERE id = ?", (target_id,))
            self._changed(db, "target.delete", target, [])
        return target

    def snapshot(self) -> TargetSnapshot:
        with self._transaction(write=False) as db:
            revision = db.execute("SELECT value FROM revision").fetchone()[0]
            rows = db.execute("SELECT * FROM targets ORDER BY position").fetchall()
        return TargetSnapshot(revision=revision, targets=tuple(_target(row) for row in rows))

    def revision(self) -> int:
        with self._transaction(write=False) as db:
            return db.execute("SELECT value FROM revision").fetchone()[0]

    def append_audit(self, record: AuditRecord) -> AuditRecord:
        with self._transaction() as db:
            return self._insert_audit(db, record)

    async def append_audit_async(self, record: AuditRecord) -> AuditRecord:
        return await asyncio.to_thread(self.append_audit, record)

    def list_audit(
        self,
        limit: int = 50,
        after: str | None = None,
        kind: AuditKind | None = None,
        target_id: str | None = None,
    ) -> Page[AuditRecord]:
        filters = {
            "kind = ?": kind,
            "id IN (SELECT audit_id FROM audit_targets WHERE target_id = ?)": target_id,
        }
        return self._newest_first("audit", "id", limit, after, filters, AuditRecord, _audit)

    # ------------------------------------------------------------------ jobs
    def create_job(self, spec: dict[str, Any]) -> Job:
        now = _time(utc_now())
        job_id = new_job_id()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, spec, state, created_at, updated_at) VALUES (?, ?, 'queued', ?, ?)",
                (job_id, json.dumps(spec), now, now),
            )
            self._insert_audit(db, self._job_audit("job.create", job_id, spec))
            return self._job_row(db, job_id)

    def get_job(self, job_id: str) -> Job:
        with self._transaction(write=False) as db:
            return self._job_row(db, job_id)

    def list_jobs(
        self, limit: int = 50, after: str | None = None, state: JobState | None = None
    ) -> Page[Job]:
        return self._newest_first("jobs", "position", limit, after, {"state = ?": state}, Job, _job)

    def _newest_first(
        self,
        table: str,
        key: str,
        limit: int,
        after: str | None,
        filters: dict[str, object | None],
        item: type[Item],
        convert: Callable[[sqlite3.Row], Item],
    ) -> Page[Item]:
        """One page of `table`, newest first by `key`, under the filters whose value is given."""
        clauses = [f"{key} < ?"] if after is not None else []
        values: list[object] = [_position(after)] if after is not None else []
        for clause, value in filters.items():
            if value is not None:
                clauses.append(clause)
                values.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._transaction(write=False) as db:
            rows = db.execute(
                f"SELECT * FROM {table} {where} ORDER BY {key} DESC LIMIT ?", (*values, limit + 1)
            ).fetchall()
        return _page(item, rows, limit, convert, key)

    def cancel_job(self, job_id: str) -> Job:
        now = _time(utc_now())
        with self._transaction() as db:
            job = self._job_row(db, job_id)
            if job.state == "cancelled" or (job.state == "running" and job.cancel_requested):
                return job
            if job.state in FINISHED_STATES:
                raise JobFinished(job_id, job.state)
            if job.state == "queued":
                db.execute(
                    "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_at = ?,"
                    " updated_at = ?, message = 'cancelled before it started' WHERE id = ?",
                    (now, now, job_id),
                )
            else:
                db.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?", (now, job_id))
            self._insert_audit(db, self._job_audit("job.cancel", job_id, job.spec))
            return self._job_row(db, job_id)

    def claim_job(self, worker_id: str) -> Job | None:
        if not self._exists("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1"):
            return None  # idle polls take no write lock
        now = _time(utc_now())
        with self._transaction() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE state = 'queued' ORDER BY position LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            claimed = db.execute(
                "UPDATE jobs SET state = 'running', worker_id = ?, started_at = ?, heartbeat_at = ?,"
                " updated_at = ? WHERE id = ? AND state = 'queued'",
                (worker_id, now, now, now, row["id"]),
            ).rowcount
            return self._job_row(db, row["id"]) if claimed else None

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
        now = _time(utc_now())
        sets = ["heartbeat_at = ?", "updated_at = ?"]
        values: list[object] = [now, now]
        if progress is not None:
            sets.append("progress = ?")
            values.append(min(1.0, max(0.0, float(progress))))
        if message is not None:
            sets.append("message = ?")
            values.append(message)
        if estimated_finish is not None:
            sets.append("estimated_finish = ?")
            values.append(_time(estimated_finish))
        if logs is not None:
            sets.append("logs = ?")
            values.append(_bounded_logs(logs))
        return self._update_running_job(job_id, worker_id, sets, values)

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
        now = _time(utc_now())
        sets = [
            "state = ?",
            "finished_at = ?",
            "updated_at = ?",
            "heartbeat_at = ?",
            "estimated_finish = NULL",
            "checkpoint_id = ?",
            "error = ?",
        ]
        values: list[object] = [state, now, now, now, checkpoint_id, error]
        if state == "succeeded":
            sets.append("progress = 1.0")
        if message is not None:
            sets.append("message = ?")
            values.append(message)
        if logs is not None:
            sets.append("logs = ?")
            values.append(_bounded_logs(logs))
        return self._update_running_job(job_id, worker_id, sets, values)

    def _update_running_job(
        self, job_id: str, worker_id: str, sets: list[str], values: list[object]
    ) -> Job | None:
        """Apply `sets` to a job only while `worker_id` still runs it (a worker declared dead cannot
        write over the job's final state); None when it no longer does."""
        with self._transaction() as db:
            updated = db.execute(
                f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND worker_id = ? AND state = 'running'",
                (*values, job_id, worker_id),
            ).rowcount
            return self._job_row(db, job_id) if updated else None

    def fail_stale_jobs(self, heartbeat_before: datetime) -> list[Job]:
        stale = "SELECT 1 FROM jobs WHERE state = 'running' AND heartbeat_at < ? LIMIT 1"
        if not self._exists(stale, _time(heartbeat_before)):
            return []
        now = _time(utc_now())
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, heartbeat_at, worker_id FROM jobs WHERE state = 'running' AND heartbeat_at < ?",
                (_time(heartbeat_before),),
            ).fetchall()
            for row in rows:
                db.execute(
                    "UPDATE jobs SET state = 'failed', finished_at = ?, updated_at = ?,"
                    " estimated_finish = NULL, error = ? WHERE id = ?",
                    (
                        now,
                        now,
                        f"worker died: {row['worker_id']} sent no heartbeat after {row['heartbeat_at']}",
                        row["id"],
                    ),
                )
            return [self._job_row(db, row["id"]) for row in rows]

    def job_stats(self) -> JobStats:
        with self._transaction(write=False) as db:
            counts = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
            oldest = db.execute("SELECT MIN(heartbeat_at) FROM jobs WHERE state = 'running'").fetchone()[0]
        return JobStats(
            counts={state: counts.get(state, 0) for state in JobState.__args__},
            oldest_heartbeat=datetime.fromisoformat(oldest) if oldest else None,
        )

    # ------------------------------------------------------------------ serving checkpoint
    def serving_checkpoint(self) -> ServingCheckpoint:
        with self._transaction(write=False) as db:
            return self._serving(db)

    def set_serving_checkpoint(
        self, checkpoint_id: str, action: ServingAction, expected: str | None = None
    ) -> ServingCheckpoint:
        now = utc_now()
        with self._transaction() as db:
            current = self._serving(db)
            if expected is not None and current.checkpoint != expected:
                raise ServingChanged(current.checkpoint, expected)
            if current.checkpoint == checkpoint_id:
                return current
            db.execute(
                "UPDATE serving SET checkpoint = ?, previous = ?, revision = revision + 1, updated_at = ?",
                (checkpoint_id, current.checkpoint, _time(now)),
            )
            db.execute(
                "INSERT INTO serving_history (checkpoint, previous, action, time) VALUES (?, ?, ?, ?)",
                (checkpoint_id, current.checkpoint, action, _time(now)),
            )
            self._insert_audit(
                db,
                AuditRecord(
                    kind="admin",
                    action=f"checkpoint.{action}",
                    detail={"checkpoint": checkpoint_id, "previous": current.checkpoint},
                ),
            )
            return self._serving(db)

    def rollback_target(self, checkpoint_id: str) -> str:
        with self._transaction(write=False) as db:
            current = self._serving(db)
            if current.checkpoint != checkpoint_id:
                raise NotServing(checkpoint_id, current.checkpoint)
            row = db.execute(
                "SELECT previous FROM serving_history WHERE checkpoint = ? AND action = 'promote'"
                " ORDER BY id DESC LIMIT 1",
                (checkpoint_id,),
            ).fetchone()
        if row is None:
            raise NothingToRollBack(checkpoint_id)
        return row["previous"]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exists(self, query: str, *values: object) -> bool:
        with self._transaction(write=False) as db:
            return db.execute(query, values).fetchone() is not None

    @staticmethod
    def _serving(db: sqlite3.Connection) -> ServingCheckpoint:
        row = db.execute("SELECT checkpoint, previous, revision, updated_at FROM serving").fetchone()
        return ServingCheckpoint.model_validate(dict(row))

    @staticmethod
    def _job_row(db: sqlite3.Connection, job_id: str) -> Job:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return _job(row)

    @staticmethod
    def _job_audit(action: str, job_id: str, spec: dict[str, Any]) -> AuditRecord:
        detail = {"job_id": job_id, "method": spec.get("method"), "targets": spec.get("targets", [])}
        return AuditRecord(kind="admin", action=action, detail=detail)

    @staticmethod
    def _current(db: sqlite3.Connection, target_id: str, expected_version: int | None) -> Target:
        row = db.execute("SELECT * FROM targets WHERE id = ?", (target_id,)).fetchone()
        if row is None:
            raise TargetNotFound(target_id)
        target = _target(row)
        if expected_version is not None and expected_version != target.version:
            raise VersionMismatch(target_id, target.version, expected_version)
        return target

    @staticmethod
    def _put(db: sqlite3.Connection, target: Target) -> None:
        """Insert or overwrite a target; checked here rather than by the UNIQUE constraint so that the
        caller learns which target holds the name."""
        holder = db.execute(
            "SELECT id FROM targets WHERE name_key = ? AND id != ?", (_name_key(target.name), target.id)
        ).fetchone()
        if holder is not None:
            raise DuplicateTargetName(target.name, holder["id"])
        db.execute(
            "INSERT INTO targets (id, name, name_key, fields, version, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET name = excluded.name, name_key = excluded.name_key,"
            " fields = excluded.fields, version = excluded.version, updated_at = excluded.updated_at",
            (
                target.id,
                target.name,
                _name_key(target.name),
                target.model_dump_json(include=_TARGET_FIELDS),
                target.version,
                target.created_at.isoformat(),
                target.updated_at.isoformat(),
            ),
        )

    def _changed(self, db: sqlite3.Connection, action: str, target: Target, fields: list[str]) -> None:
        """Record a change to the targets inside its own transaction: the revision and the audit trail
        can then never disagree with the targets."""
        db.execute("UPDATE revision SET value = value + 1")
        self._insert_audit(
            db,
            AuditRecord(
                kind="admin",
                action=action,
                target_ids=[target.id],
                detail={"name": target.name, "fields": fields},
            ),
        )

    def _insert_audit(self, db: sqlite3.Connection, record: AuditRecord) -> AuditRecord:
        kept = record.model_copy(update={"prompt": record.prompt if self._audit_prompts else None})
        cursor = db.execute(
            "INSERT INTO audit"
            " (time, kind, action, target_ids, request_id, suppressed_tokens, detail, prompt)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                kept.time.astimezone(UTC).isoformat(),
                kept.kind,
                kept.action,
                json.dumps(kept.target_ids),
                kept.request_id,
                kept.suppressed_tokens,
                json.dumps(kept.model_dump(mode="json", include={"detail"})["detail"]),
                kept.prompt,
            ),
        )
        db.executemany(
            "INSERT INTO audit_targets (target_id, audit_id) VALUES (?, ?)",
            [(target_id, cursor.lastrowid) for target_id in dict.fromkeys(kept.target_ids)],
        )
        return kept.model_copy(update={"id": cursor.lastrowid})


def open_store(settings: Settings) -> Store:
    """The store the settings name: the SQLite file LETHE_DATABASE, by default LETHE_HOME/lethe.db."""
    path = (settings.database or settings.home / "lethe.db").expanduser()
    return SQLiteStore(path, audit_prompts=settings.audit_prompts)
