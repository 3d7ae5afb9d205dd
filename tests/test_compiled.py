"""The compiled path under real traffic, on CPU with `aot_eager`.

`aot_eager` runs AOTAutograd, which specialises exactly as inductor does (a Python float read by
the graph becomes a constant guarded by value), so what recompiles here recompiles on a GPU.
Graphs are counted with dynamo's own counter after warm-up. The compiled predictor runs the
go_fast copies as fp8 weight-only (the quantized path CPU can run) and extra LoRAs through the
hot-swap slot of rank 8; its images are compared with an eager predictor of the same settings.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from torch._dynamo.utils import counters

from conftest import settings_for
from fake_services import services  # noqa: F401 (fixture)
from helpers import tiny_lora
from lassie.engine.variants import plan_warm_up, planned_graphs
from lassie.predictor import Lassie
from lassie.request.plan import Request
from lassie.request.sizes import aspect_ratios

REQUESTS = 50
SLOT_RANKS = (8,)
RECOMPILE_WARNING = "needs a graph warm-up did not compile"
COMPILED = {"LASSIE_COMPILE": "1", "LASSIE_COMPILE_BACKEND": "aot_eager"}
FAST_WITH_SLOT = {"LASSIE_GO_FAST_MODE": "fp8-weight-only", "LASSIE_LORA_SLOT_RANK": ",".join(map(str, SLOT_RANKS))}
# aot_eager runs AOTAutograd's decomposed aten graph: float32 sums may round differently from
# eager in the last bit, which can move an 8-bit pixel by one.
PIXEL_TOLERANCE = 1


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def set_up(weights: Path, env: dict[str, str]) -> Lassie:
    lassie = Lassie(settings_for(weights, **env))
    lassie.setup()
    return lassie


@pytest.fixture(scope="module")
def warmed(tiny_weights: Path):
    """The compiled predictor, the graphs its setup compiled and the pipeline calls it made.

    Calls are counted on the pipeline class: a module hook would itself be guarded by the graphs.
    """
    calls, lines = [], Lines()
    pipeline_call = FluxPipeline.__call__
    before = graphs()
    logger, level = logging.getLogger("lassie"), logging.getLogger("lassie").level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FluxPipeline, "__call__", lambda self, **arguments: calls.append(1) or pipeline_call(self, **arguments))
        lassie = set_up(tiny_weights, COMPILED | FAST_WITH_SLOT)
    logger.removeHandler(lines)
    logger.setLevel(level)
    return lassie, graphs() - before, len(calls), lines.messages


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def eager(tiny_weights: Path) -> Lassie:
    return set_up(tiny_weights, {"LASSIE_COMPILE": "0"} | FAST_WITH_SLOT)


def random_request(rng: random.Random, extras: list[str | None]) -> dict:
    fields = {
        "prompt": rng.choice(["a photo of LSSIE", "LSSIE on a beach at dusk", ""]),
        "model": rng.choice(["dev", "schnell"]),
        "go_fast": rng.random() < 0.6,
        # the default (merged: no Lassie adapter runs) or any other scale (the Lassie delta adapter runs)
        "lora_scale": 1.0 if rng.random() < 0.3 else round(rng.uniform(-1, 3), 3),
        "num_outputs": rng.choice([1, 1, 2, 3, 4]),
        "num_inference_steps": rng.choice([1, 2]),
        "seed": rng.randrange(2**32),
        "output_format": "png",
        "disable_safety_checker": True,
    }
    extra = rng.choice(extras)
    if extra:
        fields.update(extra_lora=extra, extra_lora_scale=round(rng.uniform(-1, 3), 3))
    if rng.random() < 0.3:
        fields.update(aspect_ratio="custom", width=rng.randrange(256, 433), height=rng.randrange(256, 433))
    else:
        fields.update(aspect_ratio=rng.choice([ratio for ratio in aspect_ratios() if ratio != "custom"]),
                      megapixels="0.25")
    return fields


def images(lassie: Lassie, fields: dict) -> list[np.ndarray]:
    return [np.asarray(Image.open(path).convert("RGB"), dtype=np.int16) for path in lassie.predict(Request(**fields))]


def assert_same_images(compiled: list[np.ndarray], eager: list[np.ndarray], fields: dict) -> None:
    assert len(compiled) == len(eager) == fields["num_outputs"], fields
    for got, expected in zip(compiled, eager, strict=True):
        assert got.shape == expected.shape, fields
        assert np.abs(got - expected).max() <= PIXEL_TOLERANCE, fields


def test_warm_up_compiles_exactly_the_planned_graphs_one_set_per_precision(warmed):
    lassie, compiled, calls, messages = warmed
    runs = plan_warm_up(go_fast_copies=True, slot_ranks=SLOT_RANKS)
    assert runs == lassie.variants.warm_up_plan()
    assert calls == len(runs) == 2  # bf16 and fp8, each with Lassie and the slot active, any batch
    assert compiled == planned_graphs(runs) == 4  # each run compiles the double- and the single-block graph
    said = [line for line in messages if line.startswith("warm-up compiled")]
    assert len(said) == 1 and said[0].startswith(f"warm-up compiled {compiled} graphs (backend aot_eager, mode default) "
                                                  f"with 2 calls in ")
    assert said[0].endswith("; 4 planned")


def test_random_traffic_after_warm_up_compiles_nothing_and_equals_eager(warmed, eager, services, caplog):
    lassie = warmed[0]
    extras = [None, services.serve("/compiled/a.safetensors", tiny_lora(51)),
              services.serve("/compiled/b.safetensors", tiny_lora(52, rank=8))]  # both into the rank-8 slot
    rng = random.Random(8)
    before = graphs()
    with caplog.at_level(logging.WARNING, logger="lassie"):
        for _ in range(REQUESTS):
            fields = random_request(rng, extras)
            assert_same_images(images(lassie, fields), images(eager, fields), fields)
    assert graphs() == before
    assert RECOMPILE_WARNING not in caplog.text


@pytest.mark.parametrize("switches, planned", [
    ({"LASSIE_LORA_SLOT_RANK": "4,8"}, 4),  # narrow slots: a set per slot
    ({"LASSIE_LORA_SLOT_RANK": "4,8", "LASSIE_ADAPTERS_WHEN_NEEDED": "1", "LASSIE_MERGE_LASSIE": "1"}, 12),
])
def test_each_switch_warms_up_exactly_its_planned_graphs_and_traffic_compiles_nothing(tiny_weights, services,
                                                                                      switches, planned, caplog):
    """bf16 only (no go_fast copies on CPU by default), so each set is one call and two graphs;
    then requests with no extra, a rank-4 and a rank-8 LoRA, batches 1 to 4, compile nothing.
    Graphs dynamo cached for an earlier predictor of the same structure would be reused (the
    blocks' code is shared): each case starts from an empty cache."""
    torch._dynamo.reset()
    before = graphs()
    lassie = set_up(tiny_weights, COMPILED | switches)
    assert graphs() - before == planned_graphs(lassie.variants.warm_up_plan()) == planned
    extras = [None, services.serve("/compiled/c.safetensors", tiny_lora(54)),
              services.serve("/compiled/d.safetensors", tiny_lora(55, rank=8))]
    rng = random.Random(11)
    before = graphs()
    with caplog.at_level(logging.WARNING, logger="lassie"):
        for _ in range(8):
            images(lassie, random_request(rng, extras) | {"num_inference_steps": 1})
    assert graphs() == before
    assert RECOMPILE_WARNING not in caplog.text


def test_an_unforeseen_recompile_is_served_eagerly_with_one_warning(tiny_weights, predictor, services, caplog):
    """Without the slot a new extra LoRA is a new adapter name, which the graphs guard on."""
    lassie = set_up(tiny_weights, COMPILED | {"LASSIE_LORA_SLOT_RANK": "0"})
    url = services.serve("/compiled/named.safetensors", tiny_lora(53))
    fields = {"prompt": "a photo of LSSIE", "num_inference_steps": 1, "megapixels": "0.25", "seed": 9,
              "output_format": "png", "extra_lora": url, "go_fast": False}
    before = graphs()
    with caplog.at_level(logging.WARNING, logger="lassie"):
        served = images(lassie, fields)
    warnings = [record.getMessage() for record in caplog.records if RECOMPILE_WARNING in record.getMessage()]
    assert len(warnings) == 1 and "lora_A" in warnings[0]  # the guards on the adapters a layer holds
    assert graphs() == before
    assert_same_images(served, images(predictor, fields), {**fields, "num_outputs": 1})


def failing_backend(graph_module: torch.fx.GraphModule, example_inputs: list):
    raise RuntimeError("this backend cannot compile anything")


def test_a_compile_that_fails_at_setup_leaves_a_working_eager_server(tiny_weights, predictor, caplog):
    torch._dynamo.register_backend(failing_backend, name="lassie_test_failing")
    with caplog.at_level(logging.WARNING, logger="lassie"):
        lassie = set_up(tiny_weights, {"LASSIE_COMPILE": "1", "LASSIE_COMPILE_BACKEND": "lassie_test_failing"})
    failures = [record.getMessage() for record in caplog.records if "compiling failed during warm-up" in record.getMessage()]
    assert len(failures) == 1 and "this backend cannot compile anything" in failures[0]
    fields = {"prompt": "a photo of LSSIE", "num_inference_steps": 1, "megapixels": "0.25", "seed": 2,
              "output_format": "png", "num_outputs": 2, "lora_scale": 0.3}
    assert_same_images(images(lassie, fields), images(predictor, fields), fields)


def test_go_fast_copies_that_cannot_be_built_leave_go_fast_on_bf16(tiny_weights, predictor, monkeypatch, caplog):
    def broken(transformer, mode, own_weight=None):
        raise RuntimeError("no fp8 kernels here")

    monkeypatch.setattr("lassie.engine.variants.quantize_transformer", broken)
    with caplog.at_level(logging.INFO, logger="lassie"):
        lassie = set_up(tiny_weights, {"LASSIE_GO_FAST_MODE": "fp8-weight-only"})
        fields = {"prompt": "x", "num_inference_steps": 1, "megapixels": "0.25", "seed": 4, "output_format": "png",
                  "go_fast": True}
        served = images(lassie, fields)
    assert "building the fp8-weight-only transformers failed (RuntimeError: no fp8 kernels here)" in caplog.text
    assert "precision: float32" in caplog.text
    assert_same_images(served, images(predictor, fields), {**fields, "num_outputs": 1})
