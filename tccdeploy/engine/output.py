"""How a run looks: Ansible's ad-hoc lines for people, JSON for machines, a progress bar on
terminals. Every renderer reads the same HostResult events."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO

from .runner import HostResult

_LABEL = {"ok": "SUCCESS", "changed": "CHANGED", "failed": "FAILED", "unreachable": "UNREACHABLE!", "skipped": "SKIPPED"}
_COLOR = {"ok": "\033[32m", "changed": "\033[33m", "failed": "\033[31m", "unreachable": "\033[31m", "skipped": "\033[36m"}


class Output:
    """Text output: one block per host as its result arrives, and a summary line."""

    def __init__(self, verbosity: int = 0, json_mode: bool = False, out: TextIO | None = None,
                 err: TextIO | None = None, color: bool | None = None):
        self.verbosity = verbosity
        self.json_mode = json_mode
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.color = (self.out.isatty() if color is None else color) and not json_mode
        self.progress = self.err.isatty() and not json_mode
        self.total = 0
        self.done = 0
        self.started = time.monotonic()
        self.results: list[HostResult] = []
        self._lock = threading.Lock()

    def start(self, total: int, what: str) -> None:
        self.total, self.done, self.started = total, 0, time.monotonic()
        if self.verbosity and not self.json_mode:
            self.err.write(f"{what} on {total} host(s)\n")
        self._bar()

    def _bar(self) -> None:
        if not self.progress or not self.total:
            return
        width = 30
        filled = int(width * self.done / self.total)
        self.err.write(f"\r[{'=' * filled}{' ' * (width - filled)}] {self.done}/{self.total} hosts "
                       f"{time.monotonic() - self.started:5.1f}s")
        if self.done == self.total:
            self.err.write("\r" + " " * (width + 40) + "\r")
        self.err.flush()

    def result(self, result: HostResult, kind: str = "module") -> None:
        with self._lock:
            self.done += 1
            self.results.append(result)
            if not self.json_mode:
                if self.progress:
                    self.err.write("\r" + " " * 72 + "\r")
                self.out.write(self.render(result, kind))
                self.out.flush()
            self._bar()

    def render(self, result: HostResult, kind: str = "module") -> str:
        label = _LABEL[result.status]
        tint, reset = (_COLOR[result.status], "\033[0m") if self.color else ("", "")
        data = result.data
        if kind == "command" and "rc" in data and result.status != "unreachable":
            text = f"{tint}{result.host} | {label} | rc={data['rc']} >>{reset}\n"
            body = "\n".join(part for part in (data.get("stdout", ""), data.get("stderr", "")) if part)
            text += (body + "\n") if body else ""
        else:
            payload: dict[str, Any] = {"changed": result.status == "changed"}
            if result.status == "unreachable":
                payload.update(msg=result.msg, unreachable=True)
            elif result.status == "failed":
                payload.update(msg=result.msg, failed=True)
            else:
                payload.update({k: v for k, v in data.items() if k != "changed"})
            text = f"{tint}{result.host} | {label} => {json.dumps(payload, default=str)}{reset}\n"
        if result.traceback and self.verbosity >= 3:
            text += "The full traceback on the node was:\n" + result.traceback.rstrip() + "\n"
        elif result.traceback:
            text += "(-vvv shows the node's traceback)\n"
        return text

    def finish(self) -> None:
        if self.json_mode:
            json.dump([r.as_dict() for r in self.results], self.out, indent=2, default=str)
            self.out.write("\n")
            return
        counts: dict[str, int] = {}
        for r in self.results:
            counts[r.status] = counts.get(r.status, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        self.err.write(f"{len(self.results)} host(s): {summary or 'nothing to do'} in "
                       f"{time.monotonic() - self.started:.2f} s\n")
