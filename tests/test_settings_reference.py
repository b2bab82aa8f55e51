"""docs/configuration.md is generated from Settings; a setting added without regenerating it fails here."""

from __future__ import annotations

from pathlib import Path

from lethe.gateway.cli.settings_reference import reference
from lethe.gateway.config import Settings

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_the_committed_reference_is_current() -> None:
    assert PAGE.read_text() == reference(), (
        "regenerate: python -m lethe.gateway.cli.settings_reference > docs/configuration.md"
    )


def test_every_setting_is_described() -> None:
    text = reference()
    for name, info in Settings.model_fields.items():
        assert f"`LETHE_{name.upper()}`" in text
        assert info.description, f"{name} has no description"
