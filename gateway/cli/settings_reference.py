"""The configuration reference (docs/configuration.md), generated from `Settings` so that it cannot
drift from the code: `python -m lethe.gateway.cli.settings_reference > docs/configuration.md`
(tests/test_settings_reference.py fails when the committed page is stale)."""

from __future__ import annotations

import sys
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from lethe.gateway.config import Settings

HEADER = """# Configuration reference

Every setting is an environment variable with the prefix `LETHE_`; `lethe serve` flags override
the ones they name. Nested settings use a double underscore (`LETHE_DETECTION__CONTENT_THRESHOLD`).
This page is generated from `gateway/config.py`:
`python -m lethe.gateway.cli.settings_reference > docs/configuration.md`.
"""


def _type(info: FieldInfo) -> str:
    annotation = info.annotation
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    return text or str(annotation).replace("typing.", "").replace("pathlib.", "")


def _default(info: FieldInfo) -> str:
    value: Any = info.default
    if value is PydanticUndefined and info.default_factory is not None:
        return "(see below)"
    if value is None or value == "":
        return "—"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, info in model.model_fields.items():
        rows.append(
            f"| `{prefix}{name.upper()}` | {_cell(_type(info))} | {_cell(_default(info))} "
            f"| {_cell(info.description or '')} |"
        )
    return rows


def _table(rows: list[str]) -> str:
    return "\n".join(["| variable | type | default | what it sets |", "|---|---|---|---|", *rows])


def reference() -> str:
    sections = [HEADER, "## Gateway\n", _table(_rows(Settings, "LETHE_"))]
    for name, info in Settings.model_fields.items():
        nested = info.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            prefix = f"LETHE_{name.upper()}__"
            sections += [f"\n## {name.capitalize()} (`{prefix}*`)\n", _cell(nested.__doc__ or ""), ""]
            sections.append(_table(_rows(nested, prefix)))
    return "\n".join(sections) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
