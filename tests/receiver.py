"""A webhook receiver for tests: a real HTTP server (http.server) on a free loopback port, on
a thread, that records every POST and answers with the statuses it is told, in turn."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

WEBHOOK_SECRET = "whsec-test-0123456789"


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def document(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def delivery(self) -> str:
        return self.headers["x-imagebatch-delivery"]

    def signed_by(self, secret: str) -> bool:
        """The signature header is the HMAC-SHA256 of the exact bytes received."""
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("x-imagebatch-signature", ""), expected)


class Receiver:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.answers: list[int] = []  # answered in turn; 200 once they run out
        self.hang = threading.Event()  # set: requests wait (unanswered) until it is cleared
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    status = receiver.answers.pop(0) if receiver.answers else 200
                    receiver.received.append(Received(
                        self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                        status))
                while receiver.hang.is_set():
                    time.sleep(0.05)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=t0ken"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def events(self) -> list[str]:
        return [r.document["event"] for r in self.received]

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        give_up = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() > give_up:
                raise AssertionError(f"{len(self.received)} POSTs, waited for {count}")
            time.sleep(0.05)
        return list(self.received)


@contextmanager
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r._thread.start()
    try:
        yield r
    finally:
        r.hang.clear()
        r.server.shutdown()
        r.server.server_close()
