"""Registered targets as the store returns them, for tests that compile or detect without a store."""

from __future__ import annotations

from datetime import UTC, datetime

from lethe.guards.targets import Target

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def target(target_id: str, name: str, **fields: object) -> Target:
    return Target(id=target_id, name=name, version=1, created_at=NOW, updated_at=NOW, **fields)
