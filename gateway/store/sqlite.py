"""The `Store` on one SQLite file in WAL mode, the embedded default.

The schema is not written here: `migrations.py` numbers it, and opening a store brings the file up
to the newest version (see `migrate`).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from lethe.gateway.store.base import (
    FINISHED_STATES,
    LOG_LINE_CHARS,
    LOG_TAIL_LINES,
    AuditKind,
    AuditRecord,
    DuplicateTargetName,
    InvalidCursor,
    Item,
    Job,
    JobFinished,
    JobNotFound,
    JobState,
    JobStats,
    NothingToRollBack,
    NotServing,
    Page,
    ServingAction,
    ServingChanged,
    ServingCheckpoint,
    TargetNotFound,
    TargetSnapshot,
    VersionMismatch,
    new_job_id,
    new_target_id,
    utc_now,
)
from lethe.gateway.store.migrations import (
    MIGRATIONS,
    VERSION_TABLE,
    Migration,
    check_known,
    check_numbering,
    pending,
)
from lethe.guards.features import TargetFeatures
from lethe.guards.targets import Target, TargetFields, TargetPatch, TargetSpec

_TARGET_FIELDS = set(TargetFields.model_fields)


def migrate(
    db: sqlite3.Connection, where: str = "the database", migrations: Sequence[Migration] = MIGRATIONS
) -> int:
    """Bring the database on `db` (a connection in autocommit mode) to the newest of `migrations`;
    returns its version.

    An up-to-date database is only read. Otherwise the pending migrations and their `schema_version`
    rows are written in one transaction begun with `BEGIN IMMEDIATE`: a second process opening the
    same file at the same moment waits for the write lock, then finds the work done. Raises
    SchemaTooNew, before writing anything, for a database newer than this code.
    """
    latest = check_numbering(migrations)
    current = _schema_version(db)
    check_known(current, where, latest)
    if current == latest:
        return current
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(VERSION_TABLE)
        for migration in pending(_schema_version(db), where, migrations):
            step = migration.step("sqlite")
            if callable(step):
                step(db)
            else:
                for statement in _statements(step):
                    db.execute(statement)
            db.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, _time(utc_now())),
            )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return latest


def _use_wal(db: sqlite3.Connection, timeout: float) -> None:
    """Put the file in WAL mode. Switching a new file takes a moment of exclusive access, and SQLite
    answers another process opening it meanwhile with SQLITE_BUSY at once, without waiting the busy
    timeout: retry within it, so that processes starting together on a new database all open it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _schema_version(db: sqlite3.Connection) -> int:
    """The highest version recorded; 0 for a database without a record (new, or made by a release
    before versioning: migration 1 adopts it)."""
    recorded = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if recorded is None:
        return 0
    return db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]


def _statements(script: str) -> Iterator[str]:
    """The statements of an SQL script one by one (the last may lack its `;`): `executescript` would
    commit the open transaction first."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement.strip()
            statement = ""
    if statement.strip():
        yield statement.strip()


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
    and wait up to five seconds for it. Opening brings the schema up to date (`migrate`) and
    refuses a database that a newer release has migrated.
    """

    def __init__(self, path: Path, *, audit_prompts: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._audit_prompts = audit_prompts
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
        self._db.row_factory = sqlite3.Row
        try:
            _use_wal(self._db, timeout=5.0)
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self.schema_version = migrate(self._db, where=str(path))
        except BaseException:
            self._db.close()
            raise

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
            db.execute("DELETE FROM target_features WHERE target_id = ?", (target_id,))
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

    def put_target_features(self, target_id: str, features: TargetFeatures) -> bool:
        with self._transaction() as db:
            row = db.execute("SELECT version FROM targets WHERE id = ?", (target_id,)).fetchone()
            if row is None or row["version"] != features.target_version:
                return False
            db.execute(
                "INSERT INTO target_features (target_id, sae, target_version, features, created_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (target_id, sae) DO UPDATE SET"
                " target_version = excluded.target_version, features = excluded.features,"
                " created_at = excluded.created_at",
                (
                    target_id,
                    features.sae,
                    features.target_version,
                    features.model_dump_json(),
                    _time(utc_now()),
                ),
            )
            db.execute("UPDATE revision SET value = value + 1")
        return True

    def target_features(self, sae: str | None = None, target_id: str | None = None) -> list[TargetFeatures]:
        query = (
            "SELECT f.features FROM target_features f JOIN targets t"
            " ON t.id = f.target_id AND t.version = f.target_version"
            " WHERE (? IS NULL OR f.sae = ?) AND (? IS NULL OR f.target_id = ?) ORDER BY t.position"
        )
        with self._transaction(write=False) as db:
            rows = db.execute(query, (sae, sae, target_id, target_id)).fetchall()
        return [TargetFeatures.model_validate_json(row["features"]) for row in rows]

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
