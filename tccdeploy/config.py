"""Where tccdeploy keeps its state on the controller."""

from __future__ import annotations

import os


def state_path(explicit: str | None = None) -> str:
    """--state DIR, else $TCCDEPLOY_STATE, else ~/.local/state/tccdeploy: where it is, made or not
    (what a command that only reads asks)."""
    return explicit or os.environ.get("TCCDEPLOY_STATE") or os.path.join(os.path.expanduser("~"), ".local", "state", "tccdeploy")


def state_dir(explicit: str | None = None) -> str:
    """state_path, created 0700 (and made 0700 again if someone opened it up)."""
    path = state_path(explicit)
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.stat(path).st_mode & 0o077:  # it holds the TC's keys and registry, or the engine's credentials
        os.chmod(path, 0o700)
    return path


_NOTED: set[str] = set()


def note_embedded(state: str) -> None:
    """Say once per command that the TC is embedded: its keys and registry sit in `state` on
    this machine, so the provider and the TC are one party and TCCP's promise to customers does
    not hold. Fine for a lab or a test; a deployment runs `tccdeploy tc serve` elsewhere."""
    import sys

    if state in _NOTED:
        return
    _NOTED.add(state)
    print(f"note: embedded TC: the TC's keys and registry are on this machine ({state}); the provider and the TC are "
          "one party here. For customers to trust it, a third party runs `tccdeploy tc serve` and this engine uses "
          "--tc URL.", file=sys.stderr)
