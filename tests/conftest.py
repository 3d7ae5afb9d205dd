"""Shared fixtures: tiny weights are built once per test session, in the real layout."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cog_server import CogServer
from lassie.settings import Settings

REPO = Path(__file__).resolve().parent.parent
LORA_HOST = "127.0.0.2"

# Before huggingface_hub is imported: no telemetry or agent-registry lookups from the test session
# (they would go to the import-time endpoint, huggingface.co, which tests never contact).
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# Before torch starts OpenMP: idle threads sleep instead of spinning, so the test process and the
# Cog servers it starts do not steal each other's two cores (same numbers, only waiting changes).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def settings_for(weights: Path, **env: str) -> Settings:
    """The settings a server started now would read, serving `weights`, with `env` set on top."""
    return Settings.from_env({**os.environ, "LASSIE_WEIGHTS_DIR": str(weights), **env})


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A complete weights directory with tiny random models, built by the real builder script.

    Shared by the whole session, so it stays exactly as built: extra LoRAs that predictors fetch
    are cached outside it rather than in its default `lora-cache/`. Predictors read their settings
    at setup, so every one set up in this session may fetch from the tests' LoRA services on
    127.0.0.1 (`fake_services`), and from no other private address.
    """
    import make_tiny_weights  # here, not above: tests that need no weights never import torch

    out = tmp_path_factory.mktemp("tiny-weights")
    make_tiny_weights.build(out)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LASSIE_LORA_CACHE", str(tmp_path_factory.mktemp("lora-cache")))
        patch.setenv("LASSIE_ALLOW_PRIVATE_URLS", "127.0.0.1")
        yield out


@pytest.fixture(scope="session")
def predictor(tiny_weights: Path):
    """One predictor for the session, set up on the tiny weights like a fresh server."""
    from lassie.predictor import Lassie

    lassie = Lassie(settings_for(tiny_weights))
    lassie.setup()
    return lassie


@pytest.fixture(scope="session")
def cog_server(tiny_weights: Path):
    """The real Cog HTTP server on 127.0.0.1, serving the tiny weights; stopped after the session.

    Extra LoRAs may come from 127.0.0.2 alone (the tests' file server); every other private or
    loopback address stays refused, as in production.
    """
    server = CogServer(tiny_weights, env={"LASSIE_ALLOW_PRIVATE_URLS": LORA_HOST})
    health = server.start()
    assert health.get("status") == "READY", f"setup failed: {health}"
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(tiny_weights: Path):
    """Bare diffusers pipelines loaded on their own, with the LoRA loaded by diffusers itself."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    def build(cls, model="dev", lora_scale=None):
        extra = {}
        if model == "schnell":
            extra = dict(
                transformer=FluxTransformer2DModel.from_pretrained(tiny_weights / "flux-schnell" / "transformer"),
                scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_weights / "flux-schnell" / "scheduler"),
            )
        pipe = cls.from_pretrained(tiny_weights / "flux-dev", **extra)
        if lora_scale is not None:
            pipe.load_lora_weights(str(tiny_weights / "lassie" / "lora.safetensors"), adapter_name="lassie")
            pipe.set_adapters("lassie", lora_scale)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return build
