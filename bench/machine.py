"""How busy this machine's cores were while a benchmark's clock ran.

Why: on a machine whose cores the clients, the servers under test and their peers all share, a
ratio says little until one knows whether the cores were the limit. A row that kept every core
busy cannot go faster here whatever its code does; one that left cores idle waited on something
else (a lock, the GIL, a round trip). The benchmarks print this beside their figures.
"""

from __future__ import annotations

import os


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
