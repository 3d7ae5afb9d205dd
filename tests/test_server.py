"""End to end through the real Cog HTTP server (coglet), as Replicate and `cog` clients call it."""

from __future__ import annotations

import base64
import re

import pytest
from PIL import Image

from conftest import LORA_HOST
from helpers import data_uri, decode, tiny_lora

FAST = {"num_inference_steps": 1, "seed": 11}


def succeed(server, **inputs) -> list[Image.Image]:
    status, body = server.predict({"prompt": "a photo of LSSIE", **FAST, **inputs})
    assert status == 200 and body["status"] == "succeeded", body.get("error") or body
    return [decode(uri) for uri in body["output"]]


def fail(server, **inputs) -> str:
    status, body = server.predict({"prompt": "x", **FAST, **inputs})
    assert status == 200 and body["status"] == "failed", body
    return body["error"]


@pytest.mark.parametrize(("ratio", "megapixels", "size"), [  # the spec's sizes.json
    ("1:1", "1", (1024, 1024)), ("16:9", "1", (1344, 768)), ("9:21", "1", (640, 1536)), ("4:5", "1", (896, 1088)),
    ("1:1", "0.25", (512, 512)), ("16:9", "0.25", (672, 384)), ("9:21", "0.25", (320, 768)),
    ("4:5", "0.25", (448, 544)),
])
def test_txt2img_sizes_follow_the_table(cog_server, ratio, megapixels, size):
    (image,) = succeed(cog_server, aspect_ratio=ratio, megapixels=megapixels)
    assert image.size == size


def test_custom_sizes_round_to_16(cog_server):
    (image,) = succeed(cog_server, aspect_ratio="custom", width=500, height=260)
    assert image.size == (496, 256)


def test_img2img_and_inpainting_take_the_input_image_size(cog_server):
    photo = data_uri(Image.effect_noise((1600, 900), 40).convert("RGB"), "JPEG")
    mask = data_uri(Image.new("L", (160, 90), 255))
    assert succeed(cog_server, image=photo)[0].size == (1440, 816)
    assert succeed(cog_server, image=photo, mask=mask)[0].size == (1440, 816)


@pytest.mark.parametrize(("output_format", "pil_format"), [("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")])
def test_each_output_format(cog_server, output_format, pil_format):
    (image,) = succeed(cog_server, output_format=output_format, megapixels="0.25")
    assert image.format == pil_format


def test_four_outputs_are_four_distinct_images(cog_server):
    images = succeed(cog_server, num_outputs=4, megapixels="0.25", output_format="png")
    assert len({image.tobytes() for image in images}) == 4


def test_logs_tell_the_seed_size_and_timings(cog_server):
    _, body = cog_server.predict({"prompt": "a dog", "num_inference_steps": 1, "megapixels": "0.25"})
    assert body["status"] == "succeeded"
    assert "size 512x512" in body["logs"] and "generating took" in body["logs"]
    assert re.search(r"seed \d+", body["logs"])


def test_same_seed_gives_identical_bytes(cog_server):
    first = cog_server.predict({"prompt": "a dog", **FAST, "megapixels": "0.25"})[1]["output"]
    second = cog_server.predict({"prompt": "a dog", **FAST, "megapixels": "0.25"})[1]["output"]
    assert first == second


@pytest.mark.parametrize(("field", "value"), [
    ("num_outputs", 9), ("output_format", "gif"), ("num_inference_steps", 0), ("guidance_scale", 11),
    ("lora_scale", 4), ("aspect_ratio", "2:1"), ("width", 100), ("megapixels", "4"), ("model", "pro"),
])
def test_out_of_range_values_get_422(cog_server, field, value):
    status, body = cog_server.predict({"prompt": "x", field: value})
    assert status == 422
    assert any(field in str(detail.get("loc", "")) for detail in body["detail"]), body


def test_missing_prompt_gets_422(cog_server):
    assert cog_server.predict({"seed": 1})[0] == 422


def test_failures_are_readable_and_the_next_request_works(cog_server):
    assert "mask: inpainting needs an `image`" in fail(cog_server, mask=data_uri(Image.new("L", (64, 64))))
    succeed(cog_server, megapixels="0.25")
    text = "data:image/png;base64," + base64.b64encode(b"this is not an image").decode()
    assert "image: could not be read as an image" in fail(cog_server, image=text)
    succeed(cog_server, megapixels="0.25")
    assert "width: is required when aspect_ratio is custom" in fail(cog_server, aspect_ratio="custom", height=512)
    succeed(cog_server, megapixels="0.25")


@pytest.fixture(scope="module")
def lora_host():
    """A file server on 127.0.0.2 (the one address the test server may fetch LoRAs from)."""
    from fake_services import FakeServices

    with FakeServices(host=LORA_HOST) as files:
        files.serve("/lora.safetensors", tiny_lora(51))
        files.redirect("/to-loopback.safetensors", "http://127.0.0.1:9/lora.safetensors")
        yield files


@pytest.mark.parametrize("model", ["dev", "schnell"])
def test_go_fast_serves_every_mode_with_and_without_extra_lora(cog_server, lora_host, model):
    photo = data_uri(Image.effect_noise((320, 240), 40).convert("RGB"))
    mask = data_uri(Image.new("L", (320, 240), 255))
    extra = f"{lora_host.base}/lora.safetensors"
    for inputs in ({}, {"image": photo}, {"image": photo, "mask": mask}):
        # 2 steps: with an image, 1 step at prompt_strength 0.8 runs none (it starts one step in)
        steps = {"num_inference_steps": 2} if inputs else {}
        plain = succeed(cog_server, go_fast=True, model=model, megapixels="0.25", output_format="png", **steps,
                        **inputs)
        with_lora = succeed(cog_server, go_fast=True, model=model, megapixels="0.25", output_format="png",
                            extra_lora=extra, **steps, **inputs)
        assert plain[0].tobytes() != with_lora[0].tobytes()
    _, body = cog_server.predict({"prompt": "x", **FAST, "go_fast": True, "model": model})
    assert "precision: float32" in body["logs"]


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:9/x.safetensors", "http://localhost:9/x.safetensors", "http://[::1]:9/x.safetensors",
    "http://2130706433/x.safetensors", "file:///etc/hostname", "redirect",
])
def test_loopback_and_file_targets_are_refused_through_the_server(cog_server, lora_host, target):
    url = f"{lora_host.base}/to-loopback.safetensors" if target == "redirect" else target
    error = fail(cog_server, extra_lora=url)
    assert error.startswith("Prediction failed") and "extra_lora: " in error
    succeed(cog_server, megapixels="0.25")
