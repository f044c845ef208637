"""The service started at boot answers only its own user: the forced command of the TVMM user's
key is the one way in, so a process of any other user that reaches the socket (root, or an admin
login if the folder's mode were wrong) is refused before any greeting or operation."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.tvmmdaemon import daemon_folder

NOBODY = 65534


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_a_session_from_another_user_than_the_services_is_refused():
    with daemon_folder() as daemon:
        daemon.start("warm", uid=NOBODY)
        conn = daemon.connect()  # root: past the folder's mode, not past the daemon's check
        conn.sendall(b'{"id": 1, "op": "identity"}\n')
        reader = conn.makefile("rb")
        answer = json.loads(reader.readline())
        assert answer["ok"] is False and answer["error"]["reason"] == "tvmm.peer", answer
        assert reader.readline() == b""  # nothing more: the session is closed
