"""Run the real Cog HTTP server (coglet) locally, without Docker, and talk to it.

Used by the demo and the tests. The server's worker is started as plain `python` from PATH,
so this interpreter's directory goes first on PATH (else: "No module named coglet"). Its slots
come from cog.yaml's `concurrency.max`, as `cog build` bakes them into the image.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def max_concurrency() -> int:
    """What `cog build` turns cog.yaml's `concurrency.max` into (COG_MAX_CONCURRENCY)."""
    config = yaml.safe_load((REPO / "cog.yaml").read_text())
    return int(config.get("concurrency", {}).get("max", 1))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CogServer:
    def __init__(self, weights_dir: Path, port: int | None = None, env: dict[str, str] | None = None,
                 log_path: Path | None = None, wrapper: list[str] | None = None) -> None:
        """`wrapper`: a command the server is started through (it must exec its arguments, so the
        process stays the one `stop` signals), e.g. `unshare` for a private mount namespace."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"cog-server-{self.port}.log"
        self._env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
            "PORT": str(self.port),
            "COG_MAX_CONCURRENCY": str(max_concurrency()),
            # On a CPU box shared with other work, OpenMP threads that spin while they wait make
            # an async predictor's CPU predictions several times slower; waiting passively costs
            # nothing measurable here and GPU work does not use OpenMP.
            "OMP_WAIT_POLICY": "PASSIVE",
            "LASSIE_WEIGHTS_DIR": str(weights_dir),
            **(env or {}),
        }
        self._wrapper = wrapper or []
        self._process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self, timeout: float = 300.0) -> dict:
        log = open(self.log_path, "wb")
        self._process = subprocess.Popen(
            [*self._wrapper, sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=REPO, env=self._env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"cog server exited early; see {self.log_path}")
            health = self.health()
            if health.get("status") in ("READY", "SETUP_FAILED"):
                return health
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"cog server not ready after {timeout:.0f}s; see {self.log_path}")

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(f"{self.url}/health-check", timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            return {}

    def predict(self, inputs: dict, timeout: float = 600.0) -> tuple[int, dict]:
        """POST /predictions and wait for the prediction: (HTTP status, response body)."""
        return self.post("/predictions", {"input": inputs}, timeout=timeout)

    def post(self, path: str, body: dict, headers: dict[str, str] | None = None,
             timeout: float = 600.0) -> tuple[int, dict]:
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def stop(self) -> None:
        if self._process is None:
            return
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        self._process = None

    def __enter__(self) -> CogServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
