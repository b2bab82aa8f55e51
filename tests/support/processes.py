"""Process-tree checks from /proc, for tests that a gateway leaves no child process behind."""

from __future__ import annotations

from pathlib import Path


def _stat_fields(pid: str) -> list[str] | None:
    try:
        return (Path("/proc") / pid / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(entry.name)) is not None:
            parents[int(entry.name)] = int(fields[1])
    return parents


def children(pid: int) -> list[int]:
    return [child for child, parent in _parents().items() if parent == pid]


def _command(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def workers(pid: int) -> list[int]:
    """The `lethe worker` children of `pid` (a gateway also has its engine's processes)."""
    return [child for child in children(pid) if "worker" in _command(child)[3:4]]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (children of children included)."""
    parents = _parents()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    fields = _stat_fields(str(pid))
    return fields is not None and fields[0] != "Z"
