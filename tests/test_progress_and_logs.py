"""Progress on a terminal (and nowhere else), JSON log lines for the long-running processes,
and shell completion: issue 19 item 5, as a user meets them."""

from __future__ import annotations

import argparse
import json
import os
import pty
import subprocess

import pytest

from tccdeploy import logs, progress
from tccdeploy.cli import shows_progress
from tccdeploy.crypto.bundle import percents

from .conftest import REPO
from .helpers_apply import BIN
from .tcservice import Service


def test_qemu_img_percentages_are_read_from_its_progress_output():
    assert percents(b"    (0.00/100%)\r    (12.50/100%)\r    (100.00/100%)\r\n") == [0.0, 12.5, 100.0]
    assert percents(b"no progress here") == []


class _Tty:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("command, json_flag, env, tty, expected", [
    ("image", False, {}, True, True),
    ("image", False, {}, False, False),  # a pipe or a file: no bars
    ("image", True, {}, True, False),  # --json is for machines
    ("image", False, {"CI": "true"}, True, False),
    ("image", False, {"TCCDEPLOY_NO_PROGRESS": "1"}, True, False),
    ("apply", False, {}, True, False),  # apply's lines are Ansible's output
])
def test_progress_is_shown_only_to_people_at_a_terminal(monkeypatch, command, json_flag, env, tty, expected):
    for key in ("CI", "TCCDEPLOY_NO_PROGRESS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = argparse.Namespace(command=command, json=json_flag)
    assert shows_progress(args, _Tty(tty)) is expected


def test_without_a_display_progress_costs_nothing_and_shows_nothing(capsys):
    with progress.transfer("x", 10) as advance:
        advance(5)
    with progress.hosts("round", 3) as advance:
        advance(1)
    assert capsys.readouterr() == ("", "") and not progress.active()


def _sealed_under(tmp_path, terminal: bool) -> bytes:
    env = dict(os.environ, TCCDEPLOY_STATE=str(tmp_path / "tc"), TCCDEPLOY_CUSTOMER_KEY=str(tmp_path / "c.pem"),
               COLUMNS="120")
    env.pop("CI", None)
    env.pop("TCCDEPLOY_NO_PROGRESS", None)
    tool = str(BIN / "tccdeploy")
    if not (tmp_path / "tc.pem").exists():
        subprocess.run([tool, "tc", "init"], env=env, check=True, capture_output=True)
        subprocess.run([tool, "tc", "show", "-o", str(tmp_path / "tc.pem")], env=env, check=True, capture_output=True)
        subprocess.run([tool, "customer", "init", "--key", str(tmp_path / "c.pem")], env=env, check=True,
                       capture_output=True)
        (tmp_path / "disk.raw").write_bytes(os.urandom(1 << 20) * 48)
    out = tmp_path / f"sealed-{terminal}"
    argv = [tool, "image", "seal", str(tmp_path / "disk.raw"), "--tc", str(tmp_path / "tc.pem"), "-o", str(out)]
    if not terminal:
        done = subprocess.run(argv, env=env, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execve(argv[0], argv, env)
    seen = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        seen += data
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, seen[-2000:]
    return seen


def test_sealing_shows_bytes_rate_and_eta_on_a_terminal_and_nothing_in_a_pipe(tmp_path):
    shown = _sealed_under(tmp_path, terminal=True)
    assert b"sealing disk.raw" in shown and b"hashing disk.qcow2" in shown
    assert b"MB/s" in shown and b"%" in shown
    piped = _sealed_under(tmp_path, terminal=False)
    assert b"sealed " in piped and b"MB/s" not in piped and b"\x1b[" not in piped


def test_log_lines_are_json_objects_with_the_events_fields(capsys):
    try:
        logs.configure("json")
        logs.emit("enforce.round", "round 3: 1 quarantined", "warning", round=3, quarantined=["node2"])
    finally:
        logs.configure("text")
    line = json.loads(capsys.readouterr().err)
    assert line["event"] == "enforce.round" and line["level"] == "warning" and line["quarantined"] == ["node2"]
    assert line["time"].endswith("Z") and line["message"] == "round 3: 1 quarantined"
    with pytest.raises(ValueError, match="--log-format takes text or json"):
        logs.configure("xml")


def test_the_enforcement_loop_logs_each_round_as_a_json_line(tmp_path):
    done = subprocess.run([str(BIN / "tccdeploy"), "enforce", "--once", "-i", str(REPO / "tests/playbooks/local-inventory.yml"),
                           "-m", str(REPO / "examples"), "--log-format", "json", "--state", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (line,) = [json.loads(x) for x in done.stdout.splitlines()]
    assert line["event"] == "enforce.round" and line["round"] == 1 and line["quarantined"] == []


def test_tc_serve_logs_json_lines_its_own_and_uvicorns(tmp_path):
    service = Service(tmp_path / "tc", str(REPO / "examples"), options=("--log-format", "json", "-v"))
    try:
        with service.client() as client:
            assert client.get("/v1/nodes").status_code == 200
    finally:
        service.stop()
    lines = [json.loads(x) for x in (tmp_path / "tc" / f"serve-{service.port}.log").read_text().splitlines() if x]
    events = {line["event"] for line in lines}
    assert "serve.start" in events and any(e.startswith("uvicorn") for e in events), lines
    assert all({"time", "level", "event", "message"} <= set(line) for line in lines)


def test_the_shell_completes_subcommands_and_options(tmp_path):
    """argcomplete, as bash asks it (register-python-argcomplete tccdeploy)."""
    def complete(line: str) -> list[str]:
        out = tmp_path / "completions"
        env = dict(os.environ, _ARGCOMPLETE="1", _ARGCOMPLETE_IFS="\n", COMP_LINE=line, COMP_POINT=str(len(line)),
                   _ARGCOMPLETE_STDOUT_FILENAME=str(out))
        subprocess.run([str(BIN / "tccdeploy")], env=env, capture_output=True, timeout=60)
        return [c.strip() for c in out.read_text().split("\n")]

    assert "webhooks" in complete("tccdeploy tc web")
    assert "--log-format" in complete("tccdeploy tc serve --log")
    assert {"apply", "attest", "audit"} <= set(complete("tccdeploy a"))
