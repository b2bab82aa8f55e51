"""The admin key: LETHE_ADMIN_KEY, or else one generated once and kept in LETHE_HOME/admin.key.

The admin API must never be open by default, yet a first `lethe serve` should need no setup, so
a missing key is generated. Operators script against it, so it is reused on later starts; it is a
secret, so it lives in a file only its owner can read and only the file's location is logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
from pathlib import Path

from lethe.gateway.config import Settings

logger = logging.getLogger(__name__)

KEY_FILE = "admin.key"


def load_admin_key(settings: Settings) -> str:
    configured = settings.admin_key.strip()
    if configured:
        return configured
    path = settings.home / KEY_FILE
    if not path.exists():
        _create_key_file(path)
    key = path.read_text().strip()
    if not key:
        raise SystemExit(f"{path} is empty: delete it to generate a new admin key, or set LETHE_ADMIN_KEY")
    if path.stat().st_mode & 0o077:
        logger.warning("%s can be read by other users; chmod 600 it", path)
    logger.info("admin key (for Authorization: Bearer on /admin): in %s", path)
    return key


def _create_key_file(path: Path) -> None:
    """Write the whole key to a private temporary file, then link it into place: no reader ever sees
    a partial key, and of two servers starting together on one home the second keeps the first's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{KEY_FILE}.")  # mode 0600
    try:
        with os.fdopen(descriptor, "w") as sink:
            sink.write(f"lethe-admin-{secrets.token_urlsafe(32)}\n")
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        os.unlink(temporary)
