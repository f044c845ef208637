"""Playbook modules: each makes one thing true on a host (or at the TC), idempotently.

A module is a function of a Context returning a result dict: `changed`, `failed`, `msg`,
`skipped`, optional `diff` ({before, after, before_header, after_header}) and its own data. It
reports `changed` only when it changed something, and in check mode changes nothing and says
what it would change. Errors of the node (unreachable, helper failures) are raised and turned
into results by the runner, as for every other engine work.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ...coordinator.interface import TC
    from ...engine.runner import Engine, Session
    from ...inventory import Host, Inventory


class ModuleError(Exception):
    """The task cannot run as written (bad argument, missing file): a failed host, plainly said."""


@dataclass
class RunState:
    """What every task of an `apply` run shares: the engine (one session per host for the whole
    run), the TC (opened on first use) and the options."""

    engine: Engine
    inventory: Inventory
    playbook_dir: str
    manifests: list[str]
    state: str | None
    check: bool = False
    diff: bool = False
    tc_url: str | None = None
    engine_dir: str | None = None
    exclusive: threading.Lock = field(default_factory=threading.Lock)
    _coordinator: TC | None = None
    _tc_lock: threading.Lock = field(default_factory=threading.Lock)
    _scratch: str | None = None

    def coordinator(self) -> TC:
        """The embedded TC over the manifests, or the served one at tc_url (same methods)."""
        with self._tc_lock:
            if self._coordinator is None and self.tc_url:
                from ...config import state_dir
                from ...coordinator.client import RemoteCoordinator, TCUnavailable

                try:
                    self._coordinator = RemoteCoordinator(
                        self.tc_url, self.engine_dir or os.path.join(state_dir(self.state), "engine"))
                except TCUnavailable as exc:
                    raise ModuleError(str(exc)) from None
            if self._coordinator is None:
                from ...config import state_dir
                from ...coordinator.service import REGISTRY_FILE, Coordinator
                from ...manifest.loader import load_manifests

                if not self.manifests:
                    raise ModuleError("this module needs the perimeter and TVMM builds: give -m PATH "
                                      "(or set $TCCDEPLOY_MANIFESTS)")
                result = load_manifests(self.manifests)
                if result.perimeter is None:
                    raise ModuleError(f"exactly one Perimeter is needed in {' '.join(self.manifests)}; it holds "
                                      f"{result.holds()}")
                state = self.state
                if self.check and not os.path.exists(os.path.join(state_dir(state), REGISTRY_FILE)):
                    # Check mode changes nothing, not even by creating an empty registry: predict
                    # against an empty one that is thrown away.
                    self._scratch = tempfile.mkdtemp(prefix="tccdeploy-check-")
                    state = self._scratch
                from ...config import note_embedded

                note_embedded(state_dir(state))
                self._coordinator = Coordinator.from_manifests(result, state)
            return self._coordinator

    def builds(self) -> list[Any]:
        """TVMM builds with their artifacts: the manifests' (-m), which a served TC does not ship."""
        if self.tc_url:
            if not self.manifests:
                raise ModuleError("tvmm_deploy needs the TVMMBuild manifests (-m PATH) for the artifacts it installs")
            from ...manifest.loader import load_manifests

            return list(load_manifests(self.manifests).builds)
        return list(self.coordinator().builds)

    def close(self) -> None:
        if self._coordinator is not None:
            self._coordinator.close()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)


@dataclass(frozen=True)
class Become:
    """Run as another user through sudo (become_method: sudo). The password, when the inventory
    gives one (ansible_become_password), goes to sudo's stdin, never into argv or a log."""

    user: str = "root"
    password: str | None = field(default=None, repr=False)

    def wrap(self, argv: list[str]) -> list[str]:
        """argv as sudo runs it: -S reads the password from stdin (with an empty prompt), -n
        fails at once when a password is needed and none was given, rather than hang."""
        auth = ["-S", "-p", ""] if self.password is not None else ["-n"]
        return ["sudo", "-H", *auth, "-u", self.user, "--", *argv]

    @property
    def stdin(self) -> bytes | None:
        return None if self.password is None else (self.password + "\n").encode()


@dataclass
class Context:
    host: Host
    args: dict[str, Any]
    vars: Mapping[str, Any]
    run: RunState
    delegated: bool = False
    check_override: bool | None = None  # the task's check_mode keyword
    diff_override: bool | None = None  # the task's diff keyword
    base_dir: str = ""  # the folder of the file the task was written in
    role_path: str | None = None
    via: Host | None = None  # delegate_to another inventory host: its connection, this host's variables
    become: Become | None = None

    @property
    def check(self) -> bool:
        return self.run.check if self.check_override is None else self.check_override

    @property
    def diff(self) -> bool:
        return self.run.diff if self.diff_override is None else self.diff_override

    def find(self, name: str, sub: str) -> str:
        """A local file a task names (copy's src, template's src), found where Ansible looks:
        the role's or playbook's sub folder (files/, templates/), beside the task's file, the
        playbook's folder."""
        if os.path.isabs(name):
            return name
        folders = [os.path.join(self.role_path, sub), self.role_path] if self.role_path else []
        folders += [os.path.join(self.base_dir, sub), self.base_dir] if self.base_dir else []
        folders += [os.path.join(self.run.playbook_dir, sub), self.run.playbook_dir]
        candidates = [os.path.join(folder, name) for folder in folders]
        return next((c for c in candidates if os.path.isfile(c)), candidates[-1])

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def local(self) -> bool:
        """The task runs on the controller: delegated, or the host is the controller itself."""
        return self.delegated or (self.via or self.host).vars.get("ansible_connection") == "local"

    @property
    def session(self) -> Session:
        if self.local:
            raise ModuleError(f"this module works on a node over SSH; {self.name} is the controller here")
        return self.run.engine.session(self.via or self.host)

    def fresh_session(self) -> Session:
        """A new connection and helper: after a reboot, the old ones are dead."""
        stale = self.run.engine.sessions.pop(self.name, None)
        if stale is not None:
            stale.close()
        return self.session

    @property
    def tc(self) -> TC:
        return self.run.coordinator()


Module = Callable[[Context], dict[str, Any]]
MODULES: dict[str, Module] = {}


def module(name: str) -> Callable[[Module], Module]:
    def register(func: Module) -> Module:
        MODULES[name] = func
        return func

    return register


def load_all() -> dict[str, Module]:
    from . import basic, trust, tvmm, vms  # noqa: F401 - registers the modules

    return MODULES
