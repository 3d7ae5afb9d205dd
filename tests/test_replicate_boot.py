"""Booting as on Replicate, through the real Cog server on tiny weights, with no Hugging Face token.

Each scenario is one server, compared with the session's `cog_server` (the tiny weights with their
own Lassie LoRA): the same request must give the same pixels. Weights and LoRAs come from a
loopback host (`scripts/range_server.py`).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cog_server import CogServer
from helpers import decode, folder_tar, tiny_lora, training_output_tar
from lassie.weights.layout import LAYOUT_FOLDERS, WeightsLayout
from range_server import RangeServer

REQUEST = {"prompt": "a photo of LSSIE", "num_inference_steps": 1, "seed": 11, "megapixels": "0.25",
           "output_format": "png"}
NO_HUB = {"HF_TOKEN": "", "HF_ENDPOINT": "http://127.0.0.1:9"}  # any hub request would fail
READ_ONLY_MOUNT = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'


@pytest.fixture(scope="module")
def host(tiny_weights: Path) -> Iterator[RangeServer]:
    """The weights as Replicate's host has them (dev under one top-level folder), a training output, an extra LoRA."""
    with RangeServer() as server:
        for folder in LAYOUT_FOLDERS:
            server.serve(f"/weights/{folder}.tar", folder_tar(tiny_weights / folder,
                                                              "FLUX.1-dev" if folder == "flux-dev" else None))
        server.serve("/trained_model.tar", training_output_tar(WeightsLayout(tiny_weights).lassie_lora.read_bytes()))
        server.serve("/extra.safetensors", tiny_lora(seed=3))
        yield server


def pixels(server: CogServer, **inputs: object) -> np.ndarray:
    status, body = server.predict({**REQUEST, **inputs})
    assert status == 200 and body["status"] == "succeeded", body.get("error") or body
    (uri,) = body["output"]
    return np.asarray(decode(uri).convert("RGB"))


@pytest.fixture(scope="module")
def expected(cog_server: CogServer) -> np.ndarray:
    return pixels(cog_server)


def started(server: CogServer) -> CogServer:
    health = server.start()
    if health.get("status") != "READY":
        server.stop()
        pytest.fail(f"setup failed: {server.log_path.read_text()[-4000:]}")
    return server


def test_an_empty_weights_directory_boots_from_the_weights_url(host: RangeServer, expected: np.ndarray,
                                                               tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    server = started(CogServer(weights, env={**NO_HUB, "HF_HOME": str(tmp_path / "hf-home"),
                                             "LASSIE_WEIGHTS_URL": host.url("/weights")}))
    try:
        assert np.array_equal(pixels(server), expected)
    finally:
        server.stop()
    assert WeightsLayout(weights).missing() == []
    assert all(host.count(f"/weights/{folder}.tar") == 1 for folder in LAYOUT_FOLDERS)
    assert "through 16 parallel ranges" in server.log_path.read_text()


def namespace_refusal() -> str | None:
    """Why this kernel gives no private mount namespace to an unprivileged user, or None."""
    try:
        done = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "unshare (util-linux) is not installed"
    return None if done.returncode == 0 else f"unshare -rm refused: {done.stderr.strip()}"


def test_a_read_only_weights_directory_serves_cog_weights_and_an_extra_lora(
        host: RangeServer, expected: np.ndarray, tiny_weights: Path, tmp_path: Path) -> None:
    """A complete directory mounted read-only whose weights/lassie/ holds another LoRA: COG_WEIGHTS
    wins, and it and the extra-LoRA cache go to a writable place instead."""
    refusal = namespace_refusal()
    if refusal:
        pytest.skip(f"needs a private mount namespace for the read-only mount: {refusal}")
    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    WeightsLayout(weights).lassie_lora.write_bytes(tiny_lora(seed=99))  # a decoy: COG_WEIGHTS must win
    (tmp_path / "tmp").mkdir()
    server = started(CogServer(weights, wrapper=["unshare", "-rm", "sh", "-c", READ_ONLY_MOUNT, str(weights)], env={
        **NO_HUB, "COG_WEIGHTS": host.url("/trained_model.tar"), "LASSIE_LORA_CACHE": "",
        "LASSIE_ALLOW_PRIVATE_URLS": "127.0.0.1", "TMPDIR": str(tmp_path / "tmp")}))
    try:
        assert np.array_equal(pixels(server), expected)
        with_extra = pixels(server, extra_lora=host.url("/extra.safetensors"))
    finally:
        server.stop()
    assert not np.array_equal(with_extra, expected)
    log = server.log_path.read_text()
    (cache,) = (tmp_path / "tmp").glob("lassie-*/lora-cache")  # per user: lassie-<user name>
    fallback = cache.parent
    assert (f"extra-LoRA cache: {weights / 'lora-cache'} cannot be written (Read-only file system); "
            f"using {fallback / 'lora-cache'}; whatever else setup keeps in {weights} falls back to {fallback} too"
            ) in log
    assert (fallback / "fetched-lora").is_dir()  # said by the one line above, not by a second
    assert "cannot be written" not in log.replace(f"extra-LoRA cache: {weights / 'lora-cache'} cannot be written", "")
    assert "trigger word: 'LSSIE'" in log
    assert sorted(path.name for path in weights.iterdir()) == sorted(path.name for path in tiny_weights.iterdir())
    assert len(list((fallback / "lora-cache").glob("*.safetensors"))) == 1
    assert host.count("/trained_model.tar") == 1
