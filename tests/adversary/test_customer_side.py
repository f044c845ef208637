"""The customer's own tools against the provider, who runs the network between the customer and
the TC and may hand the customer files: what the customer's side checks itself (found in a review
of the receipt and client code, issue 20). Every test here failed before its fix."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tccdeploy.coordinator.client import CustomerClient, TCUnavailable
from tccdeploy.crypto import customer


def test_the_customers_client_refuses_a_tc_url_that_is_not_https_before_sending_anything(tmp_path):
    """Over plain HTTP a man in the middle read the signed query (and spent it first) and forged
    the TC's answers: the customer's client took any URL (the engine's refused all but https)."""
    key_path = str(tmp_path / "key.pem")
    customer.init(key_path)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(TCUnavailable, match="HTTPS only"):
            CustomerClient(url, str(tmp_path / "tc.pem"))
        proc = subprocess.run([sys.executable, "-m", "tccdeploy", "request", "status", "ab" * 16, "--tc", url,
                               "--tc-cert", str(tmp_path / "tc.pem"), "--key", key_path],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "HTTPS only" in proc.stderr, proc.stdout + proc.stderr
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing came: the query never left
    finally:
        listener.close()
