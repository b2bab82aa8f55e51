"""The store's schema as numbered migrations, applied in order when a store opens.

Each `Migration` is data: a version, a name and the step that brings a database from the previous
version to this one. A step is SQL text (one or more statements) or a callable that receives the
backend's DB-API connection, for changes SQL alone cannot express (rewriting JSON, say). A step
written in plain SQL that every backend understands goes in `sql`; where the dialects differ, a
migration carries one step per dialect in `dialects` (`"sqlite"` today; a Postgres backend adds its
own key to the migrations it needs and reuses the numbering, `pending` and `check_known`).

Applied versions are recorded in the `schema_version` table, one row per version; the database's
version is the highest row. A backend applies `pending(current)` inside one write transaction that
also records the new rows, under a lock that makes a second process wait and then find nothing to
do (SQLite: `BEGIN IMMEDIATE`), and refuses a database whose version is newer than `LATEST`.

Rules for new migrations: append, never edit or renumber a released one (databases in the field have
already run it); one migration per schema change; a column added with `ALTER TABLE ... ADD COLUMN`
needs a default so that existing rows stay valid.

Version 1 is the schema of the releases before versioning, statement for statement, so that their
databases (all tables, no `schema_version`) are adopted as version 1: its `IF NOT EXISTS` and
`INSERT OR IGNORE` make it a no-op on them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Step = str | Callable[[Any], None]
"""SQL text, or a callable given the backend's DB-API connection (inside the migration's transaction)."""


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer release than this code: opening it could corrupt it."""

    def __init__(self, found: int, known: int, where: str = "the database") -> None:
        self.found = found
        self.known = known
        super().__init__(
            f"The schema of {where} is at version {found}, but this Lethe knows versions up to {known}: "
            "a newer release has migrated it. Run that release (or newer), or point LETHE_DATABASE at "
            "another file."
        )


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: Step | None = None
    """The step for every dialect, when one text (or callable) fits them all."""
    dialects: Mapping[str, Step] = field(default_factory=dict)
    """Per-dialect steps, preferred over `sql` for the dialects they name."""

    def step(self, dialect: str) -> Step:
        step = self.dialects.get(dialect, self.sql)
        if step is None:
            raise NotImplementedError(f"Migration {self.version} ({self.name}) has no step for {dialect}.")
        return step


VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL
)"""
"""Where applied versions are recorded; plain SQL that SQLite and Postgres both accept."""


_V1_SQLITE = """
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
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "targets, audit, jobs and serving checkpoint (the schema before versioning)",
        dialects={"sqlite": _V1_SQLITE},
    ),
    Migration(
        2,
        "SAE features chosen per target, per SAE",
        sql="""CREATE TABLE IF NOT EXISTS target_features (
    target_id TEXT NOT NULL,
    sae TEXT NOT NULL,
    target_version INTEGER NOT NULL,
    features TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (target_id, sae)
)""",
    ),
)


def check_numbering(migrations: Sequence[Migration]) -> int:
    """The newest version, after checking that the versions run 1, 2, 3, ... without gaps."""
    versions = [migration.version for migration in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"Migrations must be numbered 1, 2, 3, ... in order; found {versions}.")
    return len(versions)


LATEST = check_numbering(MIGRATIONS)
"""The schema version this code writes and reads."""


def check_known(current: int, where: str = "the database", latest: int = LATEST) -> None:
    """Raise SchemaTooNew when a database is ahead of this code."""
    if current > latest:
        raise SchemaTooNew(current, latest, where)


def pending(
    current: int, where: str = "the database", migrations: Sequence[Migration] = MIGRATIONS
) -> list[Migration]:
    """The migrations a database at version `current` still needs, oldest first (0: a database
    without a version record, new or made by a release before versioning)."""
    check_known(current, where, check_numbering(migrations))
    return [migration for migration in migrations if migration.version > current]
