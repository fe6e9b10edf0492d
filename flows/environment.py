"""Process environment for Prefect and DVC, set before either is imported.

Prefect keeps its database inside the project (``.prefect/``), waits long enough for a temporary server on
two slow cores, and sends no analytics; DVC sends none either. Values the user already set win.
"""

from __future__ import annotations

import os
from pathlib import Path


def configure(root: str | Path = ".") -> None:
    root = Path(root).resolve()
    defaults = {
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true"),
        "DVC_NO_ANALYTICS": "1",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
