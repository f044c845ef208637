"""tccdeploy's modules called by ansible-playbook: the one place the Ansible collection
(`collections/ansible_collections/tccdeploy/tccp`) reaches into tccdeploy.

The collection's action plugins run on the controller, as `apply` runs these modules: the
same functions (`tccdeploy.playbook.modules`), the same engine (SSH with strict host keys to
the node's admin login and TVMM service), the same served TC with the engine's certificate.
Nothing of tccdeploy is copied into the collection, so a module behaves the same under both
tools, and a fix lands in both.

Ansible runs each task on each host in a worker process of its own, so each call here opens
its sessions and closes them: slower than `apply`, which keeps one session per host for the
run (bench/apply.py measures both).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from .inventory import Host, Inventory

TCC_MODULES = ("enroll", "attest", "evict", "launch", "migrate", "drain", "enforce", "tvmm_deploy")
OPTIONS = ("tc_url", "engine_dir", "state", "manifests")
_CONNECTION_PREFIXES = ("ansible_", "tcc_")


def _plain(value: Any) -> Any:
    """Ansible's (tagged, lazily templated) values as plain JSON data."""
    return json.loads(json.dumps(value, default=str))


def hosts_from(task_vars: Mapping[str, Any]) -> dict[str, Host]:
    """Every inventory host as tccdeploy's engine needs it: name, groups and the variables that
    say how to reach it (ansible_* and tcc_*), templated by Ansible."""
    groups: Mapping[str, list[str]] = task_vars.get("groups", {})
    hostvars: Mapping[str, Any] = task_vars.get("hostvars", {})
    out: dict[str, Host] = {}
    for name in groups.get("all", []):
        raw = hostvars.get(name, {})
        wanted = {k: raw[k] for k in list(raw.keys()) if k.startswith(_CONNECTION_PREFIXES)}
        member = sorted(g for g, names in groups.items() if name in names and g not in ("all", "ungrouped"))
        out[name] = Host(name, groups=member, vars=_plain(wanted))
    return out


def settings(args: dict[str, Any], env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The TC and engine settings: the task's arguments, else tccdeploy's environment variables."""
    out = {
        "tc_url": args.pop("tc_url", None) or env.get("TCCDEPLOY_TC"),
        "engine_dir": args.pop("engine_dir", None) or env.get("TCCDEPLOY_ENGINE_DIR"),
        "state": args.pop("state", None) or env.get("TCCDEPLOY_STATE"),
        "manifests": args.pop("manifests", None) or ([env["TCCDEPLOY_MANIFESTS"]] if env.get("TCCDEPLOY_MANIFESTS") else []),
    }
    if isinstance(out["manifests"], str):
        out["manifests"] = [out["manifests"]]
    return out


def run(module: str, args: dict[str, Any] | None, task_vars: Mapping[str, Any], check: bool = False,
        diff: bool = False) -> dict[str, Any]:
    """One tccdeploy module on the task's host: Ansible's result dictionary."""
    from .config import state_dir
    from .engine.connection import Unreachable
    from .engine.runner import Engine
    from .playbook.modules import Context, ModuleError, RunState, load_all

    if module not in TCC_MODULES:
        return {"failed": True, "msg": f"tccdeploy.tccp has no module {module!r}; it has {', '.join(TCC_MODULES)}"}
    args = dict(args or {})
    options = settings(args)
    if not options["tc_url"]:
        return {"failed": True, "changed": False,
                "msg": "no TC: give tc_url (the served TC, `tccdeploy tc serve`) or set $TCCDEPLOY_TC"}
    hosts = hosts_from(task_vars)
    name = str(task_vars.get("inventory_hostname"))
    host = hosts.get(name) or Host(name, vars=_plain({k: v for k, v in task_vars.items()
                                                        if str(k).startswith(_CONNECTION_PREFIXES)}))
    inventory = Inventory(hosts=hosts)
    state = state_dir(options["state"])
    engine = Engine(list(hosts.values()), state=state)
    run_state = RunState(engine, inventory, str(task_vars.get("playbook_dir", ".")), options["manifests"], state,
                         check=check, diff=diff, tc_url=options["tc_url"],
                         engine_dir=options["engine_dir"] or os.path.join(state, "engine"))
    ctx = Context(host, args, {**host.vars, "inventory_hostname": name}, run_state)
    try:
        result = dict(load_all()[module](ctx))
    except ModuleError as exc:
        result = {"failed": True, "changed": False, "msg": str(exc)}
    except Unreachable as exc:
        result = {"unreachable": True, "changed": False, "msg": str(exc), "reason": exc.reason}
    except Exception as exc:  # noqa: BLE001 - a refusal by the TC (its reason code), or the node's error
        code = getattr(exc, "reason", None)
        result = {"failed": True, "changed": False, "msg": f"refused: {code}: {exc}" if code else f"{type(exc).__name__}: {exc}"}
        if code:
            result["reason"] = code
    finally:
        engine.close()
        run_state.close()
    result.setdefault("changed", False)
    return _plain(result)


def tc_nodes(url: str, engine_dir: str) -> list[dict[str, Any]]:
    """The TC's nodes for the dynamic inventory: name, state, build, site, address."""
    from .coordinator.client import RemoteCoordinator

    tc = RemoteCoordinator(url, engine_dir)
    try:
        return [{"name": n.name, "state": n.state, "build": n.build, "site": n.site, "address": n.address,
                 "verdict": n.verdict} for n in tc.nodes()]
    finally:
        tc.close()


def group_name(text: str) -> str:
    """A TC value as part of an Ansible group name (letters, digits and _ only)."""
    return "".join(c if c.isalnum() else "_" for c in text)


__all__ = ["TCC_MODULES", "group_name", "hosts_from", "run", "settings", "tc_nodes"]
