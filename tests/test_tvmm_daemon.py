"""The TVMM service started once at boot (`tccdeploy-tvmm daemon`): each session is served by a
process of its own that answers as `serve` does, and the forced command's script joins an SSH
session to it with socat, or serves the session itself when no daemon listens."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
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
        assert daemon.proc is not None
        daemon.proc.kill()  # as the OOM killer would: no SIGTERM, so its socket and pid file stay
        daemon.proc.wait(timeout=10)
        assert os.path.exists(daemon.socket) and os.path.exists(daemon.socket + ".pid")
        after = session()
        assert after[0]["node"] == "cold" and _answers(after) == _answers(alone)  # served alone, not refused


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
    assert 'if [ -S "$sock" ] && [ -x /usr/bin/socat ]; then\n' \
           '  if ! read pid 2>/dev/null < "$sock.pid" || kill -0 "$pid" 2>/dev/null; then\n' \
           '    exec /usr/bin/socat -b 262144 -t 900 STDIO "UNIX-CONNECT:$sock"\n  fi\nfi\n' in script
    assert "sock=/run/tccdeploy-tvmm.sock\n" in script
    assert script.rstrip().endswith("exec /usr/bin/python3 /opt/tvmm.pyz serve --config /etc/tvmm.json")


class _NotInstalled(Exception):
    """SIGTERM reached the test's own handler: run did not install its stop."""


def _not_installed(_signum, _frame):
    raise _NotInstalled


class _InProcess:
    """daemon.run in this test's main thread (a signal handler must be installed there, and mutmut
    counts and mutates only what runs in the test's process), the engine's side in a thread that
    stops the daemon with SIGTERM when it is done or failed; sessions are forked from this process."""

    def __init__(self, tmp_path):
        folder = tmp_path / "run"
        folder.mkdir(mode=0o700)
        self.socket = str(folder / "service.sock")
        self.pid = os.getpid()

    def connect(self) -> tuple[socket.socket, object]:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(10)
        conn.connect(self.socket)
        reader = conn.makefile("rb")
        assert json.loads(reader.readline()) == {"hello": "h"}
        return conn, reader

    def run(self, handle, engine) -> object:
        """run's exit code; engine(self)'s failure, if any, raised here."""
        from tccdeploy.tvmm import daemon

        listening, failed = threading.Event(), []

        def drive() -> None:
            try:
                assert listening.wait(30), "the daemon did not say it listens within 30 s"
                engine(self)
            except BaseException as exc:  # noqa: BLE001 - raised again in the test's thread
                failed.append(exc)
            finally:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

        assert threading.current_thread() is threading.main_thread()
        before = set(procs.children(self.pid))
        previous = signal.signal(signal.SIGTERM, _not_installed)
        thread = threading.Thread(target=drive, daemon=True)
        thread.start()
        try:
            with pytest.raises(SystemExit) as stopped:
                daemon.run(self.socket, {"hello": "h"}, handle, ready=listening.set, tick=0.1)
        finally:
            signal.signal(signal.SIGTERM, previous)
            thread.join(30)
            for pid in set(procs.children(self.pid)) - before:  # a failed test's sessions (each holds
                os.kill(pid, signal.SIGKILL)  # its engine end, forked from this process, so never sees EOF)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        if failed:
            raise failed[0]
        return stopped.value.code


def _ask(conn: socket.socket, reader, request: dict) -> dict:
    conn.sendall(json.dumps(request).encode() + b"\n")
    return json.loads(reader.readline())


def _unix_sockets_open() -> set[str]:
    """The inodes of the sockets this process holds."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the listing's own descriptor, closed since
            continue
        if link.startswith("socket:["):
            out.add(link[8:-1])
    return out


def _listening_inode(path: str) -> str:
    with open("/proc/net/unix") as fh:
        for line in fh.read().splitlines()[1:]:
            fields = line.split()
            if len(fields) == 8 and fields[7] == path:
                return fields[6]
    raise AssertionError(f"no socket listens on {path}")


def _session_side(request: dict) -> dict:
    if request.get("op") == "boom":
        raise RuntimeError("the handler failed")
    return {"id": request["id"], "ok": True, "pid": os.getpid(), "sockets": sorted(_unix_sockets_open()),
            "sigterm_default": signal.getsignal(signal.SIGTERM) is signal.SIG_DFL}


def _wait(predicate, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def _reaped(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")  # a zombie keeps its /proc entry until its parent reaps it


def test_run_serves_each_session_in_a_child_of_its_own_reaps_it_and_stops_on_sigterm(tmp_path, capsys):
    """Two sessions at once (a parent that waited for a child would never accept the second), each
    in its own process with SIGTERM's default action and without the listening socket; a session's
    end reaches the engine as EOF (the parent closed its copy) and its process is reaped within a
    tick; SIGTERM stops the daemon with 0 and removes the socket."""
    daemon = _InProcess(tmp_path)

    def engine(daemon: _InProcess) -> None:
        assert os.stat(daemon.socket).st_mode & 0o777 == 0o600
        with open(daemon.socket + ".pid") as fh:  # for the forced command's check that it is alive
            assert fh.read() == f"{daemon.pid}\n"
        assert os.stat(daemon.socket + ".pid").st_mode & 0o777 == 0o600
        listener = _listening_inode(daemon.socket)
        (one, one_r), (two, two_r) = daemon.connect(), daemon.connect()
        first, second = _ask(one, one_r, {"id": 1}), _ask(two, two_r, {"id": 2})
        assert first["id"] == 1 and second["id"] == 2
        assert len({first["pid"], second["pid"], daemon.pid}) == 3
        assert listener not in first["sockets"] and listener not in second["sockets"]
        assert first["sigterm_default"] and second["sigterm_default"]
        one.shutdown(socket.SHUT_WR)
        assert one_r.read() == b""  # EOF: the session's process ended and the daemon kept no copy
        assert _wait(lambda: _reaped(first["pid"]))  # without another session arriving
        os.kill(second["pid"], signal.SIGTERM)
        assert two_r.read() == b""
        assert _wait(lambda: _reaped(second["pid"]))
        for end in (one_r, one, two_r, two):
            end.close()

    assert daemon.run(_session_side, engine) == 0
    assert not os.path.exists(daemon.socket) and not os.path.exists(daemon.socket + ".pid")
    assert f"serving sessions on {daemon.socket} (pid {daemon.pid})" in capsys.readouterr().err


def test_a_session_whose_handler_fails_ends_alone_and_the_daemon_serves_the_next(tmp_path):
    daemon = _InProcess(tmp_path)

    def engine(daemon: _InProcess) -> None:
        conn, reader = daemon.connect()
        conn.sendall(b'{"id": 1, "op": "boom"}\n')
        assert reader.read() == b""
        again, again_r = daemon.connect()
        assert _ask(again, again_r, {"id": 2})["ok"] is True
        for end in (reader, conn, again_r, again):
            end.close()

    assert daemon.run(_session_side, engine) == 0
