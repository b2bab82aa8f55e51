"""`lethe serve --help` documents every LETHE_ setting."""

from __future__ import annotations

import subprocess
import sys

from gateway.config import Settings


def test_serve_help_documents_configuration() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--help"], capture_output=True, text=True, check=True
    )
    for flag in ("--host", "--port", "--model", "--engine"):
        assert flag in result.stdout
    for name in Settings.model_fields:
        assert f"LETHE_{name.upper()}" in result.stdout
