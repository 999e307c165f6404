"""Stand-in HTTP servers for the tests (a fake vLLM, a fake Hub, a scripted endpoint): the JSON
reply and quiet logging they share, and a loopback server in a background thread."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JSONHandler(BaseHTTPRequestHandler):
    """A request handler that answers JSON and keeps the test output quiet."""

    def reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def start(handler: type[BaseHTTPRequestHandler], **attributes) -> ThreadingHTTPServer:
    """A threading server on 127.0.0.1 (a free port) with `attributes` set, serving in a daemon
    thread; stop it with `stop`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    for name, value in attributes.items():
        setattr(server, name, value)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


def url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler], **attributes) -> Iterator[ThreadingHTTPServer]:
    server = start(handler, **attributes)
    try:
        yield server
    finally:
        stop(server)
