"""Durable state shared by every gateway replica: the registered forget targets and the audit trail.

Replicas share nothing else, so every change is one transaction: the target row, the store-wide
revision and the change's audit record are written together or not at all, and a crash halfway
leaves the previous state. `revision()` is the one cheap number a replica polls to learn that its
guard index is stale; `snapshot()` then gives the targets and the revision they belong to, read
consistently. SQLite in WAL mode is the embedded default; `Store` is the seam for Postgres.
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

from gateway.config import Settings
from guards.targets import Target, TargetFields, TargetPatch, TargetSpec

AuditKind = Literal["admin", "request"]
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
COMMIT;
"""

_TARGET_FIELDS = set(TargetFields.model_fields)


def new_target_id() -> str:
    return f"tgt_{secrets.token_hex(12)}"


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
        conditions: list[str] = []
        values: list[object] = []
        if after is not None:
            conditions.append("id < ?")
            values.append(_position(after))
        if kind is not None:
            conditions.append("kind = ?")
            values.append(kind)
        if target_id is not None:
            conditions.append("id IN (SELECT audit_id FROM audit_targets WHERE target_id = ?)")
            values.append(target_id)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._transaction(write=False) as db:
            rows = db.execute(
                f"SELECT * FROM audit {where} ORDER BY id DESC LIMIT ?", (*values, limit + 1)
            ).fetchall()
        return _page(AuditRecord, rows, limit, _audit, "id")

    def close(self) -> None:
        with self._lock:
            self._db.close()

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
