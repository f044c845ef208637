"""How busy this machine's cores were while a benchmark's clock ran.

Why: on a machine whose cores the clients, the servers under test and their peers all share, a
ratio says little until one knows whether the cores were the limit. A row that kept every core
busy cannot go faster here whatever its code does; one that left cores idle waited on something
else (a lock, the GIL, a round trip). The benchmarks print this beside their figures.
"""

from __future__ import annotations

import os

TICK = os.sysconf("SC_CLK_TCK")


def _ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores since boot, from /proc/stat's first line."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


class Busy:
    """start(), then stop(): the fraction of all cores' time spent busy between the two
    (.fraction), and the number of cores that makes (.cores). `with Busy() as busy:` does both."""

    def __init__(self) -> None:
        self.fraction = 0.0
        self.cores = 0.0
        self._start = (0, 0)

    def __enter__(self) -> Busy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Busy:
        self._start = _ticks()
        return self

    def stop(self) -> float:
        busy, total = _ticks()
        spent = total - self._start[1]
        self.fraction = (busy - self._start[0]) / spent if spent > 0 else 0.0
        self.cores = self.fraction * (os.cpu_count() or 1)
        return self.fraction


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU of these processes and of their children that have exited."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / TICK


def with_children(pid: int) -> list[int]:
    """A process and its live children (PostgreSQL's backends; `tc serve`'s fronts)."""
    out = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent = int(fh.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if parent == pid:
                out.append(int(entry))
    return out
