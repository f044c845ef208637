"""procs.stop: a child asked to stop is waited for, and killed when it does not (none left behind)."""

from __future__ import annotations

import signal
import subprocess
import sys

from tccdeploy.procs import stop


def test_a_process_that_obeys_its_signal_is_reaped_with_its_status():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert stop(proc, 10, signal.SIGTERM) == -signal.SIGTERM


def test_a_process_that_ignores_its_signal_is_killed_after_the_wait():
    proc = subprocess.Popen([sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, "
                             "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    assert stop(proc, 0.5, signal.SIGTERM) == -signal.SIGKILL
    proc.stdout.close()


def test_a_process_already_gone_is_only_reaped():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert stop(proc, 1, signal.SIGTERM) == 0
