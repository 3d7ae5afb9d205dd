"""What a newcomer and a busy client meet first, through the real Cog HTTP server (coglet).

The README's own server and curl lines (run as written), the setup error without weights, no 409
for a client that sends one request after another, a clear 409 beyond capacity, cancellation of
running and waiting predictions, and files from the server's own disk.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from cog_server import CogServer, free_port, max_concurrency
from conftest import REPO
from helpers import data_uri, decode

SMALLEST = {"prompt": "x", "aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 1,
            "model": "schnell", "seed": 3}
# Minutes on a CPU unless cancelled: dev, 50 steps, 4 outputs at the largest size.
LONG = {"prompt": "x", "aspect_ratio": "custom", "width": 1440, "height": 1440, "num_outputs": 4,
        "num_inference_steps": 50, "seed": 1}
LONG_STARTED = "size 1440x1440, 50 steps, 4 output(s)"
WAIT_SECONDS = 300


def readme_blocks_after(heading: str, count: int) -> list[str]:
    """The first `count` bash blocks after a README heading, exactly as a reader copies them."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)[:count]


def test_readme_server_and_curl_lines_work_as_written_after_the_demo(tiny_weights, tmp_path):
    """A checkout after `bash scripts/demo.sh`: the tiny weights in .tiny-weights/, no ./weights."""
    server_lines, client_lines = readme_blocks_after("### Serve it yourself", 2)
    assert f"COG_MAX_CONCURRENCY={max_concurrency()} " in server_lines
    assert " OMP_WAIT_POLICY=PASSIVE " in server_lines  # as CogServer and the benchmarks run it
    port = str(free_port())
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("predict.py", "lassie", ".cog", "cog.yaml"):
        (checkout / name).symlink_to(REPO / name)
    (checkout / ".tiny-weights").symlink_to(tiny_weights)
    env = {key: value for key, value in os.environ.items() if key != "LASSIE_WEIGHTS_DIR"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # stands in for .venv/bin
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(["bash", "-c", server_lines.replace("5000", port)], cwd=checkout, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        health = {}
        while health.get("status") not in ("READY", "SETUP_FAILED") and time.monotonic() < deadline:
            time.sleep(0.5)
            health = CogServer(tiny_weights, port=int(port)).health()
        assert health.get("status") == "READY", (tmp_path / "server.log").read_text()[-3000:]
        client = subprocess.run(["bash", "-ec", client_lines.replace("5000", port)], cwd=checkout, env=env,
                                capture_output=True, text=True, timeout=WAIT_SECONDS)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert client.returncode == 0, (client.stderr, (tmp_path / "server.log").read_text()[-3000:])
    image = Image.open(checkout / "out" / "server-0.png")
    assert (image.format, image.size) == ("PNG", (512, 512))


def test_setup_without_weights_names_the_token_and_the_tiny_weights(tmp_path):
    server = CogServer(tmp_path / "weights", env={
        "HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": "http://127.0.0.1:9"})
    try:
        health = server.start()
    finally:
        server.stop()
    assert health["status"] == "SETUP_FAILED"
    logs = health["setup"]["logs"]
    assert "HF_TOKEN=<that token>" in logs
    assert ".venv/bin/python scripts/make_tiny_weights.py .tiny-weights" in logs and "LASSIE_WEIGHTS_DIR=.tiny-weights" in logs


def test_one_request_after_another_never_gets_409(cog_server):
    statuses = [cog_server.predict(SMALLEST) for _ in range(40)]
    assert [code for code, _ in statuses] == [200] * 40
    assert all(body["status"] == "succeeded" for _, body in statuses)


class Webhooks:
    """Collects the prediction updates coglet POSTs (start, logs, completed)."""

    def __init__(self) -> None:
        events = self.events = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                events.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/hook"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def wait_for(self, prediction_id: str, accept) -> dict:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            for event in list(self.events):
                if event.get("id") == prediction_id and accept(event):
                    return event
            time.sleep(0.1)
        updates = [event for event in self.events if event.get("id") == prediction_id]
        raise AssertionError(f"no such update for {prediction_id}: {updates}")

    def close(self) -> None:
        self._server.shutdown()


def finished(event: dict) -> bool:
    return event.get("status") in ("succeeded", "failed", "canceled")


@pytest.fixture
def webhooks() -> Iterator[Webhooks]:
    hooks = Webhooks()
    yield hooks
    hooks.close()


def wait_for_server_log(server: CogServer, text: str, prediction_id: str) -> None:
    """Waits for a worker's log line in the server's own log, which it writes as the line comes.
    Webhooks are no clock for this: coglet sends a log line that follows another closely only with
    the next event, so with no progress bar the line before a long generation arrives at its end."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if any(text in line and f'"prediction_id":"{prediction_id}"' in line
               for line in server.log_path.read_text().splitlines()):
            return
        time.sleep(0.1)
    raise AssertionError(f"no log line with {text} for {prediction_id} in {server.log_path}")


def test_beyond_capacity_a_clear_409_and_cancel_stops_running_and_waiting_predictions(cog_server, webhooks):
    background = {"Prefer": "respond-async"}
    # "waiting" is sent once "running" generates: sent together, either could reach the GPU first (each prepares
    # beside the line), and a cancel of one that is finishing ends it as canceled or failed after it generated.
    # Each is cancelled only once its own log shows it started in the worker: coglet 0.23.1 loses a cancel that
    # arrives as the worker starts the prediction ("Applying pending cancellation"), and it then runs to the end.
    for prediction_id, started in (("running", '"message":"precision:'), ("waiting", LONG_STARTED)):
        status, body = cog_server.post("/predictions", {"id": prediction_id, "input": LONG, "webhook": webhooks.url},
                                       headers=background)
        assert status == 202, body
        wait_for_server_log(cog_server, started, prediction_id)
    status, body = cog_server.predict(SMALLEST)
    assert status == 409 and body["error"] == "At capacity - all prediction slots busy"

    for prediction_id in ("running", "waiting"):
        assert cog_server.post(f"/predictions/{prediction_id}/cancel", {})[0] == 200
    running, waiting = webhooks.wait_for("running", finished), webhooks.wait_for("waiting", finished)
    assert running["status"] == "canceled" and waiting["status"] == "canceled", (running, waiting)
    # The waiting one may start in the moment between the two cancels, but never gets to generate.
    assert "generating took" not in (waiting.get("logs") or "")
    status, body = cog_server.predict(SMALLEST)  # runs once the cancelled one has stopped
    assert status == 200 and body["status"] == "succeeded"
    # coglet reports the cancel at once; what the running prediction did after it is in the server's log.
    after_start = cog_server.log_path.read_text().rsplit(LONG_STARTED, 1)[1]
    assert "generating took" not in after_start.split(body["logs"].splitlines()[0], 1)[0]


@pytest.fixture
def photo_on_the_server(tmp_path) -> Iterator[list[Path]]:
    """A PNG elsewhere on disk, and one directly in the temp directory coglet downloads into."""
    elsewhere = tmp_path / "private.png"
    Image.new("RGB", (64, 64), "red").save(elsewhere)
    with tempfile.NamedTemporaryFile(suffix=".png") as in_temp_dir:
        Image.new("RGB", (64, 64), "red").save(in_temp_dir.name)
        yield [elsewhere, Path(in_temp_dir.name)]


@pytest.mark.parametrize("field", ["image", "mask"])
def test_paths_on_the_servers_disk_are_refused(cog_server, photo_on_the_server, field):
    photo = data_uri(Image.new("RGB", (64, 64), "blue"))
    for path in photo_on_the_server:
        inputs = {"image": str(path)} if field == "image" else {"image": photo, "mask": str(path)}
        status, body = cog_server.predict({**SMALLEST, **inputs})
        assert status == 200 and body["status"] == "failed", body
        assert f"{field}: must be an http(s) URL or a data URI; paths on the server's disk are refused" in body["error"]
        status, body = cog_server.predict({**SMALLEST, "image": photo, "mask": data_uri(Image.new("L", (64, 64), 255))})
        assert status == 200 and body["status"] == "succeeded"


def test_coglet_fetches_image_urls_itself_as_the_readme_security_section_says(cog_server):
    """coglet downloads `image` before predict() runs, from any address (here 127.0.0.1, which the
    extra-LoRA rules refuse). If a coglet release stops doing so, README's "Security" must change."""
    from fake_services import FakeServices

    png = io.BytesIO()
    Image.new("RGB", (64, 64), "green").save(png, format="PNG")
    with FakeServices() as files:
        url = files.serve("/photo.png", png.getvalue())
        status, body = cog_server.predict({**SMALLEST, "image": url})
        fetched = [seen.path for seen in files.seen]
    assert status == 200 and body["status"] == "succeeded", body
    assert decode(body["output"][0]).size == (256, 256)  # scaled up to the smallest side allowed
    assert fetched == ["/photo.png"]
