"""Faults and edges a user meets, through the real Cog HTTP server (coglet) on the tiny weights.

A LoRA server that trickles a byte per second (refused at LASSIE_LORA_DOWNLOAD_TIMEOUT while the
other slot's request generates), img2img at schnell's 4 steps, sizes taken from extreme images,
masks of another shape, unreadable uploads, a refused LoRA, the setup log, and a LoRA cache whose
disk fills up and then turns read-only (a tmpfs in a private mount namespace, `unshare -rm`).
One server serves every test here but the last, which needs its own namespace.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from diffusers import FluxImg2ImgPipeline
from PIL import Image
from safetensors.torch import save

from cog_server import CogServer
from conftest import LORA_HOST, REPO
from fake_services import FakeServices
from helpers import assert_equal_but_for_rounding, data_uri, decode, reference_images, tiny_lora
from lora_formats import sd15_kohya_lora

TIME_LIMIT = 10  # LASSIE_LORA_DOWNLOAD_TIMEOUT of the server here: far above one small prediction
QUICK = {"prompt": "x", "model": "schnell", "num_inference_steps": 1, "seed": 3, "output_format": "png",
         "disable_safety_checker": True}
CONTROL_CODES = re.compile(r"[\r\x1b]")


def predict(server: CogServer, inputs: dict, timeout: float = 300) -> dict:
    """A finished prediction's body; a 409 right after another prediction returned is retried
    briefly, as clients do (coglet frees a slot a moment after answering)."""
    for _ in range(50):
        status, body = server.predict(inputs, timeout=timeout)
        if status != 409:
            assert status == 200, body
            return body
        time.sleep(0.1)
    raise AssertionError("still 409 after 5 s")


def succeed(server: CogServer, **inputs) -> dict:
    body = predict(server, {**QUICK, **inputs})
    assert body["status"] == "succeeded", body.get("error") or body
    return body


def pixels(body: dict) -> np.ndarray:
    return np.asarray(decode(body["output"][0]).convert("RGB"))


def error_of(body: dict) -> str:
    """The error as lassie words it (coglet puts "Prediction failed: ... InputError: " before it)."""
    assert body["status"] == "failed", body
    return body["error"].split("InputError: ", 1)[-1]


def fail(server: CogServer, **inputs) -> str:
    return error_of(predict(server, {**QUICK, **inputs}))


def noise(seed: int, size: tuple[int, int] = (256, 256)) -> Image.Image:
    values = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(values)


@pytest.fixture(scope="module")
def lora_files() -> Iterator[FakeServices]:
    with FakeServices(host=LORA_HOST) as files:
        yield files


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fault-lora-cache")


@pytest.fixture(scope="module")
def server(tiny_weights: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    server = CogServer(tiny_weights, env={"LASSIE_ALLOW_PRIVATE_URLS": LORA_HOST, "LASSIE_LORA_CACHE": str(cache_dir),
                                          "LASSIE_LORA_DOWNLOAD_TIMEOUT": str(TIME_LIMIT)},
                       log_path=tmp_path_factory.mktemp("faults") / "server.log")
    health = server.start()
    assert health.get("status") == "READY", f"setup failed: {health}"
    yield server
    server.stop()


def test_a_trickling_lora_is_refused_at_the_time_limit_while_the_other_slot_generates(server, lora_files):
    """15 kB at a byte per second would take four hours; no read ever waits long enough to time out."""
    url = lora_files.serve("/trickle/lora.safetensors?signature=secret", tiny_lora(31), trickle=1.0)
    slow: dict = {}
    fetching = threading.Thread(target=lambda: slow.update(predict(server, {**QUICK, "extra_lora": url})))
    fetching.start()
    deadline = time.monotonic() + 60
    while lora_files.count("/trickle/lora.safetensors") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lora_files.count("/trickle/lora.safetensors") == 1, "the download never started"

    succeed(server, seed=4)
    assert fetching.is_alive(), "the plain request should finish while the LoRA still trickles in"
    fetching.join(timeout=120)
    error = error_of(slow)
    shown = url.split("?")[0] + "?…"
    assert error.startswith(f"extra_lora: the download of {shown} took longer than the {TIME_LIMIT} s allowed "
                            "for fetching a LoRA (LASSIE_LORA_DOWNLOAD_TIMEOUT)"), error
    assert "secret" not in error


def test_cancelling_a_prediction_stops_its_download(server, lora_files):
    url = lora_files.serve("/cancelled/lora.safetensors", tiny_lora(33), trickle=1.0)
    status, body = server.post("/predictions", {"id": "fetch-cancelled", "input": {**QUICK, "extra_lora": url}},
                               headers={"Prefer": "respond-async"})
    assert status == 202, body
    deadline = time.monotonic() + 60
    while lora_files.count("/cancelled/lora.safetensors") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.post("/predictions/fetch-cancelled/cancel", {})[0] == 200
    stopped, overdue = f"extra_lora: stopped fetching {url} (CancelationException)", f"{url} took longer"
    deadline = time.monotonic() + 60
    while not any(line in server.log_path.read_text() for line in (stopped, overdue)) and time.monotonic() < deadline:
        time.sleep(0.2)
    log = server.log_path.read_text()
    assert stopped in log and overdue not in log
    succeed(server, seed=6)


def test_img2img_keeps_the_image_at_schnell_steps_and_equals_diffusers_at_28_steps(server, reference):
    first, second = data_uri(noise(1)), data_uri(noise(2))
    for strength, same in ((0.8, False), (1.0, True)):
        outputs = [pixels(succeed(server, image=image, num_inference_steps=4, prompt_strength=strength, seed=5))
                   for image in (first, second)]
        assert np.array_equal(*outputs) == same, f"prompt_strength {strength}"
    body = succeed(server, image=first, prompt="a photo of LSSIE", model="dev", num_inference_steps=28,
                   prompt_strength=0.8, seed=7)
    assert "prompt_strength 0.8 runs 23 of 28 steps, from step 6" in body["logs"]
    expected = reference_images(reference(FluxImg2ImgPipeline, lora_scale=1.0), image=noise(1), strength=0.8,
                                width=256, height=256, num_inference_steps=28)
    assert_equal_but_for_rounding(pixels(body), expected[0])


def test_sizes_from_images_stay_within_256_and_1440(server):
    assert decode(succeed(server, image=data_uri(Image.new("RGB", (1, 1), "red")))["output"][0]).size == (256, 256)
    error = fail(server, image=data_uri(Image.new("RGB", (10000, 100), "red")))
    assert error.startswith("image: is 10000x100, an aspect ratio of 100:1") and "at most 5.625:1 (1440x256)" in error


def test_a_refused_image_is_refused_before_any_extra_lora_download(server, lora_files):
    url = lora_files.serve("/never/lora.safetensors", tiny_lora(34))
    assert fail(server, image=data_uri(Image.new("RGB", (10000, 100))), extra_lora=url).startswith("image: ")
    assert lora_files.count("/never/lora.safetensors") == 0


def test_a_mask_must_have_the_images_aspect_ratio_and_its_resize_is_logged(server):
    photo = data_uri(noise(3, (320, 256)))
    error = fail(server, image=photo, mask=data_uri(Image.new("L", (100, 300), 255)))
    assert error.startswith("mask: is 100x300 but the image is 320x256: a mask must have the image's aspect ratio")
    body = succeed(server, image=photo, mask=data_uri(Image.new("L", (160, 128), 255)))
    assert "mask: resized from 160x128 to 320x256 (the output size)" in body["logs"]


@pytest.mark.parametrize("field", ["image", "mask"])
def test_an_unreadable_upload_is_named_without_its_path_on_the_server(server, field):
    text = "data:text/plain;base64," + base64.b64encode(b"not an image").decode()
    inputs = {"image": text} if field == "image" else {"image": data_uri(noise(4)), "mask": text}
    error = fail(server, **inputs)
    assert error.startswith(f"{field}: could not be read as an image") and f"the uploaded {field}" in error, error
    assert "/tmp" not in error and "tmp" not in error.split("):", 1)[1], error


def test_a_refused_lora_leaves_no_cache_entry(server, lora_files, cache_dir):
    refused = lora_files.serve("/refused/lora.safetensors", save(sd15_kohya_lora()))
    assert fail(server, extra_lora=refused).startswith("extra_lora: ")
    assert sorted(path.name for path in cache_dir.iterdir() if not path.name.startswith(".")) == []
    succeed(server, extra_lora=lora_files.serve("/kept/lora.safetensors", tiny_lora(32)))
    assert len(list(cache_dir.glob("*.safetensors"))) == 1


def test_the_setup_log_carries_no_terminal_control_codes(server):
    """`/health-check` repeats it: library loading bars would be carriage returns and cursor moves."""
    setup_log = server.health()["setup"]["logs"]
    assert "loading models took" in setup_log
    assert not CONTROL_CODES.search(setup_log), [line for line in setup_log.splitlines() if CONTROL_CODES.search(line)]


def readme_retry_recipe() -> dict:
    """The README's client code ("Clients." in Operations), run as a reader copies it."""
    section = (REPO / "README.md").read_text().split("**Clients.**", 1)[1]
    recipe: dict = {}
    exec(re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1), recipe)
    return recipe


def test_the_readme_retry_recipe_serves_more_clients_than_slots(server):
    """Six clients at once against two slots: each gets its images through the README's own code."""
    recipe = readme_retry_recipe()
    bodies: list[dict] = []

    def client(seed: int) -> None:
        bodies.append(recipe["predict"](server.url, {**QUICK, "seed": seed}))

    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(6)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=600)
    assert [body["status"] for body in bodies] == ["succeeded"] * 6


# What coglet answered after `kill -KILL` of its worker (measured, coglet 0.23): one of these per
# slot, then 409s; the health check says UNHEALTHY.
DEAD_WORKER = {"status": "failed", "error": "Failed to send request: Failed to send on slot socket: Broken pipe "
                                            "(os error 32)"}


def test_the_readme_retry_recipe_retries_what_a_dead_worker_never_ran_but_not_a_failed_prediction():
    """Against a stand-in server: a dead worker's answer, a 409, then the replacement's answer."""
    answers = [(200, DEAD_WORKER), (409, {"error": "At capacity - all prediction slots busy", "status": "failed"}),
               (200, {"status": "succeeded", "output": ["data:,"]}),
               (200, {"status": "failed", "error": "Prediction failed: Async prediction failed: InputError: seed: x"})]

    class Replies(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            status, body = answers.pop(0)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    stand_in = ThreadingHTTPServer(("127.0.0.1", 0), Replies)
    threading.Thread(target=stand_in.serve_forever, daemon=True).start()
    try:
        predict_with_retries = readme_retry_recipe()["predict"]
        url = f"http://127.0.0.1:{stand_in.server_port}"
        assert predict_with_retries(url, QUICK, base=0.01)["status"] == "succeeded"
        assert predict_with_retries(url, QUICK, base=0.01)["error"].endswith("InputError: seed: x")  # ran: no retry
    finally:
        stand_in.shutdown()
        stand_in.server_close()
    assert answers == []


# --- a LoRA cache on a disk that fills up, then turns read-only ---------------------------------

def namespace_refusal(probe: Path) -> str | None:
    """Why this kernel refuses a private mount namespace with a tmpfs (None: it allows one)."""
    probe.mkdir()
    try:
        result = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', str(probe)],
                                capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "no unshare command"
    return None if result.returncode == 0 else result.stderr.strip() or f"unshare exited {result.returncode}"


def in_namespace(server: CogServer, script: str) -> None:
    """Runs `script` inside the server's user and mount namespaces (its tmpfs is visible only there)."""
    subprocess.run(["nsenter", "--preserve-credentials", "-U", "-m", "-t", str(server.pid), "sh", "-c", script],
                   capture_output=True, timeout=30)


def test_a_full_then_read_only_lora_cache_says_what_to_do_and_still_serves_cached_loras(tiny_weights, lora_files,
                                                                                        tmp_path):
    refusal = namespace_refusal(tmp_path / "probe")
    if refusal is not None:
        pytest.skip(f"the kernel refuses a private mount namespace with a tmpfs (unshare -rm): {refusal}")
    cache = tmp_path / "cache"
    cache.mkdir()
    server = CogServer(
        tiny_weights, log_path=tmp_path / "server.log",
        env={"LASSIE_ALLOW_PRIVATE_URLS": LORA_HOST, "LASSIE_LORA_CACHE": str(cache),
             "LASSIE_LORA_CACHE_MIN_FREE_BYTES": "0"},
        wrapper=["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$@"', str(cache)])
    assert server.start().get("status") == "READY", server.log_path.read_text()[-3000:]
    try:
        cached = lora_files.serve("/fault/cached.safetensors", tiny_lora(41))
        other = lora_files.serve("/fault/other.safetensors", tiny_lora(42))
        first = pixels(succeed(server, extra_lora=cached))

        in_namespace(server, f'cat /dev/zero > "{cache}/filler"')
        error = fail(server, extra_lora=other)
        assert error.startswith("extra_lora: the LoRA cache has no space left to store"), error
        assert "free space" in error and "LASSIE_LORA_CACHE at a larger one" in error and "Errno" not in error

        in_namespace(server, f'rm "{cache}/filler" && mount -o remount,ro "{cache}"')
        assert np.array_equal(pixels(succeed(server, extra_lora=cached)), first)
        error = fail(server, extra_lora=other)
        assert error.startswith("extra_lora: the LoRA cache cannot be written (Read-only file system)"), error
        assert "LoRAs already cached still serve" in error and "LASSIE_LORA_CACHE at a writable directory" in error
    finally:
        server.stop()
