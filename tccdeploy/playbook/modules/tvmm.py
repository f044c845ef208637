"""tvmm_deploy: put a TVMM build on a node, make it the next boot, reboot into it.

Artifacts move by digest: the manifest's sha256 is checked on the controller before upload and
on the node before the file is renamed into `<tcc_boot_dir>/<build>/`, and only artifacts not
already there with that digest are sent; one that another installed build already holds (a new
kernel's build shares the initramfs with the running one) is copied on the node instead. The reboot is the host's `tcc_reboot_command`, run on
the controller (out of band, as `ipmitool chassis power cycle` would be; the lab provides one),
then the module waits for a fresh SSH login and checks the node now runs the build (from its
kernel command line, `tcc_proc_cmdline`, default /proc/cmdline). Whether that boot is trusted is
for `attest` to say, from a quote; this module only installs and boots.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import tempfile
from typing import Any

from ...crypto.files import sha256_file
from ...manifest.models import TVMMBuild
from ..templar import render
from . import Context, ModuleError, module
from .basic import put_file, wait_for

REBOOT_TIMEOUT = 600.0  # the command may wait for the boot: a lab real-boot node under TCG takes a minute or more


def _build(ctx: Context, name: str) -> TVMMBuild:
    builds = ctx.run.builds()
    build = next((b for b in builds if b.name == name), None)
    if build is None:
        known = ", ".join(sorted(b.name for b in builds)) or "none"
        raise ModuleError(f"tvmm_deploy: no TVMMBuild {name!r} in the manifests (builds: {known})")
    return build


def _sources(build: TVMMBuild, scratch: str) -> dict[str, tuple[str, str]]:
    """artifact -> (local file, sha256), each checked against the manifest before anything moves."""
    out = {}
    for name, artifact in sorted(build.artifacts.items()):
        if artifact.path is not None:
            local = artifact.path
            if not os.path.isfile(local):
                raise ModuleError(f"tvmm_deploy: artifact {name} of {build.name} is missing at {local}")
            actual = sha256_file(local)
        elif artifact.value is not None:
            local = os.path.join(scratch, name)
            with open(local, "w") as fh:
                fh.write(artifact.value)
            actual = hashlib.sha256(artifact.value.encode()).hexdigest()
        else:
            raise ModuleError(f"tvmm_deploy: artifact {name} of {build.name} has neither path nor value")
        if actual != artifact.sha256:
            raise ModuleError(f"tvmm_deploy: artifact {name} at {local} has sha256 {actual}; the manifest of "
                              f"{build.name} says {artifact.sha256}: refusing to deploy it")
        out[name] = (local, actual)
    return out


def _reboot(ctx: Context) -> str:
    raw = ctx.host.vars.get("tcc_reboot_command")
    if not raw:
        raise ModuleError(f"tvmm_deploy: {ctx.name} has no tcc_reboot_command; set it in the inventory to a command "
                          "the controller runs to power-cycle the host (the lab's inventory has one)")
    command = str(render(raw, ctx.vars))
    try:
        argv = shlex.split(command)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=REBOOT_TIMEOUT)
    except (ValueError, OSError, subprocess.TimeoutExpired) as exc:
        raise ModuleError(f"tvmm_deploy: the reboot command {command!r} did not run: {exc}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ModuleError(f"tvmm_deploy: the reboot command {command!r} failed (exit {done.returncode}): "
                          f"{detail[-1] if detail else 'no output'}")
    return command


def _describe(running: str | None, nxt: str | None) -> str:
    return f"running: {running or '(unknown)'}\nnext boot: {nxt or '(not set)'}\n"


@module("tvmm_deploy")
def tvmm_deploy(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    build = _build(ctx, str(args["build"]))
    if not build.admissible:
        return {"failed": True, "changed": False, "reason": "build.revoked",
                "msg": f"{build.name} is {build.status} in the manifests; it would not be admitted: refusing to deploy it"}
    if not build.artifacts:
        return {"failed": True, "changed": False, "reason": "build.no-artifacts",
                "msg": f"{build.name} lists no artifacts (a build captured from a node's boot has none): add its files "
                       "under spec.artifacts, or predict the build from them (tccdeploy build predict), to deploy it"}
    nodes = build.rollout.nodes if build.rollout else ()
    if build.status == "candidate" and ctx.name not in nodes and not any(n.startswith("sha256:") for n in nodes):
        # The TC would refuse it there (build.not-in-rollout); saying so before the node is drained and rebooted
        # keeps the node in service. (Where a rollout names nodes by EK, the TC alone can tell.)
        named = ", ".join(build.rollout.nodes) if build.rollout else "none"
        return {"failed": True, "changed": False, "reason": "build.not-in-rollout",
                "msg": f"{build.name} is a candidate whose rollout names {named}, not {ctx.name}: the TC would not admit "
                       f"it there; deploy it on a rollout node, or approve the build first"}
    if args.get("check_only"):
        return {"changed": False, "msg": f"{build.name} ({build.status}) may go on {ctx.name}"}
    reboot = bool(args.get("reboot", True))
    boot_dir = ctx.host.vars.get("tcc_boot_dir", "/boot/tccdeploy")
    if not boot_dir:
        raise ModuleError(f"tvmm_deploy: {ctx.name} has no tcc_boot_dir (where its boot loader reads builds) in the inventory")
    boot_dir = str(render(boot_dir, ctx.vars))
    cmdline = str(render(ctx.host.vars.get("tcc_proc_cmdline", "/proc/cmdline"), ctx.vars))
    with tempfile.TemporaryDirectory(prefix="tccdeploy-tvmm-") as scratch:
        sources = _sources(build, scratch)
        state = ctx.session.call("boot_state", {"boot_dir": boot_dir, "cmdline": cmdline, "build": build.name,
                                                "artifacts": {n: d for n, (_, d) in sources.items()}})
        missing = [n for n, ok in state["present"].items() if not ok]
        set_next = state["next"] != build.name
        reboot_needed = reboot and state["running"] != build.name
        result: dict[str, Any] = {"build": build.name, "boot_dir": boot_dir, "installed": missing,
                                  "running_before": state["running"]}
        if not (missing or set_next or reboot_needed):
            return result | {"changed": False, "running": state["running"]}
        result["diff"] = {
            "before": _describe(state["running"], state["next"]) + "".join(f"{build.name}/{n}: absent or different\n" for n in missing),
            "after": _describe(build.name if reboot_needed or state["running"] == build.name else state["running"], build.name)
            + "".join(f"{build.name}/{n}: sha256 {sources[n][1]}\n" for n in missing),
            "before_header": f"{ctx.name} boot", "after_header": f"{ctx.name} boot",
        }
        if ctx.check:
            return result | {"changed": True, "msg": f"would install {len(missing)} artifact(s)"
                             + (", set the next boot" if set_next else "") + (", reboot" if reboot_needed else "")}
        session = ctx.session
        folder = session.call("boot_prepare", {"boot_dir": boot_dir, "build": build.name})["folder"]
        elsewhere = state.get("elsewhere", {})
        for name in missing:
            local, digest = sources[name]
            if name in elsewhere:  # the same file in another installed build: copied there, not uploaded
                session.call("boot_reuse", {"boot_dir": boot_dir, "build": build.name, "name": name,
                                            "source": elsewhere[name], "sha256": digest})
            else:
                put_file(session, local, f"{folder}/{name}", digest, "0644")
        result["reused"] = {name: elsewhere[name] for name in missing if name in elsewhere}
        result["uploaded"] = [name for name in missing if name not in elsewhere]  # what crossed the network
    if set_next:
        session.call("boot_set_next", {"boot_dir": boot_dir, "build": build.name})
    if not reboot_needed:
        return result | {"changed": True, "running": state["running"]}
    command = _reboot(ctx)
    waited = wait_for(ctx, float(args.get("timeout", 300)))
    after = ctx.session.call("boot_state", {"boot_dir": boot_dir, "cmdline": cmdline, "build": build.name, "artifacts": {}})
    result |= {"changed": True, "rebooted": True, "reboot_command": command, "running": after["running"],
               "reboot_seconds": round(waited, 2)}
    if after["running"] != build.name:
        result.update(failed=True, reason="tvmm.boot", msg=f"{ctx.name} booted {after['running'] or 'an unknown build'}, "
                                                           f"not {build.name}")
    return result
