"""A loopback HTTP server that plays every place an extra LoRA comes from.

One threaded server on 127.0.0.1 with a prefix per service: Replicate `_weights` tars under
`/replicate`, the CivitAI API and downloads under `/civitai`, the Hugging Face hub under `/hf` (for
HF_ENDPOINT; the project's one fake hub, `fake_hub.FakeHub`, answers there), and plain files
anywhere else. Routes can require a bearer token, lie about their length, stall, or redirect. Every request
is recorded (path, method, Authorization header) so tests can count downloads and check where a
token went. Tests build the LoRA files and tars it serves with helpers.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest

from fake_hub import FakeHub
from lassie.fetch.addresses import parse_ip_literal
from lassie.settings import LoraSettings, Settings

HF_PREFIX = "/hf"


class NonLoopbackConnection(AssertionError):
    """A test tried to reach beyond this machine."""


def _is_loopback_host(host: object) -> bool:
    text = host.decode() if isinstance(host, bytes) else str(host)
    if text == "localhost":
        return True
    address = parse_ip_literal(text)
    if address is None:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def forbid_non_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes any name lookup or connection beyond loopback fail the test, whichever library tries."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        if host is not None and not _is_loopback_host(host):
            raise NonLoopbackConnection(f"test tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback_host(address[0]):
            raise NonLoopbackConnection(f"test tried to connect to {address!r}")
        real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    token: str | None = None  # set: requests must carry `Authorization: Bearer <token>`
    declared_length: int | None = None  # Content-Length to announce (None: the body's length)
    send_length: bool = True
    delay: float = 0.0  # seconds before the response starts
    stall: float = 0.0  # seconds between the headers and the body
    trickle: float = 0.0  # seconds between one byte of the body and the next (0: all at once)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: str
    authorization: str | None


@dataclass(frozen=True)
class CivitaiFile:
    name: str
    data: bytes
    format: str = "SafeTensor"
    primary: bool = False


class FakeServices:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.routes: dict[str, Route] = {}
        self.hub = FakeHub()
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    # --- addresses ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def replicate_url(self) -> str:
        return f"{self.base}/replicate"

    @property
    def civitai_url(self) -> str:
        return f"{self.base}/civitai"

    @property
    def hf_endpoint(self) -> str:
        return f"{self.base}{HF_PREFIX}"

    def env(self) -> dict[str, str]:
        return {"LASSIE_REPLICATE_URL": self.replicate_url, "LASSIE_CIVITAI_URL": self.civitai_url,
                "HF_ENDPOINT": self.hf_endpoint, "LASSIE_ALLOW_PRIVATE_URLS": "1"}

    def settings(self, **changes: object) -> LoraSettings:
        """The LoRA settings `env()` stands for (these services, every address allowed), plus `changes`."""
        return replace(Settings.from_env(self.env()).lora, **changes)

    # --- plain routes ---------------------------------------------------------------------------

    def serve(self, path: str, body: bytes = b"", **options: object) -> str:
        """`path` may carry a `?query`: such a route answers only that exact query."""
        self.routes[path] = Route(body=body, **options)  # type: ignore[arg-type]
        return f"{self.base}{path}"

    def redirect(self, path: str, location: str, status: int = 302, **options: object) -> str:
        return self.serve(path, status=status, headers={"Location": location}, **options)

    # --- services -------------------------------------------------------------------------------

    def add_replicate_model(self, owner: str, model: str, archive: bytes, version: str | None = None,
                            token: str | None = None) -> str:
        path = f"/replicate/{owner}/{model}" + (f"/versions/{version}" if version else "") + "/_weights"
        return self.serve(path, archive, token=token, headers={"Content-Type": "application/x-tar"})

    def add_civitai_model(self, model_id: int, versions: dict[int, list[CivitaiFile]], token: str | None = None,
                          kind: str = "LORA") -> None:
        """`versions` newest first, as the API lists them; each file is downloadable by version id."""
        listing = []
        for version_id, files in versions.items():
            listing.append({"id": version_id, "name": f"v{version_id}", "baseModel": "Flux.1 D",
                            "files": [self._civitai_file(version_id, item, token) for item in files]})
            primary = next((item for item in files if item.primary), files[0]) if files else None
            if primary is not None:
                self.serve(f"/civitai/api/download/models/{version_id}", primary.data, token=token)
        document = {"id": model_id, "name": f"model {model_id}", "type": kind, "modelVersions": listing}
        self.serve(f"/civitai/api/v1/models/{model_id}", json.dumps(document).encode(),
                   headers={"Content-Type": "application/json"})

    def _civitai_file(self, version_id: int, item: CivitaiFile, token: str | None) -> dict[str, object]:
        """Like the real API: the listed downloadUrl is on civitai.com and selects the file by query."""
        query = f"type=Model&format={item.format}"
        self.serve(f"/civitai/api/download/models/{version_id}?{query}", item.data, token=token)
        return {"name": item.name, "sizeKB": len(item.data) / 1024, "type": "Model", "primary": item.primary,
                "metadata": {"format": item.format},
                "downloadUrl": f"https://civitai.com/api/download/models/{version_id}?{query}"}

    def add_hf_repo(self, repo_id: str, files: dict[str, bytes], token: str | None = None,
                    revision: str = "main") -> None:
        """A repo on the hub under `/hf`; with a token it is private (others get "not found")."""
        self.hub.add_repo(repo_id, files, token=token, branch=revision)

    # --- what happened --------------------------------------------------------------------------

    def count(self, path: str, method: str = "GET") -> int:
        """Requests for `path`; a `?query` in it must match too."""
        wanted, _, query = path.partition("?")
        with self._lock:
            return sum(1 for seen in self.seen
                       if seen.path == wanted and seen.method == method and (not query or seen.query == query))

    def authorizations(self, path: str) -> list[str | None]:
        with self._lock:
            return [seen.authorization for seen in self.seen if seen.path == path]

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    # --- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> FakeServices:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        services = self

        class Handler(_Handler):
            fake = services

        return Handler


class _Handler(BaseHTTPRequestHandler):
    fake: FakeServices

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: test output stays readable."""

    def do_HEAD(self) -> None:
        self._serve(with_body=False)

    def do_GET(self) -> None:
        self._serve(with_body=True)

    def _serve(self, with_body: bool) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        authorization = self.headers.get("Authorization")
        self.fake._record(Seen(self.command, path, parts.query, authorization))
        if path.startswith(f"{HF_PREFIX}/"):
            self.fake.hub.answer(self, path.removeprefix(HF_PREFIX), body=with_body)
            return
        route = self.fake.routes.get(f"{path}?{parts.query}") or self.fake.routes.get(path)
        if route is None:
            self._not_found(path)
            return
        time.sleep(route.delay)
        if route.token is not None and authorization != f"Bearer {route.token}":
            status = 401 if authorization is None else 403
            self._plain(status, b'{"error": "unauthorized"}', {})
            return
        self._respond(route, with_body)

    def _respond(self, route: Route, with_body: bool) -> None:
        self.send_response(route.status)
        for name, value in route.headers.items():
            self.send_header(name, value)
        if route.send_length:
            length = route.declared_length if route.declared_length is not None else len(route.body)
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.flush()
        time.sleep(route.stall)
        if with_body and route.trickle:
            self._trickle(route)
        elif with_body:
            self.wfile.write(route.body)

    def _trickle(self, route: Route) -> None:
        """A byte at a time: never quiet long enough for a per-read timeout; stops when the client leaves."""
        try:
            for offset in range(len(route.body)):
                self.wfile.write(route.body[offset:offset + 1])
                self.wfile.flush()
                time.sleep(route.trickle)
        except (BrokenPipeError, ConnectionResetError):
            return

    def _not_found(self, path: str) -> None:
        self._plain(404, b"not found", {})

    def _plain(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def services(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServices]:
    """The fake services running, their addresses in the environment, and no way off loopback."""
    for name in ("HF_TOKEN", "CIVITAI_API_TOKEN", "REPLICATE_API_TOKEN", "LASSIE_MAX_LORA_BYTES",
                 "LASSIE_LORA_CACHE_BYTES", "LASSIE_LORA_CACHE_MIN_FREE_BYTES"):
        monkeypatch.delenv(name, raising=False)
    forbid_non_loopback(monkeypatch)
    with FakeServices() as running:
        for name, value in running.env().items():
            monkeypatch.setenv(name, value)
        yield running
