"""A real HTTP receiver for webhooks on loopback: it can refuse (503) or drop (close without an
answer) the first deliveries and delay its answers, and keeps what it accepted."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    def __init__(self, fail: int = 0, drop: int = 0, delay: float = 0.0):
        self.fail, self.drop, self.delay = fail, drop, delay
        self.accepted: list[tuple[dict[str, str], bytes]] = []
        self.attempts = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    receiver.attempts += 1
                    attempt = receiver.attempts
                time.sleep(receiver.delay)
                if attempt <= receiver.drop:
                    self.close_connection = True
                    self.connection.shutdown(2)  # no answer at all: as a receiver that crashed
                    return
                if attempt <= receiver.drop + receiver.fail:
                    self.send_response(503)
                    self.end_headers()
                    return
                with receiver._lock:
                    receiver.accepted.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(body) for _, body in self.accepted]

    def wait(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.accepted) >= count:
                return self.events()
            time.sleep(0.05)
        raise AssertionError(f"{len(self.accepted)} of {count} events arrived in {timeout:g} s "
                             f"({self.attempts} attempts)")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
