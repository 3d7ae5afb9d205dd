"""What a busy client meets, through the real Cog HTTP server (coglet).

No 409 for a client that sends one request after another, a clear 409 beyond capacity, and
cancellation of running and waiting predictions.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

SMALLEST = {"prompt": "x", "aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 1,
            "model": "schnell", "seed": 3}
# Minutes on a CPU unless cancelled: dev, 50 steps, 4 outputs at the largest size.
LONG = {"prompt": "x", "aspect_ratio": "custom", "width": 1440, "height": 1440, "num_outputs": 4,
        "num_inference_steps": 50, "seed": 1}
LONG_STARTED = "size 1440x1440, 50 steps, 4 output(s)"
WAIT_SECONDS = 300


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


def test_beyond_capacity_a_clear_409_and_cancel_stops_running_and_waiting_predictions(cog_server, webhooks):
    background = {"Prefer": "respond-async"}
    for prediction_id in ("running", "waiting"):
        status, body = cog_server.post("/predictions", {"id": prediction_id, "input": LONG, "webhook": webhooks.url},
                                       headers=background)
        assert status == 202, body
    status, body = cog_server.predict(SMALLEST)
    assert status == 409 and body["error"] == "At capacity - all prediction slots busy"

    webhooks.wait_for("running", lambda event: "precision:" in (event.get("logs") or ""))  # generating now
    for prediction_id in ("running", "waiting"):
        assert cog_server.post(f"/predictions/{prediction_id}/cancel", {})[0] == 200
    running, waiting = webhooks.wait_for("running", finished), webhooks.wait_for("waiting", finished)
    assert running["status"] == "canceled" and waiting["status"] == "canceled"
    assert "seed" not in (waiting.get("logs") or "")  # it never started
    status, body = cog_server.predict(SMALLEST)  # runs once the cancelled one has stopped
    assert status == 200 and body["status"] == "succeeded"
    # coglet reports the cancel at once; what the running prediction did after it is in the server's log.
    after_start = cog_server.log_path.read_text().rsplit(LONG_STARTED, 1)[1]
    assert "generating took" not in after_start.split(body["logs"].splitlines()[0], 1)[0]
