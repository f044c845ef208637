"""Where tccdeploy keeps its state on the controller."""

from __future__ import annotations

import os


def state_dir(explicit: str | None = None) -> str:
    """--state DIR, else $TCCDEPLOY_STATE, else ~/.local/state/tccdeploy (created 0700)."""
    path = explicit or os.environ.get("TCCDEPLOY_STATE") or os.path.join(
        os.path.expanduser("~"), ".local", "state", "tccdeploy"
    )
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path
