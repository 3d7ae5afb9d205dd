"""The one loopback stand-in for the Hugging Face hub: just what huggingface_hub asks for.

Plays model info with file metadata (`GET /api/models/{repo}[/revision/{rev}]`), the file tree
that `snapshot_download` and `list_repo_tree` read (`GET /api/models/{repo}/tree/{rev}`), the
token check (`GET /api/models/{repo}/auth-check`), file HEAD/GET (`/{repo}/resolve/{rev}/{path}`)
with the hub's headers (ETag, X-Repo-Commit, X-Linked-Etag, X-Linked-Size, Content-Length), Range
requests, gated repos (401 without a token, 403 with a token that has no access) and private
repos (refused as "not found", like the hub). Plain files (a LoRA tar) are served under `/files/`.
Faults can be injected per URL path: drop the connection mid-file once, serve corrupted bytes, or
fail with 500. Every request is recorded, so tests can count what was fetched.

It runs its own server (`with FakeHub() as hub`, for HF_ENDPOINT) or answers under a prefix of
another server (`FakeServices` mounts it at `/hf`) through `answer`.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".jpg")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
AUTH_CHECK = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/auth-check$")
TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?$")
MODEL_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<revision>[^/]+))?$")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    token: str | None = None  # set: only this token may read the repo
    gated: bool = False  # with a token: gated (a license to accept) rather than private
    branch: str = "main"

    @property
    def commit(self) -> str:
        return hashlib.sha1(self.repo_id.encode()).hexdigest()

    def knows(self, revision: str) -> bool:
        return revision in (self.branch, self.commit)

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def etag(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else git_blob_id(data)

    def blob_id(self, path: str) -> str:
        if not self.is_lfs(path):
            return git_blob_id(self.files[path])
        return git_blob_id(self._pointer(path).encode())

    def _pointer(self, path: str) -> str:
        oid, size = self.etag(path), len(self.files[path])
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"

    def sibling(self, path: str) -> dict:
        entry = {"rfilename": path, "size": len(self.files[path]), "blobId": self.blob_id(path)}
        if self.is_lfs(path):
            entry["lfs"] = {"sha256": self.etag(path), "size": len(self.files[path]),
                            "pointerSize": len(self._pointer(path))}
        return entry

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "path": path, "size": len(self.files[path]), "oid": self.blob_id(path)}
        if self.is_lfs(path):
            entry["lfs"] = {"oid": self.etag(path), "size": len(self.files[path]),
                            "pointerSize": len(self._pointer(path))}
        return entry

    def info(self) -> dict:
        return {"id": self.repo_id, "sha": self.commit, "private": self.token is not None and not self.gated,
                "gated": "manual" if self.gated else False,
                "siblings": [self.sibling(path) for path in sorted(self.files)]}

    def refusal(self, token: str | None, content: bool) -> tuple[int, str, str] | None:
        """The hub's answer to a token that may not read this (status, error code, message).

        A gated repo's listings are public and only its files are refused; a private repo is
        "not found" to everyone else.
        """
        if self.token is None or token == self.token or (self.gated and not content):
            return None
        status = 401 if token is None else 403
        if not self.gated:
            return status, "RepoNotFound", "Repository not found"
        if token is None:
            return 401, "GatedRepo", (f"Access to model {self.repo_id} is restricted. You must have access to it "
                                      "and be authenticated to access it. Please log in.")
        return 403, "GatedRepo", f"Access to model {self.repo_id} is restricted and you are not in the authorized list."


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
        self._server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        """Where its own server listens (started by `with`)."""
        assert self._server is not None, "use `with FakeHub() as hub` to run its own server"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo_id: str, files: Path | Mapping[str, bytes], extra: Mapping[str, bytes] | None = None,
                 token: str | None = None, gated: bool = False, branch: str = "main") -> FakeRepo:
        """`files`: a directory to serve as the repo, or the files themselves (path -> bytes)."""
        if isinstance(files, Path):
            files = {path.relative_to(files).as_posix(): path.read_bytes()
                     for path in sorted(files.rglob("*")) if path.is_file()}
        self.repos[repo_id] = FakeRepo(repo_id, dict(files) | dict(extra or {}), token, gated, branch)
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

    def answer(self, handler: BaseHTTPRequestHandler, path: str, body: bool) -> None:
        """Answers one request whose URL path (below any mount prefix) is `path`."""
        token = handler.headers.get("Authorization", "").removeprefix("Bearer ").strip() or None
        with self._lock:
            self.requests.append(Request(handler.command, path, handler.headers.get("Range"), token is not None))
        _Answer(self, handler, body).route(path, token)

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_OwnServerHandler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def _take_drop(self, path: str) -> int | None:
        with self._lock:
            return self.faults.drop_once.pop(path, None)


class _OwnServerHandler(BaseHTTPRequestHandler):
    fake_hub: FakeHub

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: test output stays readable."""

    def do_HEAD(self) -> None:
        self.fake_hub.answer(self, unquote(urlsplit(self.path).path), body=False)

    def do_GET(self) -> None:
        self.fake_hub.answer(self, unquote(urlsplit(self.path).path), body=True)


class _Answer:
    """One response, written to the handler of whichever server received the request."""

    def __init__(self, hub: FakeHub, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.hub, self.handler, self.body = hub, handler, body

    def route(self, path: str, token: str | None) -> None:
        if match := AUTH_CHECK.match(path):
            self._api(match["repo"], None, token, content=True, reply=lambda repo: {"access": "granted"})
        elif match := TREE.match(path):
            prefix = f"{match['path']}/" if match["path"] else ""
            self._api(match["repo"], match["revision"], token, content=False, reply=lambda repo: [
                repo.tree_entry(name) for name in sorted(repo.files) if name.startswith(prefix)])
        elif match := MODEL_INFO.match(path):
            self._api(match["repo"], match["revision"], token, content=False, reply=FakeRepo.info)
        elif match := RESOLVE.match(path):
            self._repo_file(match["repo"], match["revision"], match["path"], path, token)
        elif path in self.hub.plain_files:
            self._content(path, self.hub.plain_files[path], {})
        else:
            self._error(404, "EntryNotFound", "Entry not found")

    def _repo(self, repo_id: str, revision: str | None, token: str | None, content: bool) -> FakeRepo | None:
        """The repo when this token may read it at `revision`; otherwise the hub's error is sent."""
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")  # the hub cannot say "private"
        elif refusal := repo.refusal(token, content):
            self._error(*refusal)
        elif revision is not None and not repo.knows(revision):
            self._error(404, "RevisionNotFound", "Invalid rev id")
        else:
            return repo
        return None

    def _api(self, repo_id: str, revision: str | None, token: str | None, content: bool, reply) -> None:
        if (repo := self._repo(repo_id, revision, token, content)) is not None:
            self._json(reply(repo))

    def _repo_file(self, repo_id: str, revision: str, file: str, path: str, token: str | None) -> None:
        repo = self._repo(repo_id, revision, token, content=True)
        if repo is None:
            return
        if file not in repo.files:
            self._error(404, "EntryNotFound", f"{file} does not exist on {revision}")
            return
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{repo.etag(file)}"'}
        if repo.is_lfs(file):
            headers |= {"X-Linked-Etag": f'"{repo.etag(file)}"', "X-Linked-Size": str(len(repo.files[file]))}
        self._content(path, repo.files[file], headers)

    def _json(self, data: object) -> None:
        payload = json.dumps(data).encode()
        self._head(200, {"Content-Type": "application/json", "Content-Length": str(len(payload))})
        if self.handler.command != "HEAD":
            self.handler.wfile.write(payload)

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.handler.send_response(status)
        for name, value in headers.items():
            self.handler.send_header(name, value)
        self.handler.end_headers()

    def _content(self, path: str, data: bytes, headers: dict[str, str]) -> None:
        faults = self.hub.faults
        if self.body and path in faults.fail:
            self._error(500, "", "Internal Error")
            return
        if path in faults.corrupt:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
        start = self._range_start(len(data)) if self.body else 0
        if start is None:
            self._error(416, "", "Range Not Satisfiable")
            return
        headers = headers | {"Accept-Ranges": "bytes", "Content-Length": str(len(data) - start)}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._head(206 if start else 200, headers)
        if self.body:
            self._send_body(path, data[start:])

    def _range_start(self, size: int) -> int | None:
        """The start of an open `bytes=N-` range; None when it lies beyond the file."""
        match = re.fullmatch(r"bytes=(\d+)-", self.handler.headers.get("Range", "bytes=0-"))
        start = int(match[1]) if match else 0
        return start if start < size or start == 0 else None

    def _send_body(self, path: str, data: bytes) -> None:
        cut = self.hub._take_drop(path)
        if cut is None:
            self.handler.wfile.write(data)
            return
        self.handler.wfile.write(data[:cut])
        self.handler.wfile.flush()
        self.handler.connection.shutdown(socket.SHUT_RDWR)
        self.handler.close_connection = True

    def _error(self, status: int, code: str, message: str) -> None:
        payload = json.dumps({"error": message}).encode()
        headers = {"X-Error-Code": code} if code else {}
        self._head(status, headers | {"X-Error-Message": message, "Content-Type": "application/json",
                                      "Content-Length": str(len(payload))})
        if self.handler.command != "HEAD":
            self.handler.wfile.write(payload)
