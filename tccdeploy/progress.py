"""Progress on a terminal for long work: bytes with rate and ETA, hosts done in a fleet round.

Sealing a real image, uploading it, copying a disk or streaming a migration takes minutes;
silence is indistinguishable from a hang. The work reports into this module wherever it
runs (the engine's worker threads included); the command line turns a display on only when
standard error is a terminal and the output is for people (`--json` turns it off), so pipes,
CI logs and machine-read output never get bars. rich draws them (on standard error).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Advance = Callable[[int], None]
_lock = threading.Lock()
_display: Any = None  # rich.progress.Progress while a command shows progress


def _nothing(_: int) -> None:
    return None


@contextmanager
def shown(enabled: bool) -> Iterator[None]:
    """Show progress for the duration (when enabled: a terminal, output for people)."""
    global _display
    if not enabled:
        yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    # One display for bytes and hosts alike: the `done` field says what (1.2/4.3 GB 210 MB/s, 7/30 hosts).
    display = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                       TextColumn("{task.fields[done]}"), TimeRemainingColumn(),
                       console=Console(stderr=True), transient=True)
    with _lock:
        _display = display
    try:
        with display:
            yield
    finally:
        with _lock:
            _display = None


def active() -> bool:
    return _display is not None


@contextmanager
def transfer(label: str, total: int | None) -> Iterator[Advance]:
    """Bytes moved (total None: not known in advance); yields advance(n_bytes)."""
    display = _display
    if display is None:
        yield _nothing
        return
    from rich.filesize import decimal

    task = display.add_task(label, total=total, done="")
    started = _clock()

    def advance(n: int) -> None:
        display.advance(task, n)
        done = display.tasks[_index(display, task)].completed
        elapsed = max(_clock() - started, 1e-6)
        shown_total = f"/{decimal(int(total))}" if total else ""
        display.update(task, done=f"{decimal(int(done))}{shown_total} {decimal(int(done / elapsed))}/s")

    try:
        yield advance
    finally:
        display.remove_task(task)
        display.refresh()  # at once: what the command prints next must not carry a finished bar


@contextmanager
def hosts(label: str, total: int) -> Iterator[Advance]:
    """Hosts done out of total in a fleet round; yields advance(n_hosts)."""
    display = _display
    if display is None or total < 2:
        yield _nothing
        return
    task = display.add_task(label, total=total, done=f"0/{total} hosts")

    def advance(n: int) -> None:
        display.advance(task, n)
        done = display.tasks[_index(display, task)].completed
        display.update(task, done=f"{int(done)}/{total} hosts")

    try:
        yield advance
    finally:
        display.remove_task(task)
        display.refresh()  # at once: what the command prints next must not carry a finished bar


def _index(display: Any, task: Any) -> int:
    return next(i for i, t in enumerate(display.tasks) if t.id == task)


def _clock() -> float:
    import time

    return time.monotonic()


__all__ = ["active", "hosts", "shown", "transfer"]
