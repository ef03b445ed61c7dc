"""A loopback HTTP proxy in front of an S3 server that counts requests and injects faults (bench ``s3``, tests).

    with CountingProxy("http://127.0.0.1:5000") as proxy:   # proxy.endpoint: point the client here
        proxy.fail("/bucket/key", ["503", "cut", "reset"])     # the next 3 requests for that key fail, in order
        ...
        proxy.requests   # [(method, path, status, body bytes sent)] for every request answered

Faults, one per request whose path contains the given text:
``503`` answers 503 Slow Down; ``reset`` closes the connection without answering; ``cut`` sends the headers and
half the body, then closes (an incomplete read); ``hang`` accepts the request and never answers (until the proxy
stops), as a server that has stopped responding.

With `rate_bytes_per_s`, every answer's body is sent at that rate (per connection, paced by sleeping, so the proxy
itself costs little CPU): a network whose transfers take time without keeping the reader's cores busy.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}
_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>'
)


class CountingProxy:
    def __init__(self, upstream: str, rate_bytes_per_s: float | None = None):
        target = urlsplit(upstream)
        self.rate = rate_bytes_per_s
        self.upstream = (target.hostname, target.port)
        self.requests: list[tuple[str, str, int, int]] = []
        self._faults: list[tuple[str, list[str]]] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def fail(self, path_contains: str, faults: list[str]) -> None:
        """The next requests whose path contains `path_contains` get `faults`, one each, in order."""
        unknown = set(faults) - {"503", "reset", "cut", "hang"}
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; expected 503, reset, cut or hang")
        with self._lock:
            self._faults.append((path_contains, list(faults)))

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()

    def _next_fault(self, path: str) -> str | None:
        with self._lock:
            for text, faults in self._faults:
                if text in path and faults:
                    return faults.pop(0)
        return None

    def _record(self, method: str, path: str, status: int, nbytes: int) -> None:
        with self._lock:
            self.requests.append((method, path, status, nbytes))

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._next_fault(self.path)
                if fault == "hang":
                    proxy._record(self.command, self.path, 0, 0)
                    proxy._stopped.wait()
                    self.close_connection = True
                    return
                if fault == "reset":
                    proxy._record(self.command, self.path, 0, 0)
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if fault == "503":
                    proxy._record(self.command, self.path, 503, len(_SLOW_DOWN))
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(_SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    payload = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP_BY_HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if fault == "cut":
                    proxy._record(self.command, self.path, resp.status, len(payload) // 2)
                    if self.command != "HEAD":
                        self.wfile.write(payload[: len(payload) // 2])
                        self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                proxy._record(self.command, self.path, resp.status, len(payload) if self.command != "HEAD" else 0)
                if self.command != "HEAD":
                    self._send_paced(payload)

            def _send_paced(self, payload: bytes) -> None:
                if not proxy.rate:
                    self.wfile.write(payload)
                    return
                start, view = time.monotonic(), memoryview(payload)
                for offset in range(0, len(payload), 1 << 20):
                    self.wfile.write(view[offset : offset + (1 << 20)])
                    ahead = start + (offset + len(view[offset : offset + (1 << 20)])) / proxy.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        return Handler

    def start(self) -> CountingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
