"""Where tests find shared material and keep their converted model between runs."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LETHE_SHARED", REPO.parent / "shared"))
OPENAPI_SPEC = SHARED / "reference" / "openai-openapi.json"
EVAL_DATA = SHARED / "eval"
# The embedded model is converted once (~20 s) and reused by later test runs on the same checkout.
TEST_HOME = Path(os.environ.get("LETHE_TEST_HOME", REPO / ".lethe-test-home"))
