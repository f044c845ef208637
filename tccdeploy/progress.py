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
def _task(label: str, total: int | None, done: Callable[[float], str]) -> Iterator[Advance]:
    """A line on the display while the block runs; done(completed) says how far, in its unit."""
    display = _display
    if display is None:
        yield _nothing
        return
    task = display.add_task(label, total=total, done=done(0))

    def advance(n: int) -> None:
        display.advance(task, n)
        display.update(task, done=done(display.tasks[_index(display, task)].completed))

    try:
        yield advance
    finally:
        display.remove_task(task)
        display.refresh()  # at once: what the command prints next must not carry a finished bar


def transfer(label: str, total: int | None) -> Any:
    """Bytes moved (total None: not known in advance); a context manager yielding advance(n_bytes)."""
    from rich.filesize import decimal

    started = _clock()
    shown_total = f"/{decimal(int(total))}" if total else ""

    def done(completed: float) -> str:
        rate = completed / max(_clock() - started, 1e-6)
        return f"{decimal(int(completed))}{shown_total} {decimal(int(rate))}/s" if completed else ""

    return _task(label, total, done)


@contextmanager
def hosts(label: str, total: int) -> Iterator[Advance]:
    """Hosts done out of total in a fleet round (not shown for one host); yields advance(n_hosts)."""
    if total < 2:
        yield _nothing
        return
    with _task(label, total, lambda completed: f"{int(completed)}/{total} hosts") as advance:
        yield advance


def _index(display: Any, task: Any) -> int:
    return next(i for i, t in enumerate(display.tasks) if t.id == task)


def _clock() -> float:
    import time

    return time.monotonic()


__all__ = ["active", "hosts", "shown", "transfer"]
