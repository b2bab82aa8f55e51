"""Durable state shared by every gateway replica and worker: the registered forget targets, the audit
trail, the offline unlearning jobs and which checkpoint serves.

`base` holds the `Store` contract, its records and errors; `sqlite` the embedded backend (SQLite in
WAL mode); `migrations` the numbered schema steps every backend applies when it opens. Import the
names from here: `from lethe.gateway.store import Store, open_store`.
"""

from __future__ import annotations

from lethe.gateway.config import Settings
from lethe.gateway.store.base import (
    BASE_CHECKPOINT,
    FINISHED_STATES,
    LOG_LINE_CHARS,
    LOG_TAIL_LINES,
    AuditKind,
    AuditRecord,
    DuplicateTargetName,
    InvalidCursor,
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
    Store,
    StoreError,
    TargetNotFound,
    TargetSnapshot,
    VersionMismatch,
    new_job_id,
    new_target_id,
    utc_now,
)
from lethe.gateway.store.migrations import LATEST as SCHEMA_VERSION
from lethe.gateway.store.migrations import SchemaTooNew
from lethe.gateway.store.sqlite import SQLiteStore

__all__ = [
    "BASE_CHECKPOINT",
    "FINISHED_STATES",
    "LOG_LINE_CHARS",
    "LOG_TAIL_LINES",
    "SCHEMA_VERSION",
    "AuditKind",
    "AuditRecord",
    "DuplicateTargetName",
    "InvalidCursor",
    "Job",
    "JobFinished",
    "JobNotFound",
    "JobState",
    "JobStats",
    "NotServing",
    "NothingToRollBack",
    "Page",
    "SQLiteStore",
    "SchemaTooNew",
    "ServingAction",
    "ServingChanged",
    "ServingCheckpoint",
    "Store",
    "StoreError",
    "TargetNotFound",
    "TargetSnapshot",
    "VersionMismatch",
    "new_job_id",
    "new_target_id",
    "open_store",
    "utc_now",
]


def open_store(settings: Settings) -> Store:
    """The store the settings name: the SQLite file LETHE_DATABASE, by default LETHE_HOME/lethe.db."""
    path = (settings.database or settings.home / "lethe.db").expanduser()
    return SQLiteStore(path, audit_prompts=settings.audit_prompts)
