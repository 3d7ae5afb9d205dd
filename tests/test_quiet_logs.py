"""A warning in the log means something: the known-harmless ones are gone, every other one still shows.

Through the real Cog server on the tiny weights, with go_fast on torchao weights (so PEFT's
torchao layers are built at setup, as on an fp8 GPU), and in a fresh interpreter for the
import-time messages next to unrelated ones from the same loggers and categories.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cog_server import CogServer
from conftest import LORA_HOST, REPO
from fake_services import FakeServices
from helpers import tiny_lora

# A piece of each line that used to reach the log at startup or on the first request.
KNOWN_NOISE = (
    "torchao/_C_mxfp8.cpython-310",  # torchao's MX kernels built for another Python
    "torchao/_C_cutlass_90a.abi3.so",  # torchao's sm90a kernels, without CUDA
    "Detected no triton",
    "Calling register_constant() on Enum subclasses is deprecated",  # torch pytree, for torchao's enums
    "Unable to import `torchao` Tensor objects",  # diffusers' torchao quantizer
    "requires torchvision (not installed)",  # transformers' PIL fallback for CLIP / SigLIP processors
    "`torch_dtype` is deprecated",  # diffusers; lassie now passes dtype=
    "Predictor.predict() is deprecated",  # cog's Python warning (coglet's own notice stays)
    "BasePredictor is deprecated",
    "TorchaoLoraLinear was instantiated without",  # PEFT on fp8 weights; adapters are never merged
    "Already found a `peft_config` attribute in the model",  # PEFT, on every extra LoRA's adapter
    "was active which is now deleted. Setting active adapter to",  # PEFT, when an extra LoRA is replaced
)


def noise_in(text: str) -> list[str]:
    return [noise for noise in KNOWN_NOISE if noise in text]


@pytest.fixture(scope="module")
def fp8_server(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    server = CogServer(
        tiny_weights, env={"LASSIE_GO_FAST_MODE": "fp8-weight-only"},
        log_path=tmp_path_factory.mktemp("quiet-logs") / "server.log")
    health = server.start()
    assert health.get("status") == "READY", f"setup failed: {health}"
    yield server, health
    server.stop()


def test_startup_and_first_request_log_no_known_noise(fp8_server) -> None:
    server, health = fp8_server
    status, response = server.predict({"prompt": "a photo of LSSIE", "go_fast": True, "num_inference_steps": 2,
                                       "megapixels": "0.25", "output_format": "png"})
    assert (status, response.get("status")) == (200, "succeeded"), response
    setup_log = health["setup"]["logs"]
    # The logs were captured. Not the last setup line: coglet 0.23 reports setup done on its control
    # channel while the worker's last log lines may still be in flight, and those then reach the
    # server's log instead of the setup log (about one start in four, with or without threads).
    assert "go_fast plan:" in setup_log and "precision:" in response["logs"]
    assert noise_in(setup_log) == []
    assert noise_in(response["logs"]) == []
    assert noise_in(server.log_path.read_text()) == []  # everything the server and its worker printed



def test_switching_extra_loras_logs_no_known_noise(cog_server) -> None:
    """Each request with a new extra LoRA adds its adapter and deletes the previous one (outside
    slot mode), across dev and schnell: PEFT's generic notes about that are not for users."""
    with FakeServices(host=LORA_HOST) as files:
        for name, seed in (("a", 61), ("b", 62)):
            files.serve(f"/{name}.safetensors", tiny_lora(seed))
        logs = []
        for model, name in (("schnell", "a"), ("dev", "b"), ("schnell", "a")):
            status, response = cog_server.predict({
                "prompt": "a photo of LSSIE", "model": model, "num_inference_steps": 1, "megapixels": "0.25",
                "output_format": "png", "extra_lora": f"{files.base}/{name}.safetensors"})
            assert (status, response.get("status")) == (200, "succeeded"), response
            logs.append(response["logs"])
    assert all("LoRA scales: lassie=1" in log for log in logs)  # the logs were captured
    assert noise_in("\n".join(logs)) == []
    assert noise_in(cog_server.log_path.read_text()) == []

UNRELATED = {
    "another torchao library failing": "Failed to load /opt/torchao/_C_other.so: Could not load this library",
    "another enum's pytree deprecation": "<enum 'OurEnum'> is an Enum subclass and is now natively supported",
    "an unrelated DeprecationWarning": "DeprecationWarning: an unrelated deprecation",
    "PEFT's text from another module": "UserWarning: TorchaoLoraLinear was instantiated without",
}

SCRIPT = """
import logging, warnings
from lassie.quiet import silence_known_noise
silence_known_noise()
logging.basicConfig(format="%(name)s: %(message)s")  # before torchao: its intmm logger prints then
import lassie.predictor  # what predict.py imports: torch, torchao, diffusers, transformers, peft

logging.getLogger("torchao").warning("Failed to load /opt/torchao/_C_other.so: Could not load this library: x")
logging.getLogger("torch.utils._pytree").warning(
    "<enum 'OurEnum'> is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
    "Calling register_constant() on Enum subclasses is deprecated and will be an error in a future release.")
warnings.warn("an unrelated deprecation", DeprecationWarning)
warnings.warn("TorchaoLoraLinear was instantiated without `get_apply_tensor_subclass`. Forward and training "
              "will work, but `merge()` / `unmerge()` will raise an error.", UserWarning)
"""


def test_only_the_known_messages_are_silenced() -> None:
    """`-W default` shows every warning once, wherever it comes from: only the filters can hide one."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-W", "default", "-c", SCRIPT], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    shown = {name: any(text in line for line in lines) for name, text in UNRELATED.items()}
    assert shown == dict.fromkeys(UNRELATED, True)
    the_rest = [line for line in lines if not any(text in line for text in UNRELATED.values())]
    assert noise_in("\n".join(the_rest)) == []
