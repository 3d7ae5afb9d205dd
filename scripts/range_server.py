"""A loopback file server for weights tars: HTTP range requests, a per-connection speed cap, faults.

Plays a weights host (Replicate's, a mirror) for the tests and `bench_download.py`: it answers
`Range: bytes=a-b` with 206 Partial Content (or ignores ranges, like a host without them), can cap
each connection's speed (as a real host's per-connection throughput is capped), and can cut a
response short after some bytes while still announcing the full length. Every GET is counted.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

RANGE = re.compile(r"bytes=(\d+)-(\d*)")
SEND_BYTES = 256 * 1024


@dataclass
class Served:
    body: bytes
    cut_after: int | None = None  # no byte at or after this offset is ever sent (lengths announced in full)


class RangeServer:
    """`serve(path, body)`; then `url(path)`. `ranges=False` answers every request whole (200)."""

    def __init__(self, bytes_per_second: float | None = None, ranges: bool = True, host: str = "127.0.0.1") -> None:
        self.files: dict[str, Served] = {}
        self.bytes_per_second = bytes_per_second
        self.ranges = ranges
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), self._handler())
        self._server.daemon_threads = True
        self._server.request_queue_size = 64
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def serve(self, path: str, body: bytes, cut_after: int | None = None) -> str:
        self.files[path] = Served(body, cut_after)
        return self.url(path)

    def count(self, path: str) -> int:
        with self._lock:
            return self.requests[path]

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                """Quiet."""

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                with server._lock:
                    server.requests[path] += 1
                served = server.files.get(path)
                if served is None:
                    self._answer(404, b"not found", {})
                    return
                size = len(served.body)
                wanted = RANGE.fullmatch(self.headers.get("Range") or "") if server.ranges else None
                if wanted is None:
                    self._answer(200, served.body, {"Accept-Ranges": "bytes" if server.ranges else "none"},
                                 served.cut_after)
                    return
                start = int(wanted.group(1))
                end = min(int(wanted.group(2)) + 1 if wanted.group(2) else size, size)
                if start >= size:
                    self._answer(416, b"", {"Content-Range": f"bytes */{size}"})
                    return
                cut = None if served.cut_after is None else max(served.cut_after - start, 0)
                self._answer(206, served.body[start:end], {"Content-Range": f"bytes {start}-{end - 1}/{size}"}, cut)

            def _answer(self, status: int, body: bytes, headers: dict[str, str], cut_after: int | None = None) -> None:
                """`cut_after`: bytes of this body sent before the connection drops (None: all)."""
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                shown = body if cut_after is None else body[:cut_after]
                try:
                    self._send_capped(memoryview(shown))
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

            def _send_capped(self, body: memoryview) -> None:
                """At most `bytes_per_second` on this connection, paced per block."""
                started = time.monotonic()
                for offset in range(0, len(body), SEND_BYTES):
                    block = body[offset:offset + SEND_BYTES]
                    self.wfile.write(block)
                    if server.bytes_per_second:
                        due = started + (offset + len(block)) / server.bytes_per_second
                        time.sleep(max(0.0, due - time.monotonic()))

        return Handler
