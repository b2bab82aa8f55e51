"""Versioned schema migrations: a database made by the release before versioning is adopted without
data loss, opening is idempotent and safe when processes race, and a newer schema is refused."""

from __future__ import annotations

import multiprocessing
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from lethe.gateway.store import SCHEMA_VERSION, SchemaTooNew, SQLiteStore
from lethe.gateway.store.migrations import MIGRATIONS, Migration, check_numbering, pending
from lethe.gateway.store.sqlite import migrate
from lethe.guards.targets import Target, TargetPatch, TargetSpec

PREVIOUS_RELEASE = Path(__file__).parent / "previous_release"
"""`schema.sql` is `_SCHEMA` of gateway/store.py at commit 90e2e33, as it was; `rows.sql` the writes
that release made for a target, its audit trail, two jobs and a promote."""

TARGET_ID = "tgt_0123456789abcdef01234567"
DONE_JOB = "job_0123456789abcdef01234567"
QUEUED_JOB = "job_fedcba9876543210fedcba98"
PREVIOUS_TABLES = ("targets", "revision", "audit", "audit_targets", "jobs", "serving", "serving_history")


def previous_release_database(path: Path) -> Path:
    """A database as the previous release left it: opened the way its SQLiteStore opened one."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript((PREVIOUS_RELEASE / "schema.sql").read_text())
    db.executescript((PREVIOUS_RELEASE / "rows.sql").read_text())
    db.close()
    return path


def rows(path: Path, tables: tuple[str, ...] = PREVIOUS_TABLES) -> dict[str, list[tuple[object, ...]]]:
    db = sqlite3.connect(path)
    try:
        return {table: db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall() for table in tables}
    finally:
        db.close()


def schema(path: Path) -> dict[str, str]:
    """Every table's and index's SQL, by name (SQLite keeps the text as it was created)."""
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall())
    finally:
        db.close()


def versions(path: Path) -> list[tuple[int, str, str]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT version, name, applied_at FROM schema_version ORDER BY version").fetchall()
    finally:
        db.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "lethe.db"


@pytest.fixture
def old(path: Path) -> Path:
    return previous_release_database(path)


def at(minute: int, second: int = 0) -> datetime:
    """A time written by rows.sql: 2025-01-02 03:minute:second UTC."""
    return datetime(2025, 1, 2, 3, minute, second, tzinfo=UTC)


def test_a_previous_release_database_is_adopted_and_every_row_stays_readable(old: Path) -> None:
    before = rows(old)
    store = SQLiteStore(old)
    try:
        assert store.schema_version == SCHEMA_VERSION
        assert [version for version, _, _ in versions(old)] == list(range(1, SCHEMA_VERSION + 1))
        assert rows(old) == before  # adopting it rewrote nothing

        target = Target(
            id=TARGET_ID,
            name="Harry Potter",
            aliases=["HP"],
            description="a boy wizard",
            forbidden=["Hogwarts"],
            policy="refuse",
            version=2,
            created_at=at(4, 5),
            updated_at=at(5),
        )
        assert store.get_target(TARGET_ID) == target
        assert store.list_targets().data == [target]
        snapshot = store.snapshot()
        assert (snapshot.revision, snapshot.targets) == (2, (target,))

        audit = store.list_audit().data
        assert [(r.id, r.kind, r.action) for r in audit] == [
            (6, "admin", "job.create"),
            (5, "admin", "checkpoint.promote"),
            (4, "admin", "job.create"),
            (3, "request", "refuse"),
            (2, "admin", "target.update"),
            (1, "admin", "target.create"),
        ]
        assert audit[-1].detail == {"name": "Harry Potter", "fields": ["aliases", "forbidden", "name"]}
        assert audit[-1].time == at(4, 5)
        refused = audit[3]
        assert (refused.target_ids, refused.request_id, refused.suppressed_tokens, refused.detail) == (
            [TARGET_ID],
            "chatcmpl-1",
            3,
            {"model": "tiny"},
        )
        assert [r.id for r in store.list_audit(target_id=TARGET_ID).data] == [3, 2, 1]
        assert [r.id for r in store.list_audit(kind="request").data] == [3]

        done = store.get_job(DONE_JOB)
        assert (done.state, done.progress, done.checkpoint_id, done.worker_id, done.message) == (
            "succeeded",
            100.0,
            "ckpt_flat_1",
            "worker-1",
            "done",
        )
        assert done.spec == {
            "method": "flat",
            "targets": ["Harry Potter"],
            "params": {},
            "from_checkpoint": None,
        }
        assert done.logs == ["loading the model", "step 1/2", "step 2/2", "saved ckpt_flat_1"]
        assert (done.created_at, done.started_at, done.finished_at) == (at(7), at(8), at(10))
        assert [job.id for job in store.list_jobs().data] == [QUEUED_JOB, DONE_JOB]
        assert store.job_stats().counts == {
            "queued": 1,
            "running": 0,
            "succeeded": 1,
            "failed": 0,
            "cancelled": 0,
        }

        serving = store.serving_checkpoint()
        assert (serving.checkpoint, serving.previous, serving.revision, serving.updated_at) == (
            "ckpt_flat_1",
            "base",
            1,
            at(11),
        )
        assert store.rollback_target("ckpt_flat_1") == "base"

        # and the adopted database goes on working: its counters continue where that release left them
        claimed = store.claim_job("worker-2")
        assert claimed is not None and claimed.id == QUEUED_JOB
        created = store.create_target(TargetSpec(name="Voldemort"))
        assert store.revision() == 3
        assert [t.id for t in store.list_targets(after=store.list_targets(limit=1).next_cursor).data] == [
            created.id
        ]
        assert store.update_target(TARGET_ID, TargetPatch(enabled=False), expected_version=2).version == 3
        assert store.list_audit(limit=1).data[0].id == 8
    finally:
        store.close()


def test_migration_1_is_the_previous_release_schema(old: Path, tmp_path: Path) -> None:
    step = MIGRATIONS[0].step("sqlite")
    assert isinstance(step, str)
    previous = (PREVIOUS_RELEASE / "schema.sql").read_text()
    # the same text, statement for statement, and the same tables in the file
    assert previous == "BEGIN IMMEDIATE;\n" + step.lstrip("\n") + "COMMIT;\n"
    fresh = tmp_path / "fresh.db"
    SQLiteStore(fresh).close()
    created = schema(fresh)
    assert created.pop("schema_version").startswith("CREATE TABLE schema_version")
    assert created.pop("target_features").startswith("CREATE TABLE target_features")  # migration 2
    assert created == schema(old)
    # the rows the schema seeds, too
    assert rows(fresh, ("revision", "serving")) == {
        "revision": [(1, 0)],
        "serving": [(1, "base", None, 0, None)],
    }


def test_opening_again_is_a_no_op(path: Path) -> None:
    store = SQLiteStore(path)
    store.create_target(TargetSpec(name="Harry Potter"))
    store.close()
    recorded, tables, data = versions(path), schema(path), rows(path)
    assert len(recorded) == SCHEMA_VERSION

    # An up-to-date database is only read: it opens while another process holds the write lock.
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        again = SQLiteStore(path)
        assert again.schema_version == SCHEMA_VERSION
        assert again._db.total_changes == 0
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    again.close()
    SQLiteStore(path).close()
    assert (versions(path), schema(path), rows(path)) == (recorded, tables, data)


def test_a_newer_schema_is_refused_without_touching_it(path: Path) -> None:
    SQLiteStore(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(
        "INSERT INTO schema_version VALUES (?, 'from the future', '2030-01-01T00:00:00+00:00')",
        (SCHEMA_VERSION + 1,),
    )
    db.close()
    before = (versions(path), schema(path), rows(path))

    with pytest.raises(SchemaTooNew) as refused:
        SQLiteStore(path)
    message = str(refused.value)
    assert f"version {SCHEMA_VERSION + 1}" in message and f"up to {SCHEMA_VERSION}" in message
    assert str(path) in message
    assert (refused.value.found, refused.value.known) == (SCHEMA_VERSION + 1, SCHEMA_VERSION)
    assert (versions(path), schema(path), rows(path)) == before


def _open_at_once(path: str, start: Any, results: Any) -> None:
    """In a child process: wait for the others, then open the store together with them."""
    start.wait()
    try:
        store = SQLiteStore(Path(path))
        results.put(store.schema_version)
        store.close()
    except BaseException as error:
        results.put(repr(error))


def test_processes_opening_a_new_database_at_once_all_succeed(tmp_path: Path) -> None:
    """Several processes race to create and migrate the same new file, in several rounds; each round
    every one must open it, and the file must end with each version recorded once. (Forked, not
    spawned, children: they start in milliseconds, so the race is tight and the test fast.)"""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    racers = 4
    for attempt in range(5):
        path = tmp_path / f"lethe-{attempt}.db"
        start, results = context.Barrier(racers), context.Queue()
        processes = [
            context.Process(target=_open_at_once, args=(str(path), start, results)) for _ in range(racers)
        ]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=120) for _ in processes]
        for process in processes:
            process.join(timeout=30)
        assert outcomes == [SCHEMA_VERSION] * racers
        assert [version for version, _, _ in versions(path)] == list(range(1, SCHEMA_VERSION + 1))
        assert rows(path, ("revision", "serving")) == {
            "revision": [(1, 0)],
            "serving": [(1, "base", None, 0, None)],
        }


# ---------------------------------------------------------------- the numbered list as data

NOTE_COLUMN = Migration(2, "jobs get a note", sql="ALTER TABLE jobs ADD COLUMN note TEXT NOT NULL DEFAULT ''")


def test_a_later_migration_upgrades_an_adopted_database_in_one_step(old: Path) -> None:
    db = sqlite3.connect(old, isolation_level=None)
    try:
        assert migrate(db, migrations=(*MIGRATIONS[:1], NOTE_COLUMN)) == 2
        assert db.execute("SELECT id, note FROM jobs ORDER BY position").fetchall() == [
            (DONE_JOB, ""),
            (QUEUED_JOB, ""),
        ]
        assert db.execute("SELECT version FROM schema_version ORDER BY version").fetchall() == [(1,), (2,)]
    finally:
        db.close()
    db = sqlite3.connect(old, isolation_level=None)
    try:
        with pytest.raises(SchemaTooNew, match="version 2, but this Lethe knows versions up to 1"):
            migrate(db, migrations=MIGRATIONS[:1])
    finally:
        db.close()


def test_a_failing_migration_leaves_the_database_as_it_was(old: Path) -> None:
    broken = Migration(2, "half done", sql="ALTER TABLE jobs ADD COLUMN note TEXT;\nSELECT * FROM missing;")
    before = schema(old)
    db = sqlite3.connect(old, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match="missing"):
            migrate(db, migrations=(*MIGRATIONS[:1], broken))
        assert not db.in_transaction
    finally:
        db.close()
    assert schema(old) == before  # not even version 1 was recorded: all or nothing
    assert "note" not in schema(old)["jobs"]


def test_steps_are_per_dialect_where_they_must_be() -> None:
    assert MIGRATIONS[0].step("sqlite") is MIGRATIONS[0].dialects["sqlite"]
    with pytest.raises(NotImplementedError, match=r"Migration 1 .* no step for postgres"):
        MIGRATIONS[0].step("postgres")
    assert NOTE_COLUMN.step("postgres") == NOTE_COLUMN.step("sqlite") == NOTE_COLUMN.sql


def test_versions_are_numbered_without_gaps() -> None:
    assert check_numbering(MIGRATIONS) == SCHEMA_VERSION
    with pytest.raises(ValueError, match="numbered"):
        check_numbering((*MIGRATIONS, Migration(SCHEMA_VERSION + 2, "gap", sql="SELECT 1")))
    assert [m.version for m in pending(0)] == list(range(1, SCHEMA_VERSION + 1))
    assert pending(SCHEMA_VERSION) == []
