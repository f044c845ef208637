"""ping, command, copy, template, wait_for_ssh, debug, fail, set_fact: Ansible's modules of the
same names, as far as tccdeploy's playbooks need them."""

from __future__ import annotations

import difflib
import json
import os
import secrets
import shlex
import subprocess
import time
from typing import Any

from ...crypto.files import sha256_file
from ...engine.connection import Unreachable
from ...engine.runner import Session
from ...playbook.templar import TemplateError, Undefined, expression, render_text
from . import Context, ModuleError, module

DIFF_LIMIT = 64 * 1024
CHUNK = 1 << 20


@module("ping")
def ping(ctx: Context) -> dict[str, Any]:
    if ctx.local:
        return {"ping": "pong", "changed": False}
    answer = ctx.session.call("ping")
    return {"ping": answer.get("ping"), "changed": False}


def _command_args(args: Any) -> tuple[list[str], str | None, str | None]:
    if isinstance(args, str):
        cmd, creates, chdir = args, None, None
    else:
        cmd, creates, chdir = args["cmd"], args.get("creates"), args.get("chdir")
    try:
        argv = shlex.split(str(cmd))
    except ValueError as exc:
        raise ModuleError(f"cannot parse the command {cmd!r}: {exc}") from None
    if not argv:
        raise ModuleError("the command is empty")
    return argv, creates, chdir


@module("command")
def command(ctx: Context) -> dict[str, Any]:
    """A command without a shell. Not run in check mode (nobody can tell what it would change),
    as Ansible's; `creates` makes it idempotent."""
    argv, creates, chdir = _command_args(ctx.args)
    if creates:
        exists = os.path.exists(creates) if ctx.local else ctx.session.call("file_state", {"path": creates})["exists"]
        if exists:
            return {"changed": False, "rc": 0, "cmd": argv, "msg": f"skipped, since {creates} exists"}
    if ctx.check:
        return {"skipped": True, "changed": False, "msg": "command does not run in check mode"}
    start = time.monotonic()
    run_argv = ctx.become.wrap(argv) if ctx.become else argv
    stdin = ctx.become.stdin if ctx.become else None
    if ctx.local:
        try:
            done = subprocess.run(run_argv, cwd=chdir, capture_output=True, timeout=3600, input=stdin)
        except FileNotFoundError:
            return {"failed": True, "rc": 2, "cmd": argv, "msg": f"[Errno 2] No such file or directory: {run_argv[0]!r}"}
        rc, out, err = done.returncode, done.stdout, done.stderr
    else:
        remote = shlex.join(run_argv)
        if chdir:
            remote = f"cd {shlex.quote(chdir)} && exec {remote}"
        rc, out, err = ctx.session.connect().exec(remote, timeout=3600, stdin=stdin)
    result: dict[str, Any] = {"changed": True, "rc": rc, "cmd": argv, "delta": round(time.monotonic() - start, 3),
                              "stdout": out.decode(errors="replace").rstrip("\n"),
                              "stderr": err.decode(errors="replace").rstrip("\n")}
    result["stdout_lines"] = result["stdout"].splitlines()  # as Ansible's command returns them
    result["stderr_lines"] = result["stderr"].splitlines()
    if rc:
        result["failed"] = True
        result["msg"] = f"[Errno 2] No such file or directory: {argv[0]!r}" if rc == 127 and not out \
            else "non-zero return code"
    return result


def put_file(session: Session, local: str, dest: str, sha256: str, mode: str | None = None) -> None:
    """Upload local to dest by way of a staged file the node checks before renaming it."""
    staged = f"{dest}.tccdeploy-{secrets.token_hex(6)}"
    sftp = session.connect().sftp()
    with open(local, "rb") as src, sftp.open(staged, "wb") as dst:
        dst.set_pipelined(True)
        for chunk in iter(lambda: src.read(CHUNK), b""):
            dst.write(chunk)
    session.call("file_install", {"staged": staged, "dest": dest, "sha256": sha256, "mode": mode}, timeout=300)


def text_diff(before: str | None, after: str | None, before_header: str, after_header: str) -> dict[str, Any]:
    return {"before": before if before is not None else "", "after": after if after is not None else "",
            "before_header": before_header, "after_header": after_header}


def render_diff(diff: dict[str, Any]) -> str:
    if "prepared" in diff:
        return str(diff["prepared"])
    lines = difflib.unified_diff(str(diff.get("before", "")).splitlines(keepends=True),
                                 str(diff.get("after", "")).splitlines(keepends=True),
                                 "before" + (f": {diff['before_header']}" if diff.get("before_header") else ""),
                                 "after" + (f": {diff['after_header']}" if diff.get("after_header") else ""))
    text = "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)
    return text


@module("copy")
def copy(ctx: Context) -> dict[str, Any]:
    """A file (src) or text (content) at dest, by digest: changed only when the content differs."""
    if "content" in ctx.args:
        return _install_text(ctx, str(ctx.args["content"]), None)
    src = ctx.find(str(ctx.args["src"]), "files")
    if not os.path.isfile(src):
        raise ModuleError(f"copy: no such file {src} (relative paths are looked up in the role's and playbook's "
                          "files/ and beside them)")
    return _install(ctx, src, src)


@module("template")
def template(ctx: Context) -> dict[str, Any]:
    """A Jinja2 file rendered with the host's variables (same sandbox, filters and tests as the
    playbook's templates), installed as copy installs."""
    src = ctx.find(str(ctx.args["src"]), "templates")
    try:
        with open(src, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ModuleError(f"template: cannot read {src}: {exc.strerror} (relative paths are looked up in the "
                          "role's and playbook's templates/ and beside them)") from None
    except UnicodeDecodeError:
        raise ModuleError(f"template: {src} is not UTF-8 text") from None
    try:
        rendered = render_text(text, ctx.vars)
    except TemplateError as exc:
        raise ModuleError(f"template {src}: {exc}") from None
    return _install_text(ctx, rendered, src)


def _install_text(ctx: Context, text: str, src: str | None) -> dict[str, Any]:
    import tempfile

    fd, staged = tempfile.mkstemp(prefix="tccdeploy-content-")  # 0600, removed below
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        return _install(ctx, staged, src)
    finally:
        os.unlink(staged)


def _install(ctx: Context, path: str, src: str | None) -> dict[str, Any]:
    if ctx.become is not None and not (ctx.local and ctx.become.user == "root" and os.geteuid() == 0):
        raise ModuleError(f"copy/template with become (to {ctx.become.user}) is not run by tccdeploy apply: files "
                          "are installed by the node's own helper as its login; use command with become instead")
    dest, mode = str(ctx.args["dest"]), ctx.args.get("mode")
    mode = f"{int(str(mode), 8):04o}" if mode is not None else None
    digest = sha256_file(path)
    limit = DIFF_LIMIT if ctx.diff else 0
    there = _local_state(dest, limit) if ctx.local else ctx.session.call("file_state", {"path": dest, "text_limit": limit})
    if there.get("exists") and not there.get("regular"):
        raise ModuleError(f"copy: {dest} exists on {ctx.name} and is not a regular file")
    result: dict[str, Any] = {"dest": dest, "checksum": digest}
    if src is not None:
        result["src"] = src
    if there.get("sha256") == digest:
        if mode is None or there.get("mode") == mode:
            return result | {"changed": False}
        if not ctx.check:
            if ctx.local:
                os.chmod(dest, int(mode, 8))
            else:
                ctx.session.call("file_mode", {"path": dest, "mode": mode})
        return result | {"changed": True, "diff": {"prepared": f"mode of {dest}: {there['mode']} -> {mode}\n"}}
    if ctx.diff:
        size = os.path.getsize(path)
        after = None
        if size <= DIFF_LIMIT:
            try:
                with open(path, encoding="utf-8") as fh:
                    after = fh.read()
            except UnicodeDecodeError:
                pass
        before = there.get("text", "") if there.get("exists") else ""
        if after is None or (there.get("exists") and "text" not in there):
            result["diff"] = {"prepared": f"binary or large file {dest}: sha256 {there.get('sha256', '(absent)')} -> {digest}\n"}
        else:
            result["diff"] = text_diff(before, after, dest, dest)
    if not ctx.check:
        if ctx.local:
            _local_install(path, dest, mode)
        else:
            put_file(ctx.session, path, dest, digest, mode)
    return result | {"changed": True}


def _local_state(path: str, text_limit: int) -> dict[str, Any]:
    """file_state for a host that is the controller itself (Ansible's local connection)."""
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {"exists": False}
    out: dict[str, Any] = {"exists": True, "regular": stat.S_ISREG(st.st_mode), "mode": f"{st.st_mode & 0o7777:04o}"}
    if out["regular"]:
        out["sha256"] = sha256_file(path)
        if text_limit and st.st_size <= text_limit:
            try:
                with open(path, encoding="utf-8") as fh:
                    out["text"] = fh.read()
            except UnicodeDecodeError:
                pass
    return out


def _local_install(path: str, dest: str, mode: str | None) -> None:
    import shutil

    staged = f"{dest}.tccdeploy-{secrets.token_hex(6)}"
    shutil.copyfile(path, staged)
    os.chmod(staged, int(mode, 8) if mode is not None else 0o644)
    os.replace(staged, dest)


def wait_for(ctx: Context, timeout: float, delay: float = 0.0) -> float:
    """Wait until the host takes a new SSH login and its helper answers; seconds it took."""
    start = time.monotonic()
    time.sleep(delay)
    last = ""
    while True:
        try:
            ctx.fresh_session().call("ping", timeout=10)
            return time.monotonic() - start
        except (Unreachable, OSError, TimeoutError) as exc:
            last = str(exc)
        except Exception as exc:  # noqa: BLE001 - a helper that cannot start yet: try again
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() - start > timeout:
            raise ModuleError(f"timed out after {timeout:g} s waiting for SSH on {ctx.name}: {last}")
        time.sleep(1.0)


@module("wait_for_ssh")
def wait_for_ssh(ctx: Context) -> dict[str, Any]:
    args = ctx.args or {}
    if ctx.check:
        return {"changed": False, "msg": "not waited for in check mode"}
    elapsed = wait_for(ctx, float(args.get("timeout", 300)), float(args.get("delay", 0)))
    return {"changed": False, "elapsed": round(elapsed, 2)}


@module("debug")
def debug(ctx: Context) -> dict[str, Any]:
    args = ctx.args or {}
    if "var" in args:
        name = str(args["var"])
        try:
            value = expression(name, ctx.vars)
        except Undefined:
            value = "VARIABLE IS NOT DEFINED!"
        return {"changed": False, name: value}
    return {"changed": False, "msg": args.get("msg", "Hello world!")}


@module("fail")
def fail(ctx: Context) -> dict[str, Any]:
    return {"failed": True, "changed": False, "msg": (ctx.args or {}).get("msg", "Failed as requested from task")}


def as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@module("set_fact")
def set_fact(ctx: Context) -> dict[str, Any]:
    """Variables for this host for the rest of the run; the runner keeps them (ansible_facts)."""
    return {"changed": False, "ansible_facts": dict(ctx.args)}
