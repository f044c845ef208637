"""launch, migrate, drain: VMs placed and moved by the TC's rules, as playbook tasks.

A signed placement request is single use, so `launch` is idempotent by the request's id: a
request the TC already launched is `ok`, not launched twice. `migrate` to a named node where
the VM already runs is `ok`; `drain` of a node without running VMs is `ok`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ...coordinator.keybroker import Refused
from ...crypto import bundle as bundles
from ...engine.launch import launch as launch_vm
from ...engine.migrate import drain as drain_node
from ...engine.migrate import migrate as migrate_vm
from ...engine.placement import rank
from . import Context, ModuleError, module


def _envelope(ctx: Context) -> tuple[dict[str, Any], str]:
    path = str(ctx.args["request"])
    if not os.path.isabs(path):
        path = os.path.join(ctx.run.playbook_dir, path)
    try:
        with open(path) as fh:
            envelope = json.load(fh)
        envelope["request"]["id"], envelope["request"]["manifest"]["metadata"]["name"]  # noqa: B018 - shape check
    except FileNotFoundError:
        raise ModuleError(f"launch: no such request {path}; sign one with `tccdeploy request sign`") from None
    except (ValueError, KeyError, TypeError):
        raise ModuleError(f"launch: {path} is not a signed placement request (make it with `tccdeploy request sign`)") from None
    return envelope, path


@module("launch")
def launch(ctx: Context) -> dict[str, Any]:
    envelope, path = _envelope(ctx)
    request = envelope["request"]
    name = request["manifest"]["metadata"]["name"]
    tc = ctx.tc
    seen = tc.request_record(str(request["id"]))
    if seen is not None:
        vm = next((v for v in tc.vms() if v.request == seen.id), None)
        if seen.state == "launched" and vm is not None and vm.state != "destroyed":
            return {"changed": False, "vm": name, "node": vm.node, "state": vm.state,
                    "msg": f"request {request['id'][:12]} was launched before: {name} is {vm.state} on {vm.node}"}
        return {"failed": True, "changed": False, "reason": "request.replayed",
                "msg": f"request {request['id'][:12]} was submitted before ({seen.state}); a request is accepted "
                       "once: sign a new one"}
    engine = ctx.run.engine
    if ctx.check:
        owner = tc.customer_name(str(request.get("customer")))
        hosts = {h.name for h in engine.hosts}
        capacities = {h.name: int(h.vars.get("tcc_capacity", 4)) for h in engine.hosts}
        candidates = rank(request["manifest"]["spec"], [n for n in tc.nodes() if n.name in hosts],
                          tc.vms(), capacities, tc.builds, owner or "")
        first = next((c.node for c in candidates if c.eligible), None)
        return {"changed": True, "vm": name, "msg": f"would launch {name}" + (f" on {first}" if first else
                                                                              " (no node eligible now)")}
    with ctx.run.exclusive:  # placement counts VMs: two launches at once would both see the same room
        try:
            result = launch_vm(engine, tc, envelope, envelope["bundle"])
        except (Refused, bundles.BundleError) as exc:
            return {"failed": True, "changed": False, "reason": exc.reason, "msg": f"refused: {exc.reason}: {exc}"}
    receipt = ctx.args.get("receipt") or os.path.join(os.path.dirname(path), f"{name}.receipt.json")
    with open(receipt, "w") as fh:
        json.dump(result.receipt, fh, indent=2)
    return {"changed": True, "vm": name, "node": result.node, "receipt": receipt,
            "msg": f"{name} running on {result.node}; receipt in {receipt}"}


@module("migrate")
def migrate(ctx: Context) -> dict[str, Any]:
    vm_name, to = str(ctx.args["vm"]), str(ctx.args.get("to") or "auto")
    vm = ctx.tc.vm(vm_name)
    if vm is None or vm.node is None or vm.state == "destroyed":
        return {"failed": True, "changed": False, "reason": "migrate.unknown-vm", "msg": f"no VM {vm_name!r}"}
    if to == vm.node:
        return {"changed": False, "vm": vm_name, "node": to, "msg": f"{vm_name} already runs on {to}"}
    diff = {"before": f"{vm.node}\n", "after": f"{to}\n", "before_header": f"{vm_name} node", "after_header": f"{vm_name} node"}
    if ctx.check:
        return {"changed": True, "vm": vm_name, "diff": diff, "msg": f"would migrate {vm_name} from {vm.node} to {to}"}
    with ctx.run.exclusive:
        try:
            moved = migrate_vm(ctx.run.engine, ctx.tc, vm_name, to)
        except Refused as exc:
            return {"failed": True, "changed": False, "reason": exc.reason, "msg": f"refused: {exc.reason}: {exc}"}
    diff["after"] = f"{moved['to']}\n"
    return {"changed": True, "diff": diff, **moved}


@module("drain")
def drain(ctx: Context) -> dict[str, Any]:
    """Every running VM of the host migrates (encrypted) to a trusted node placement picks."""
    tc = ctx.tc
    running = [v for v in tc.vms() if v.node == ctx.name and v.state == "running"]
    if not running:
        return {"changed": False, "msg": f"no running VM on {ctx.name}", "vms": []}
    names = [v.name for v in running]
    if ctx.check:
        return {"changed": True, "vms": names, "msg": f"would migrate {', '.join(names)} off {ctx.name}"}
    with ctx.run.exclusive:
        results = drain_node(ctx.run.engine, tc, ctx.name)
    out: dict[str, Any] = {"changed": any(r["ok"] for r in results), "vms": results,
                           "msg": "; ".join(f"{r['vm']}: {r['result']}" for r in results)}
    if not all(r["ok"] for r in results):
        out["failed"] = True
    return out
