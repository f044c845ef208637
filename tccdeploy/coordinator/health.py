"""What a served TC knows about its own ability to decide: whether its store takes writes, and
whether its wall clock can be believed.

The registry's lifetimes (nonces, challenges, tickets, releases) are wall-clock times, because
replicas on other machines share them. A wall clock stepped backwards would make expired
things young again; the replay horizon (store.py) keeps used tokens used, and this guard keeps
the service from deciding at all while its clock is behind what it has already seen. Lifetimes
inside one process (how long a store failure counts, how long the clock has been behind) are
measured on the monotonic clock, which no one can step.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

CLOCK_TOLERANCE = 5.0  # seconds the wall clock may step back (NTP's corrections) before the TC stops deciding
STORE_MEMORY = 30.0  # seconds a store failure keeps /readyz failing unless a write succeeds since


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str
    retry_after: int


class Health:
    """Shared by the API's worker threads."""

    def __init__(self, tolerance: float = CLOCK_TOLERANCE, wall=time.time, mono=time.monotonic,  # type: ignore[no-untyped-def]
                 log=lambda line: print(line, file=sys.stderr, flush=True)) -> None:
        self._lock = threading.Lock()
        self.tolerance = tolerance
        self._wall, self._mono = wall, mono
        self._high = wall()  # the latest wall time this process has seen
        self._store: tuple[str, str, float] | None = None  # (reason, message, monotonic time)
        self.clock_steps_back = 0  # how many times the guard found the clock behind (a metric)
        self._clock_reported = False
        self.log = log

    # -- the clock ------------------------------------------------------------------------
    def clock(self) -> Problem | None:
        """A Problem while the wall clock is more than the tolerance behind the latest time this
        process saw: deciding now would judge lifetimes on a clock that went back. It clears
        when the clock has caught up (or the operator restarts the service, which accepts the
        clock as it is; the replay horizon still holds)."""
        now = self._wall()
        with self._lock:
            behind = self._high - now
            if behind > self.tolerance:
                self.clock_steps_back += 1
                problem = Problem("clock.backwards",
                                  f"the TC's wall clock is {behind:.0f} s behind a time it saw already: it decides "
                                  "nothing until the clock catches up (fix the clock; restarting `tc serve` accepts "
                                  "it as it is)", int(min(behind, 300)) + 1)
                if not self._clock_reported:
                    self._clock_reported = True
                    self.log(f"tc serve: {problem.message}")
                return problem
            if self._clock_reported:
                self._clock_reported = False
                self.log("tc serve: the wall clock has caught up: deciding again")
            self._high = max(self._high, now)
            return None

    def clock_behind(self) -> float:
        with self._lock:
            return max(0.0, self._high - self._wall())

    # -- the store ------------------------------------------------------------------------
    def store_failed(self, reason: str, message: str) -> None:
        with self._lock:
            self._store = (reason, message, self._mono())

    def store_wrote(self) -> None:
        with self._lock:
            self._store = None

    def store(self) -> Problem | None:
        """The last store failure, if no write succeeded since and it is recent."""
        with self._lock:
            if self._store is None or self._mono() - self._store[2] > STORE_MEMORY:
                return None
            reason, message, _ = self._store
        return Problem(reason, message, retry_after(reason))


def retry_after(reason: str) -> int:
    """Seconds a client should wait: a full disk is fixed by a person, an outage often by a restart."""
    return 30 if reason == "store.full" else 5
