import shutil

import pytest

from conftest import settings_for
from lassie.predictor import Lassie
from lassie.weights.layout import MissingWeightsError, WeightsLayout


def test_tiny_weights_are_complete(tiny_weights):
    assert WeightsLayout(tiny_weights).missing() == []


def test_setup_names_every_missing_file_and_the_command(tiny_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    half = tmp_path / "weights"
    shutil.copytree(tiny_weights, half)
    shutil.rmtree(half / "flux-schnell" / "transformer")
    (half / "lassie" / "lora.safetensors").unlink()
    (half / "flux-dev" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingWeightsError) as error:
        Lassie(settings_for(half)).setup()
    message = str(error.value)
    for missing in ("flux-schnell/transformer/config.json", "flux-schnell/transformer/diffusion_pytorch_model.safetensors",
                    "lassie/lora.safetensors", "flux-dev/vae/diffusion_pytorch_model.safetensors"):
        assert missing in message
    assert "flux-dev/transformer" not in message
    assert ".venv/bin/python scripts/download_weights.py" in message


def test_sharded_checkpoints_count_as_present_only_with_every_shard(tmp_path):
    directory = tmp_path / "flux-dev" / "transformer"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}')
    (directory / "part-1.safetensors").write_bytes(b"x")
    missing = WeightsLayout(tmp_path).missing()
    assert "flux-dev/transformer/part-2.safetensors" in missing
    assert "flux-dev/transformer/part-1.safetensors" not in missing
