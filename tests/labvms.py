"""Tests' clean-up of the lab's VMs, as the machine's root (the lab's controller) may do it: kill
a VM's QEMU by the PID its service wrote and remove its folder. This is the provider pulling the
plug, not a TCCP operation: the TC is not told, so use it only where the test's TC is gone or
does not matter any more. With a TC, tests end VMs as operators do (engine.lifecycle.end_vm)."""

from __future__ import annotations

import os
import shutil
import signal
import time

from tccdeploy.lab.lab import Lab


def kill_vm(lab: Lab, node: str, vm_id: str) -> bool:
    """Kill vm_id's QEMU on node (if it runs) and remove its folder; True when something was there."""
    directory = lab.node_dir(lab.node(node), "tvmm", "vms", vm_id)
    if not os.path.isdir(directory):
        return False
    try:
        with open(os.path.join(directory, "qemu.pid")) as fh:
            pid = int(fh.read().strip())
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):
            os.kill(pid, 0)
            time.sleep(0.01)
    except (OSError, ValueError):
        pass
    shutil.rmtree(directory, ignore_errors=True)
    return True


def kill_everywhere(lab: Lab, vm_id: str) -> None:
    for node in lab.nodes:
        kill_vm(lab, node.name, vm_id)
