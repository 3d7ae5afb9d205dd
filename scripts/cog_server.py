"""Run the real Cog HTTP server (coglet) locally, without Docker, and talk to it.

Used by the demo and the tests. The server's worker is started as plain `python` from PATH,
so this interpreter's directory goes first on PATH (else: "No module named coglet").
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

REPO = Path(__file__).resolve().parent.parent
CAPACITY_RETRY_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CogServer:
    def __init__(self, weights_dir: Path, port: int | None = None, env: dict[str, str] | None = None,
                 log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"cog-server-{self.port}.log"
        self._env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
            "PORT": str(self.port),
            "LASSIE_WEIGHTS_DIR": str(weights_dir),
            **(env or {}),
        }
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> dict:
        log = open(self.log_path, "wb")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
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
        """POST /predictions; a brief 409 'at capacity' right after a prediction is retried."""
        body = json.dumps({"input": inputs}).encode()
        deadline = time.monotonic() + CAPACITY_RETRY_SECONDS
        while True:
            request = urllib.request.Request(f"{self.url}/predictions", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as error:
                if error.code == 409 and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
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

    def __enter__(self) -> "CogServer":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
