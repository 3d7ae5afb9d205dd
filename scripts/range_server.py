"""A loopback file server for weights tars: HTTP range requests, a per-connection speed cap, faults.

Plays a weights host (Replicate's, a mirror) for the tests and `bench_download.py`: it answers
`Range: bytes=a-b` with 206 Partial Content (or ignores ranges, like a host without them), can cap
each connection's speed (as a real host's per-connection throughput is capped), and can cut a
response short after some bytes while still announcing the full length. Like a real host it names
each file's version (ETag and Last-Modified) and honours `If-Range`. Faults for the tests: a 206 of
another range than asked for, a file replaced after some requests, a body trickled byte by byte.
Every GET is counted, with the If-Range it carried.
"""

from __future__ import annotations

import hashlib
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
    wrong_range: bool = False  # later range requests are answered with the range after the one asked for
    replaced_by: bytes | None = None  # the file's next version, served from request number `replaced_after`
    replaced_after: int = 1
    keeps_changing: bool = False  # every request sees another version than the one before
    ignores_if_range: bool = False  # answers ranges of whatever version it has (with that version's ETag)
    trickle: float = 0.0  # seconds between one byte and the next (0: as fast as the cap allows)
    validators: bool = True  # False: no ETag or Last-Modified

    def version(self, request_number: int) -> tuple[bytes, str, str]:
        """The body, ETag and Last-Modified that the `request_number`th request (from 1) sees."""
        later = request_number % 2 == 0 if self.keeps_changing else request_number > self.replaced_after
        replaced = self.replaced_by is not None and later
        body = self.replaced_by if replaced and self.replaced_by is not None else self.body
        day = 2 if replaced else 1
        return body, f'"{hashlib.sha256(body).hexdigest()[:16]}"', f"Mon, 0{day} Jan 2024 00:00:00 GMT"


class RangeServer:
    """`serve(path, body)`; then `url(path)`. `ranges=False` answers every request whole (200)."""

    def __init__(self, bytes_per_second: float | None = None, ranges: bool = True, host: str = "127.0.0.1") -> None:
        self.files: dict[str, Served] = {}
        self.bytes_per_second = bytes_per_second
        self.ranges = ranges
        self.requests: Counter[str] = Counter()
        self.if_ranges: list[str | None] = []  # the If-Range header of every range request, in order
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

    def serve(self, path: str, body: bytes, cut_after: int | None = None, **faults: object) -> str:
        self.files[path] = Served(body, cut_after, **faults)  # type: ignore[arg-type]
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
            trickle = 0.0

            def log_message(self, format: str, *args: object) -> None:
                """Quiet."""

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                with server._lock:
                    server.requests[path] += 1
                    number = server.requests[path]
                    if self.headers.get("Range"):
                        server.if_ranges.append(self.headers.get("If-Range"))
                served = server.files.get(path)
                if served is None:
                    self._answer(404, b"not found", {})
                    return
                body, etag, modified = served.version(number)
                named = {"ETag": etag, "Last-Modified": modified} if served.validators else {}
                self.trickle = served.trickle
                size = len(body)
                wanted = RANGE.fullmatch(self.headers.get("Range") or "") if server.ranges else None
                if_range = self.headers.get("If-Range")
                stale = if_range is not None and if_range not in (etag, modified) and not served.ignores_if_range
                if wanted is None or stale:
                    self._answer(200, body, {"Accept-Ranges": "bytes" if server.ranges else "none", **named},
                                 served.cut_after)
                    return
                start = int(wanted.group(1))
                end = min(int(wanted.group(2)) + 1 if wanted.group(2) else size, size)
                if start >= size:
                    self._answer(416, b"", {"Content-Range": f"bytes */{size}"})
                    return
                if served.wrong_range and start > 0:
                    start, end = min(end, size - 1), min(2 * end - start, size)
                cut = None if served.cut_after is None else max(served.cut_after - start, 0)
                self._answer(206, body[start:end], {"Content-Range": f"bytes {start}-{end - 1}/{size}", **named},
                             cut)

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
                if self.trickle:
                    for offset in range(len(body)):
                        self.wfile.write(body[offset:offset + 1])
                        self.wfile.flush()
                        time.sleep(self.trickle)
                    return
                started = time.monotonic()
                for offset in range(0, len(body), SEND_BYTES):
                    block = body[offset:offset + SEND_BYTES]
                    self.wfile.write(block)
                    if server.bytes_per_second:
                        due = started + (offset + len(block)) / server.bytes_per_second
                        time.sleep(max(0.0, due - time.monotonic()))

        return Handler
