"""The TVMM service started once at boot (`tccdeploy-tvmm daemon`): each session is served by a
process of its own that answers as `serve` does, and the forced command's script joins an SSH
session to it with socat, or serves the session itself when no daemon listens."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from tccdeploy.lab import procs
from tccdeploy.tvmm.daemon import connect_script
from tests.tvmmdaemon import daemon_folder, lines

REQUESTS = b'{"id": 1, "op": "command", "args": {"cmd": "id"}}\nnot json\n{"id": 2, "op": "identity"}\n'


def _answers(found: list[dict]) -> list[object]:
    return [found[1]["error"]["reason"], found[2]["error"]["type"], found[3]["error"]["reason"]]


def test_each_session_is_a_process_of_its_own_that_answers_as_serve_does():
    with daemon_folder() as daemon:
        daemon.start("warm")
        assert os.stat(daemon.socket).st_mode & 0o777 == 0o600
        first, second = daemon.connect(), daemon.connect()
        one, two = first.makefile("rb"), second.makefile("rb")
        hello = {"hello": "tccdeploy-tvmm", "protocol": 2, "node": "warm", "digest": daemon.digest}
        assert lines(one, 1) == [hello] and lines(two, 1) == [hello]
        assert daemon.proc is not None and len(procs.children(daemon.proc.pid)) == 2  # one process a session
        first.sendall(REQUESTS)
        assert _answers([hello, *lines(one, 3)]) == ["tvmm.unknown-op", "BadRequest", "tvmm.tpm"]
        second.sendall(b'{"id": 7, "op": "vm_status", "args": {"vm_id": "x"}}\n')
        assert lines(two, 1)[0]["error"]["reason"] == "tvmm.args"
        for end in (one, first, two, second):
            end.close()
        deadline = time.monotonic() + 20
        while procs.children(daemon.proc.pid) and time.monotonic() < deadline:  # ended at EOF, reaped
            time.sleep(0.1)
        assert procs.children(daemon.proc.pid) == [] and daemon.proc.poll() is None
        daemon.proc.terminate()
        assert daemon.proc.wait(timeout=10) == 0 and not os.path.exists(daemon.socket)


def test_a_socket_folder_others_may_enter_is_refused_by_name():
    with daemon_folder() as daemon:
        os.chmod(os.path.dirname(daemon.socket), 0o755)
        proc = subprocess.run([sys.executable, daemon.pyz, "daemon", "--socket", daemon.socket, "--config",
                               daemon.config("n")], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "mode 0700" in proc.stderr and "mode 0755" in proc.stderr
        assert os.path.dirname(daemon.socket) in proc.stderr and not os.path.exists(daemon.socket)
        usage = subprocess.run([sys.executable, daemon.pyz, "daemon", "--config", daemon.config("n")],
                               capture_output=True, text=True, timeout=60)
        assert usage.returncode == 2 and "daemon --socket PATH" in usage.stderr


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed (scripts/install)")
def test_the_forced_command_joins_the_daemon_and_serves_alone_when_none_listens(tmp_path):
    with daemon_folder() as daemon:
        script = tmp_path / "tvmm-connect"
        script.write_text(connect_script(daemon.socket, sys.executable, daemon.pyz, daemon.config("cold"),
                                         shutil.which("socat") or ""))
        script.chmod(0o755)

        def session() -> list[dict]:
            proc = subprocess.run([str(script)], input=REQUESTS, capture_output=True, timeout=60)
            return [json.loads(line) for line in proc.stdout.splitlines()]

        alone = session()
        assert alone[0]["node"] == "cold"  # no daemon: the script ran the service for this session
        daemon.start("warm")
        joined = session()
        assert joined[0]["node"] == "warm" and joined[0]["digest"] == daemon.digest
        assert _answers(joined) == _answers(alone) == ["tvmm.unknown-op", "BadRequest", "tvmm.tpm"]


def test_the_daemon_refuses_a_peer_of_another_uid_before_greeting(monkeypatch):
    """In-process, on a socket pair (whose peer is this process): the daemon's uid is made another."""
    from tccdeploy.tvmm import daemon

    server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    monkeypatch.setattr(daemon.os, "getuid", lambda: os.geteuid() + 1)
    client.sendall(b'{"id": 1, "op": "identity"}\n')
    assert daemon._session(server, {"hello": "tccdeploy-tvmm"}, lambda request: {"ok": True}) == 1
    server.close()
    reader = client.makefile("rb")
    answer = json.loads(reader.readline())
    assert answer["error"]["reason"] == "tvmm.peer" and reader.readline() == b""
    assert answer["error"]["type"] == "Refused" and "only the TVMM user's sessions" in answer["error"]["message"]


def test_the_daemon_greets_and_serves_its_own_uid(monkeypatch):
    from tccdeploy.tvmm import daemon

    server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client.sendall(b'{"id": 1, "op": "x"}\n')
    client.shutdown(socket.SHUT_WR)
    assert daemon._session(server, {"hello": "h"}, lambda request: {"id": request["id"], "ok": True}) == 0
    server.close()
    assert [json.loads(line) for line in client.makefile("rb")] == [{"hello": "h"}, {"id": 1, "ok": True}]


@pytest.mark.parametrize("fault", ["mode", "owner", "file", "missing"])
def test_a_socket_folder_that_is_not_the_daemons_alone_is_refused(tmp_path, fault):
    from tccdeploy.tvmm import daemon

    folder = tmp_path / "run"
    if fault == "file":
        folder.write_bytes(b"")
    elif fault != "missing":
        folder.mkdir(mode=0o700)
        if fault == "mode":
            folder.chmod(0o750)
        else:
            os.chown(folder, 65534, -1)
    with pytest.raises(daemon.DaemonError) as refused:
        daemon.listen(str(folder / "service.sock"))
    assert str(folder) in str(refused.value) and not (tmp_path / "run" / "service.sock").exists()


def test_a_stale_socket_is_replaced_and_the_new_one_is_the_owners_alone(tmp_path):
    from tccdeploy.tvmm import daemon

    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    path = str(folder / "service.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a crashed daemon's socket: nobody listens on it
    listener = daemon.listen(path)
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        client.close()
    finally:
        listener.close()
    (folder / "not-a-socket").write_bytes(b"keep")
    with pytest.raises(daemon.DaemonError, match="cannot listen on .*not-a-socket"):
        daemon.listen(str(folder / "not-a-socket"))
    assert (folder / "not-a-socket").read_bytes() == b"keep"


def test_the_forced_command_joins_the_service_through_socat_with_large_blocks_or_runs_it_alone():
    """Debian's socat by default, with 256 KiB blocks (its 8 KiB default held a disk upload to
    142 MiB/s); the build's own service for the session when the socket is not there."""
    script = connect_script("/run/tccdeploy-tvmm.sock", "/usr/bin/python3", "/opt/tvmm.pyz", "/etc/tvmm.json")
    assert 'if [ -S "$sock" ] && [ -x /usr/bin/socat ]; then exec /usr/bin/socat -b 262144 -t 900 STDIO ' \
           '"UNIX-CONNECT:$sock"; fi' in script
    assert "sock=/run/tccdeploy-tvmm.sock\n" in script
    assert script.rstrip().endswith("exec /usr/bin/python3 /opt/tvmm.pyz serve --config /etc/tvmm.json")


class _Forked:
    """daemon.run in a child forked from this test's process (so a mutant of run is the code that
    runs), its stderr in a file, stopped by PID."""

    def __init__(self, tmp_path, handle, tick: float = 0.1):
        from tccdeploy.tvmm import daemon

        folder = tmp_path / "run"
        folder.mkdir(mode=0o700)
        self.socket, self.stderr = str(folder / "service.sock"), tmp_path / "daemon.err"
        ready_r, ready_w = os.pipe()
        err = os.open(self.stderr, os.O_WRONLY | os.O_CREAT, 0o600)
        self.pid = os.fork()
        if self.pid == 0:  # the daemon: never returns into pytest
            code = 70
            try:
                os.close(ready_r)
                os.dup2(err, 2)
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # line-buffered as stderr is; pytest's capture is not fd 2
                daemon.run(self.socket, {"hello": "h"}, handle, ready=lambda: os.write(ready_w, b"r"), tick=tick)
                code = 71  # run returned: it must not
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 72
            finally:
                os._exit(code)
        os.close(err)
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            listening = select.select([ready], [], [], 30)[0] and ready.read(1) == b"r"
        if not listening:
            self.close()
            raise AssertionError("the daemon did not say it listens within 30 s")

    def connect(self) -> tuple[socket.socket, object]:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(10)
        conn.connect(self.socket)
        reader = conn.makefile("rb")
        assert json.loads(reader.readline()) == {"hello": "h"}
        return conn, reader

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """The daemon's exit code (or minus the signal that ended it)."""
        os.kill(self.pid, signum)
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _ask(conn: socket.socket, reader, request: dict) -> dict:
    conn.sendall(json.dumps(request).encode() + b"\n")
    return json.loads(reader.readline())


def _own_pid(request: dict) -> dict:
    if request.get("op") == "boom":
        raise RuntimeError("the handler failed")
    return {"id": request["id"], "ok": True, "pid": os.getpid()}


def _wait(predicate, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_run_serves_each_session_in_a_child_of_its_own_reaps_it_and_stops_on_sigterm(tmp_path):
    """Two sessions at once (a parent that waited for a child would never accept the second), each
    in its own process; a session's end reaches the engine as EOF (the parent closed its copy) and
    its process is reaped within a tick; SIGTERM stops the daemon with 0 and removes the socket."""
    forked = _Forked(tmp_path, _own_pid)
    try:
        said = f"serving sessions on {forked.socket} (pid {forked.pid})"
        assert _wait(lambda: said in forked.stderr.read_text())
        assert os.stat(forked.socket).st_mode & 0o777 == 0o600
        (one, one_r), (two, two_r) = forked.connect(), forked.connect()
        first, second = _ask(one, one_r, {"id": 1}), _ask(two, two_r, {"id": 2})
        assert first["id"] == 1 and second["id"] == 2
        assert len({first["pid"], second["pid"], forked.pid, os.getpid()}) == 4
        assert sorted(procs.children(forked.pid)) == sorted([first["pid"], second["pid"]])
        one.shutdown(socket.SHUT_WR)
        assert one_r.read() == b""  # EOF: the session's process ended and the daemon kept no copy
        assert _wait(lambda: procs.children(forked.pid) == [second["pid"]])  # reaped: not even a zombie
        os.kill(second["pid"], signal.SIGTERM)  # a session ends as a plain process does on SIGTERM
        assert two_r.read() == b""
        assert _wait(lambda: procs.children(forked.pid) == [])
        assert "Traceback" not in forked.stderr.read_text()
        assert forked.stop() == 0 and not os.path.exists(forked.socket)
        for end in (one_r, one, two_r, two):
            end.close()
    finally:
        forked.close()


def test_a_session_does_not_keep_the_listening_socket(tmp_path):
    """A daemon killed with a session open leaves its socket file: nothing must accept on it then
    (the session's process closed its copy of the listener), so a client is refused at once
    instead of waiting in a backlog that no process will ever answer."""
    forked = _Forked(tmp_path, _own_pid)
    try:
        conn, reader = forked.connect()
        session = _ask(conn, reader, {"id": 1})["pid"]
        assert forked.stop(signal.SIGKILL) == -signal.SIGKILL and os.path.exists(forked.socket)
        with pytest.raises(ConnectionRefusedError):
            late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                late.connect(forked.socket)
            finally:
                late.close()
        assert _ask(conn, reader, {"id": 2}) == {"id": 2, "ok": True, "pid": session}  # the open one goes on
        conn.close()
        reader.close()
    finally:
        forked.close()


def test_a_session_whose_handler_fails_ends_alone_and_the_daemon_serves_the_next(tmp_path):
    forked = _Forked(tmp_path, _own_pid)
    try:
        conn, reader = forked.connect()
        conn.sendall(b'{"id": 1, "op": "boom"}\n')
        assert reader.read() == b""
        assert _wait(lambda: "RuntimeError: the handler failed" in forked.stderr.read_text())
        again, again_r = forked.connect()
        assert _ask(again, again_r, {"id": 2})["ok"] is True
        for end in (reader, conn, again_r, again):
            end.close()
        assert forked.stop() == 0
    finally:
        forked.close()
