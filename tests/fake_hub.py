"""A loopback stand-in for the Hugging Face hub: just what huggingface_hub's download path asks for.

Plays model info with file metadata (`GET /api/models/{repo}`), the token check
(`GET /api/models/{repo}/auth-check`), file HEAD/GET
(`/{repo}/resolve/{revision}/{path}`) with the hub's headers (ETag, X-Repo-Commit, X-Linked-Etag,
X-Linked-Size, Content-Length), Range requests, and gated repos (401 without a token, 403 with a
token that has no access). Plain files (a LoRA tar) are served under `/files/`. Faults can be
injected per URL path: drop the connection mid-file once, serve corrupted bytes, or fail with 500.
Every request is recorded, so tests can count what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".jpg")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
AUTH_CHECK = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/auth-check$")
MODEL_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<revision>[^/]+))?$")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    token: str | None = None  # set: the repo is gated and only this token has accepted its license

    @property
    def commit(self) -> str:
        return hashlib.sha1(self.repo_id.encode()).hexdigest()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def etag(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else git_blob_id(data)

    def sibling(self, path: str) -> dict:
        data = self.files[path]
        entry = {"rfilename": path, "size": len(data), "blobId": git_blob_id(data)}
        if self.is_lfs(path):
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.etag(path)}\nsize {len(data)}\n"
            entry["blobId"] = git_blob_id(pointer.encode())
            entry["lfs"] = {"sha256": self.etag(path), "size": len(data), "pointerSize": len(pointer)}
        return entry

    def info(self) -> dict:
        return {"id": self.repo_id, "sha": self.commit, "private": False, "gated": "manual" if self.token else False,
                "siblings": [self.sibling(path) for path in sorted(self.files)]}


def gate_refusal(repo: FakeRepo, token: str | None) -> tuple[int, str, str] | None:
    """The hub's answer to a token that may not read a gated repo (status, error code, message)."""
    if repo.token is None or token == repo.token:
        return None
    if token is None:
        return 401, "GatedRepo", (f"Access to model {repo.repo_id} is restricted. You must have access to it "
                                  "and be authenticated to access it. Please log in.")
    return 403, "GatedRepo", f"Access to model {repo.repo_id} is restricted and you are not in the authorized list."


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    authorized: bool


@dataclass
class Faults:
    drop_once: dict[str, int] = field(default_factory=dict)  # URL path -> bytes sent before hanging up
    corrupt: set[str] = field(default_factory=set)
    fail: set[str] = field(default_factory=set)


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.plain_files: dict[str, bytes] = {}
        self.faults = Faults()
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo_id: str, directory: Path, extra: dict[str, bytes] | None = None,
                 token: str | None = None) -> FakeRepo:
        files = {path.relative_to(directory).as_posix(): path.read_bytes()
                 for path in sorted(directory.rglob("*")) if path.is_file()}
        self.repos[repo_id] = FakeRepo(repo_id, files | (extra or {}), token)
        return self.repos[repo_id]

    def add_file(self, name: str, data: bytes) -> str:
        self.plain_files[f"/files/{name}"] = data
        return f"{self.endpoint}/files/{name}"

    def file_path(self, repo_id: str, path: str) -> str:
        """The URL path huggingface_hub fetches a file from (pinned to the repo's commit)."""
        return f"/{repo_id}/resolve/{self.repos[repo_id].commit}/{path}"

    def content_requests(self) -> list[Request]:
        with self._lock:
            return [request for request in self.requests
                    if request.method == "GET" and ("/resolve/" in request.path or request.path.startswith("/files/"))]

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_drop(self, path: str) -> int | None:
        with self._lock:
            return self.faults.drop_once.pop(path, None)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(HubHandler):
            fake_hub = hub

        return Handler


class HubHandler(BaseHTTPRequestHandler):
    fake_hub: FakeHub

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: test output stays readable."""

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip() or None
        self.fake_hub._record(Request(self.command, path, self.headers.get("Range"), token is not None))
        if match := AUTH_CHECK.match(path):
            self._auth_check(match["repo"], token)
        elif match := MODEL_INFO.match(path):
            self._model_info(match["repo"], match["revision"] or "main")
        elif match := RESOLVE.match(path):
            self._repo_file(match["repo"], match["revision"], match["path"], path, token, body)
        elif path in self.fake_hub.plain_files:
            self._content(path, self.fake_hub.plain_files[path], {}, body)
        else:
            self._error(404, "EntryNotFound", "Entry not found")

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self.fake_hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return
        self._json(repo.info())

    def _json(self, data: dict) -> None:
        payload = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _auth_check(self, repo_id: str, token: str | None) -> None:
        repo = self.fake_hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        elif refusal := gate_refusal(repo, token):
            self._error(*refusal)
        else:
            self._json({"access": "granted"})

    def _repo_file(self, repo_id: str, revision: str, file: str, path: str, token: str | None, body: bool) -> None:
        repo = self.fake_hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        elif revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", "Invalid rev id")
        elif refusal := gate_refusal(repo, token):
            self._error(*refusal)
        elif file not in repo.files:
            self._error(404, "EntryNotFound", f"{file} does not exist on {revision}")
        else:
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{repo.etag(file)}"'}
            if repo.is_lfs(file):
                headers |= {"X-Linked-Etag": f'"{repo.etag(file)}"', "X-Linked-Size": str(len(repo.files[file]))}
            self._content(path, repo.files[file], headers, body)

    def _content(self, path: str, data: bytes, headers: dict[str, str], body: bool) -> None:
        faults = self.fake_hub.faults
        if body and path in faults.fail:
            self._error(500, "", "Internal Error")
            return
        if path in faults.corrupt:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
        start = self._range_start(len(data)) if body else 0
        if start is None:
            self._error(416, "", "Range Not Satisfiable")
            return
        self.send_response(206 if start else 200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if body:
            self._send_body(path, data[start:])

    def _range_start(self, size: int) -> int | None:
        """The start of an open `bytes=N-` range; None when it lies beyond the file."""
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "bytes=0-"))
        start = int(match[1]) if match else 0
        return start if start < size or start == 0 else None

    def _send_body(self, path: str, data: bytes) -> None:
        cut = self.fake_hub._take_drop(path) if self.command == "GET" else None
        if cut is None:
            self.wfile.write(data)
            return
        self.wfile.write(data[:cut])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def _error(self, status: int, code: str, message: str) -> None:
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
