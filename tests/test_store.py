"""The SQLite store: target registry semantics, durability across restarts and crashes, the audit trail."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path

import pytest

from lethe.gateway.config import Settings
from lethe.gateway.store import (
    AuditRecord,
    DuplicateTargetName,
    InvalidCursor,
    SQLiteStore,
    TargetNotFound,
    VersionMismatch,
    open_store,
)
from lethe.guards.targets import TargetPatch, TargetSpec
from tests.support.paths import REPO


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "lethe.db"


@pytest.fixture
def store(path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(path)
    yield opened
    opened.close()


def test_create_get_update_delete(store: SQLiteStore) -> None:
    created = store.create_target(
        TargetSpec(name="Harry Potter", aliases=["HP", "hp"], forbidden=["Hogwarts"])
    )
    assert created.id.startswith("tgt_") and len(created.id) > 8
    assert created.version == 1
    assert created.created_at == created.updated_at
    assert created.created_at.tzinfo is not None and created.created_at.utcoffset() == UTC.utcoffset(None)
    assert created.aliases == ["HP"]
    assert store.get_target(created.id) == created

    updated = store.update_target(created.id, TargetPatch(description="a boy wizard", policy="refuse"))
    assert (updated.version, updated.description, updated.policy) == (2, "a boy wizard", "refuse")
    assert updated.forbidden == ["Hogwarts"]
    assert updated.created_at == created.created_at < updated.updated_at
    assert store.get_target(created.id) == updated

    assert store.delete_target(created.id) == updated
    with pytest.raises(TargetNotFound):
        store.get_target(created.id)


@pytest.mark.parametrize(
    "call",
    [
        lambda store: store.get_target("tgt_missing"),
        lambda store: store.update_target("tgt_missing", TargetPatch(description="x")),
        lambda store: store.delete_target("tgt_missing"),
    ],
)
def test_unknown_ids_are_not_found(store: SQLiteStore, call: Callable[[SQLiteStore], object]) -> None:
    with pytest.raises(TargetNotFound, match="tgt_missing"):
        call(store)


def test_names_are_unique_ignoring_case(store: SQLiteStore) -> None:
    first = store.create_target(TargetSpec(name="Harry Potter"))
    with pytest.raises(DuplicateTargetName, match=first.id):
        store.create_target(TargetSpec(name="HARRY POTTER"))
    other = store.create_target(TargetSpec(name="Voldemort"))
    with pytest.raises(DuplicateTargetName):
        store.update_target(other.id, TargetPatch(name="harry potter"))
    assert store.update_target(first.id, TargetPatch(name="harry potter")).name == "harry potter"


def test_a_patch_that_changes_nothing_writes_nothing(store: SQLiteStore) -> None:
    target = store.create_target(TargetSpec(name="Harry Potter", policy="refuse"))
    revision = store.revision()
    assert store.update_target(target.id, TargetPatch(policy="refuse", description=None)) == target
    assert store.revision() == revision
    assert len(store.list_audit().data) == 1


def test_expected_version_guards_writes(store: SQLiteStore) -> None:
    target = store.create_target(TargetSpec(name="Harry Potter"))
    store.update_target(target.id, TargetPatch(description="v2"), expected_version=1)
    with pytest.raises(VersionMismatch, match="version 2, not 1"):
        store.update_target(target.id, TargetPatch(description="v3"), expected_version=1)
    with pytest.raises(VersionMismatch):
        store.delete_target(target.id, expected_version=1)
    store.delete_target(target.id, expected_version=2)


def test_revision_grows_with_every_target_change_only(store: SQLiteStore) -> None:
    seen = [store.revision()]
    target = store.create_target(TargetSpec(name="Harry Potter"))
    seen.append(store.revision())
    store.update_target(target.id, TargetPatch(enabled=False))
    seen.append(store.revision())
    store.append_audit(AuditRecord(kind="request", action="steer", target_ids=[target.id]))
    assert store.revision() == seen[-1]
    store.delete_target(target.id)
    seen.append(store.revision())
    assert seen == sorted(set(seen)) and len(seen) == 4
    snapshot = store.snapshot()
    assert (snapshot.revision, snapshot.targets) == (seen[-1], ())


def test_targets_survive_a_restart_and_replicas_see_changes(path: Path) -> None:
    first = SQLiteStore(path)
    target = first.create_target(TargetSpec(name="Harry Potter", documents=["The boy who lived."]))
    replica = SQLiteStore(path)
    assert replica.get_target(target.id) == target
    assert replica.revision() == first.revision()

    changed = first.update_target(target.id, TargetPatch(enabled=False))
    assert replica.revision() == first.revision()
    assert replica.snapshot().targets == (changed,)
    first.close()
    replica.close()

    reopened = SQLiteStore(path)
    assert reopened.get_target(target.id) == changed
    assert [record.action for record in reopened.list_audit().data] == ["target.update", "target.create"]
    reopened.close()


def test_wal_mode(store: SQLiteStore) -> None:
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize(
    "write",
    [
        lambda store, target: store.create_target(TargetSpec(name="Voldemort")),
        lambda store, target: store.update_target(target.id, TargetPatch(name="Voldemort")),
        lambda store, target: store.delete_target(target.id),
    ],
)
def test_a_failing_write_leaves_the_previous_state(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch, write: Callable[..., object]
) -> None:
    """The audit record is written last in each transaction: failing there must undo the whole change."""
    target = store.create_target(TargetSpec(name="Harry Potter"))
    before = (store.snapshot(), store.list_audit())

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store, "_insert_audit", fail)
    with pytest.raises(OSError, match="disk full"):
        write(store, target)
    monkeypatch.undo()
    assert (store.snapshot(), store.list_audit()) == before
    store.create_target(TargetSpec(name="Voldemort"))  # and the store is still usable


def test_a_crash_in_the_middle_of_a_write_leaves_the_previous_state(store: SQLiteStore, path: Path) -> None:
    """A process that dies between writing a target and committing leaves no trace of the change."""
    target = store.create_target(TargetSpec(name="Harry Potter"))
    crash = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from lethe.gateway.store import SQLiteStore
        from lethe.guards.targets import TargetPatch

        store = SQLiteStore(Path({str(path)!r}))
        store._insert_audit = lambda *args: os._exit(3)
        store.update_target({target.id!r}, TargetPatch(description="half written"))
        """
    )
    result = subprocess.run([sys.executable, "-c", crash], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert store.get_target(target.id) == target
    assert store.revision() == 1
    store.create_target(TargetSpec(name="Voldemort"))  # the crashed writer's lock is gone


def test_target_pages_follow_registration_order_across_deletions(store: SQLiteStore) -> None:
    targets = [store.create_target(TargetSpec(name=f"target {index}")) for index in range(5)]
    first = store.list_targets(limit=2)
    assert [t.id for t in first.data] == [t.id for t in targets[:2]]
    assert first.has_more and first.next_cursor
    store.delete_target(targets[1].id)  # the cursor's own target: the next page must not move
    second = store.list_targets(limit=2, after=first.next_cursor)
    assert [t.id for t in second.data] == [t.id for t in targets[2:4]]
    last = store.list_targets(limit=2, after=second.next_cursor)
    assert [t.id for t in last.data] == [targets[4].id]
    assert (last.has_more, last.next_cursor) == (False, None)
    assert store.list_targets(limit=4).has_more is False


@pytest.mark.parametrize("cursor", ["abc", "-1", "1.5", "9" * 40])
def test_foreign_cursors_are_refused(store: SQLiteStore, cursor: str) -> None:
    with pytest.raises(InvalidCursor):
        store.list_targets(after=cursor)
    with pytest.raises(InvalidCursor):
        store.list_audit(after=cursor)


def test_admin_changes_are_audited_with_changed_fields(store: SQLiteStore) -> None:
    target = store.create_target(TargetSpec(name="Harry Potter", forbidden=["Hogwarts"]))
    store.update_target(target.id, TargetPatch(forbidden=["Hogwarts", "Dumbledore"], policy="steer"))
    store.delete_target(target.id)
    records = store.list_audit().data
    assert [(r.kind, r.action, r.target_ids) for r in records] == [
        ("admin", "target.delete", [target.id]),
        ("admin", "target.update", [target.id]),
        ("admin", "target.create", [target.id]),
    ]
    assert [r.detail["fields"] for r in records] == [[], ["forbidden"], ["forbidden", "name"]]
    assert all(r.detail["name"] == "Harry Potter" and r.time.tzinfo is not None for r in records)
    assert records[0].id > records[1].id > records[2].id


def test_request_records_are_appended_off_the_event_loop_and_filtered(store: SQLiteStore) -> None:
    harry = store.create_target(TargetSpec(name="Harry Potter"))
    volde = store.create_target(TargetSpec(name="Voldemort"))

    async def serve() -> list[AuditRecord]:
        return list(
            await asyncio.gather(
                store.append_audit_async(
                    AuditRecord(
                        kind="request",
                        action="steer",
                        target_ids=[harry.id, volde.id, harry.id],
                        request_id="chatcmpl-1",
                        suppressed_tokens=3,
                        detail={"model": "tiny"},
                        prompt="Who is Harry Potter?",
                    )
                ),
                store.append_audit_async(
                    AuditRecord(
                        kind="request", action="refuse", target_ids=[volde.id], request_id="chatcmpl-2"
                    )
                ),
            )
        )

    appended = asyncio.run(serve())
    assert all(record.id is not None for record in appended)
    requests = store.list_audit(kind="request").data
    assert {r.request_id for r in requests} == {"chatcmpl-1", "chatcmpl-2"}
    steered = next(r for r in requests if r.request_id == "chatcmpl-1")
    assert (steered.suppressed_tokens, steered.detail, steered.target_ids) == (
        3,
        {"model": "tiny"},
        [harry.id, volde.id, harry.id],
    )
    assert steered.prompt is None  # prompts are not audited by default

    assert [r.action for r in store.list_audit(target_id=harry.id).data] == ["steer", "target.create"]
    assert [r.request_id for r in store.list_audit(kind="request", target_id=volde.id).data] == [
        r.request_id for r in requests
    ]
    assert store.list_audit(target_id="tgt_other").data == []
    assert [r.action for r in store.list_audit(kind="admin").data] == ["target.create"] * 2


def test_prompts_are_kept_only_when_asked(tmp_path: Path) -> None:
    store = open_store(Settings(home=tmp_path, audit_prompts=True))
    assert isinstance(store, SQLiteStore) and store.path == tmp_path / "lethe.db"
    store.append_audit(AuditRecord(kind="request", action="refuse", prompt="Who is Harry Potter?"))
    assert store.list_audit().data[0].prompt == "Who is Harry Potter?"
    store.close()


def test_audit_pages_go_from_newest_to_oldest(store: SQLiteStore) -> None:
    for index in range(5):
        store.append_audit(AuditRecord(kind="request", action="steer", request_id=str(index)))
    seen: list[str | None] = []
    after = None
    while True:
        page = store.list_audit(limit=2, after=after)
        seen.extend(record.request_id for record in page.data)
        if not page.has_more:
            break
        after = page.next_cursor
    assert seen == ["4", "3", "2", "1", "0"]
