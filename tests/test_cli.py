"""Configuration: `lethe serve --help` documents every LETHE_ setting, and nested ones are read."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import BaseModel, ValidationError

from lethe.gateway.config import Settings


def test_serve_help_documents_configuration() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lethe.gateway.cli.main", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in ("--host", "--port", "--model", "--engine"):
        assert flag in result.stdout
    for name, field in Settings.model_fields.items():
        assert f"LETHE_{name.upper()}" in result.stdout
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            for inner in field.annotation.model_fields:
                assert f"LETHE_{name.upper()}__{inner.upper()} " in result.stdout


def test_detection_and_guard_knobs_are_read_from_nested_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_DETECTION__CONTENT_THRESHOLD", "0.8")
    monkeypatch.setenv("LETHE_GUARD__REFUSAL", "Not today.")
    settings = Settings()
    assert settings.detection.content_threshold == 0.8
    assert settings.detection.identity_threshold == 0.68  # the others keep their defaults
    assert settings.guard.refusal == "Not today."
    monkeypatch.setenv("LETHE_GUARD__PENALTY", "-1")
    with pytest.raises(ValidationError, match=r"guard\.penalty"):
        Settings()
