"""The service's own settings, from its installation, never from the engine.

Where the TPM is, where the service keeps its state and VMs, which event log the firmware wrote:
a hostile engine that could name any of these would point the service at a TPM it controls or
have it read any file. So they come from a root-owned file next to the installed service
(`--config`, which only the forced command in `authorized_keys` names), with the defaults of a
real node.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

DEFAULTS = {
    "node": "",
    "tpm": "device:/dev/tpmrm0",
    "state_dir": "/var/lib/tccdeploy-tvmm",
    "eventlog": "/sys/kernel/security/tpm0/binary_bios_measurements",
}


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Config:
    node: str
    tpm: str
    state_dir: str
    eventlog: str

    def path(self, *parts: str) -> str:
        """A path in the service's state directory (0700, the TVMM user's alone)."""
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        return os.path.join(self.state_dir, *parts)


_current: Config | None = None


def load(path: str | None) -> Config:
    values = dict(DEFAULTS)
    if path:
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the service's configuration {path}: {exc}") from None
        unknown = set(data) - set(DEFAULTS) if isinstance(data, dict) else {"(not an object)"}
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
        values.update({k: str(v) for k, v in data.items()})
    return Config(**values)


def use(config: Config) -> None:
    global _current
    _current = config


def current() -> Config:
    if _current is None:  # in-process callers (tests) that did not configure: a real node's defaults
        use(load(None))
    assert _current is not None
    return _current


def read_record(name: str, what: str) -> Any:
    """A JSON record of the service's state (used tickets, resumed suspensions), None when there
    is none yet; an unreadable one is refused (tvmm.state), never taken as empty."""
    from .interface import ServiceError

    try:
        with open(current().path(name)) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise ServiceError("tvmm.state", f"the service's record of {what} is unreadable") from None
