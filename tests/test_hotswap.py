"""Extra LoRAs hot-swapped into a fixed adapter slot: the same images as named adapters, no bleed
across switches, and failures that leave the model bit for bit as it was (compiling:
test_compiled.py).

The slot predictors run with LASSIE_LORA_SLOT_RANK=8 (the tiny LoRAs have ranks 2 to 8, all
padded into the rank-8 slot; rank 16 is refused). Float
images from the dev pipeline (256x256, 2 steps) compare the slot with the session's predictor,
which loads each extra LoRA as its own adapter: padding ranks with zeros and baking alpha/r into
lora_B may change float32 rounding, hence ATOL, far below what any LoRA changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import peft.utils.hotswap
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from safetensors.torch import save, save_file

import lora_formats as forms
import make_tiny_weights
from conftest import settings_for
from fake_services import services  # noqa: F401 (fixture)
from helpers import assert_equal_but_for_rounding, dev_float_image, reference_images, run
from lassie.engine import adapters
from lassie.engine.adapters import SLOT_ADAPTER, slot_rank_for
from lassie.engine.variants import KEPT_EXTRA_LORAS, LASSIE_ADAPTER, Variant
from lassie.predictor import Lassie
from lassie.request.errors import InputError
from lassie.request.plan import Request
from lassie.settings import DEFAULT_SLOT_RANK, SLOT_RANK_ENV, Settings

DEV = Variant("dev", False)

SLOT_RANK = 8
ATOL = 1e-5
SCALE = 0.75
BASE = {"prompt": "a photo of LSSIE", "num_inference_steps": 1, "megapixels": "0.25", "seed": 5,
        "output_format": "png"}


def new_slot_predictor(weights: Path) -> Lassie:
    """Slot mode on CPU, with fp8 weight-only go_fast copies so that they get slots too."""
    lassie = Lassie(settings_for(weights, **{SLOT_RANK_ENV: str(SLOT_RANK),
                                             "LASSIE_GO_FAST_MODE": "fp8-weight-only"}))
    lassie.setup()
    return lassie


@pytest.fixture(scope="module")
def slot_predictor(tiny_weights: Path) -> Lassie:
    return new_slot_predictor(tiny_weights)


def mixed_rank_lora(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Ranks 2 and 6 without alphas: diffusers gives such LoRAs a rank and alpha pattern."""
    return {**forms.random_lora(transformer, list(forms.PEFT_MODULES[:4]), seed=11, rank=2),
            **forms.random_lora(transformer, list(forms.PEFT_MODULES[4:]), seed=12, rank=6)}


def network_alpha_lora(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT keys with `.alpha` tensors (diffusers' network alphas), alpha/r from 1/4 to 3/4."""
    lora = forms.random_lora(transformer, list(forms.PEFT_MODULES), seed=13)
    alphas = {f"{forms.PEFT_PREFIX}{module}.alpha": torch.tensor(1.0 + index % 3)
              for index, module in enumerate(forms.PEFT_MODULES)}
    return {**lora, **alphas}


LORAS: dict[str, Callable[[torch.nn.Module], dict[str, torch.Tensor]]] = {
    "peft": lambda t: forms.random_lora(t, list(forms.PEFT_MODULES), seed=10),
    "kohya_with_alpha": lambda t: forms.to_kohya(forms.random_lora(t, forms.modules_of(forms.KOHYA_MODULES), seed=1),
                                                 alpha_ratio=0.25),
    "mixed_rank": mixed_rank_lora,
    "network_alphas": network_alpha_lora,
}

# Saved by diffusers with its adapter config: rsLoRA, alpha 1 at rank 4, so every module runs at 1/2.
RSLORA_METADATA = {"transformer.r": forms.RANK, "transformer.lora_alpha": 1, "transformer.use_rslora": True,
                   "transformer.target_modules": list(forms.PEFT_MODULES)}


def write_lora(directory: Path, name: str, state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    path = directory / f"{name}.safetensors"
    header = {"format": "pt"} | ({"lora_adapter_metadata": json.dumps(metadata)} if metadata else {})
    save_file(state_dict, path, metadata=header)
    return path


def render(lassie: Lassie, extra: str | None = None, scale: float = SCALE) -> np.ndarray:
    """The float image of dev with the Lassie LoRA at 0.5 and `extra` at `scale`."""
    lassie.variants.adapters.activate(DEV, {LASSIE_ADAPTER: 0.5, **({extra: scale} if extra else {})})
    return dev_float_image(lassie)


@pytest.fixture
def add_to_both(predictor: Lassie, slot_predictor: Lassie, tmp_path: Path):
    """Adds a LoRA file to the session's predictor and the slot predictor; removed again after."""
    names = []

    def add(name: str, path: Path) -> None:
        names.append(name)
        predictor.variants.adapters.add(name, path)
        slot_predictor.variants.adapters.add(name, path)

    yield add
    for lassie in (predictor, slot_predictor):
        for name in names:
            lassie.variants.adapters.remove(name)
        lassie.variants.adapters.activate(DEV, {LASSIE_ADAPTER: 1.0})


def transformer_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in transformer.state_dict().items()}


def assert_bitwise_equal(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
    assert list(after) == list(before)
    assert all(after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]) for key in before)


def slot_rank(value: str | None, compiled: bool) -> int:
    """The slot's rank a server started with LASSIE_LORA_SLOT_RANK=`value` (None: unset) gets; 0: none."""
    environ = {} if value is None else {SLOT_RANK_ENV: value}
    return slot_rank_for(Settings.from_env(environ).slot_rank, compiled=compiled, default=DEFAULT_SLOT_RANK)


def test_slot_rank_setting():
    assert slot_rank(None, compiled=True) == 128  # one slot: one graph set
    assert slot_rank(None, compiled=False) == 0
    assert slot_rank(" ", compiled=False) == 0
    assert slot_rank("0", compiled=True) == 0
    assert slot_rank("32", compiled=False) == 32
    assert slot_rank(" 16 ", compiled=True) == 16
    for bad in ("-4", "0,32", "32,128", "32,", "r32"):
        with pytest.raises(ValueError, match=SLOT_RANK_ENV):
            slot_rank(bad, compiled=True)


def rslora_file(directory: Path, transformer: torch.nn.Module) -> Path:
    lora = forms.random_lora(transformer, list(forms.PEFT_MODULES), seed=14)
    return write_lora(directory, "rslora_metadata", lora, RSLORA_METADATA)


@pytest.mark.parametrize("form", [*LORAS, "rslora_metadata"])
def test_a_lora_through_the_slot_equals_the_same_lora_as_its_own_adapter(predictor, slot_predictor, add_to_both,
                                                                         tmp_path, form):
    transformer = predictor.models.transformers["dev"]
    add_to_both(form, rslora_file(tmp_path, transformer) if form == "rslora_metadata"
                else write_lora(tmp_path, form, LORAS[form](transformer)))
    expected, actual = render(predictor, form), render(slot_predictor, form)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ATOL)
    assert np.abs(actual - render(slot_predictor)).max() > 1000 * ATOL
    assert slot_predictor.variants.adapters.slot_holds(DEV) == form
    assert set(slot_predictor.models.transformers["dev"].peft_config) == {LASSIE_ADAPTER, SLOT_ADAPTER}


def test_alphas_really_change_the_strength(predictor, slot_predictor, add_to_both, tmp_path):
    """Guards the comparisons above: alphas that both paths ignored would match as well."""
    transformer = predictor.models.transformers["dev"]
    with_alphas = network_alpha_lora(transformer)
    add_to_both("with_alphas", write_lora(tmp_path, "with_alphas", with_alphas))
    add_to_both("without", write_lora(tmp_path, "without", {k: v for k, v in with_alphas.items() if "alpha" not in k}))
    assert np.abs(render(slot_predictor, "with_alphas") - render(slot_predictor, "without")).max() > 1000 * ATOL
    add_to_both("rslora", rslora_file(tmp_path, transformer))
    add_to_both("plain", write_lora(tmp_path, "plain", forms.random_lora(transformer, list(forms.PEFT_MODULES), seed=14)))
    np.testing.assert_allclose(render(slot_predictor, "rslora"), render(slot_predictor, "plain", SCALE / 2),
                               rtol=0, atol=ATOL)


def image_of(lassie: Lassie, **fields) -> bytes:
    (path,) = lassie.predict(Request(**{**BASE, **fields}))
    return np.asarray(Image.open(path).convert("RGB")).tobytes()


def test_switching_gives_each_request_the_image_of_a_fresh_server(slot_predictor, tiny_weights, services):
    loras = {name: services.serve(f"/swap/{name}.safetensors", save(build(slot_predictor.models.transformers["dev"])))
             for name, build in (("a", LORAS["peft"]), ("b", mixed_rank_lora))}
    requests = [{"extra_lora": loras["a"]}, {"extra_lora": loras["b"], "extra_lora_scale": 0.6}, {},
                {"extra_lora": loras["a"]}, {"extra_lora": loras["b"], "go_fast": True, "model": "schnell"}]
    results = [image_of(slot_predictor, **fields) for fields in requests]
    fresh = {}
    for fields, result in zip(requests, results, strict=True):
        key = tuple(sorted(fields.items()))
        fresh.setdefault(key, image_of(new_slot_predictor(tiny_weights), **fields))
        assert result == fresh[key], fields
    assert len(set(results)) == 4
    for transformer in (*slot_predictor.models.transformers.values(), slot_predictor.variants.transformer(Variant("dev", True))):
        assert set(transformer.peft_config) == {LASSIE_ADAPTER, SLOT_ADAPTER}


class FailFirstSwap:
    """Stands in for PEFT's swap: the first call writes into a slot tensor and fails, leaving the slot
    half-written (diffusers then deletes the slot adapter); later calls (the restore) swap for real."""

    def __init__(self, swap: Callable) -> None:
        self.swap = swap
        self.failed = False

    def __call__(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor], **kwargs) -> None:
        if self.failed:
            return self.swap(model=model, state_dict=state_dict, **kwargs)
        self.failed = True
        model.get_parameter(next(key for key in state_dict if ".lora_B." in key)).data.fill_(7.0)
        raise RuntimeError("swap failed half-way")


# case -> (the failing LoRA, what the error says)
FAILING = {
    "rank_above_slot": (lambda t: forms.random_lora(t, list(forms.PEFT_MODULES), seed=15, rank=16),
                        "rank 16 is above the hot-swap slot's rank of 8; LoRAs up to rank 8"),
    "wrong_shape": (lambda t: forms.with_input_size(forms.random_lora(t, list(forms.PEFT_MODULES), seed=15),
                                                    "transformer_blocks.0.attn.to_q", 48), "does not fit FLUX"),
    "fails_mid_swap": (mixed_rank_lora, "could not be swapped"),  # into the slot "held" is in
}


@pytest.mark.parametrize("case", FAILING)
def test_a_failed_swap_leaves_the_transformer_bit_for_bit_as_it_was(slot_predictor, tmp_path, monkeypatch, case):
    adapters, transformer = slot_predictor.variants.adapters, slot_predictor.models.transformers["dev"]
    adapters.add("held", write_lora(tmp_path, "held", LORAS["peft"](transformer)))
    held_image = render(slot_predictor, "held")
    before, names, holds = transformer_state(transformer), adapters.names(), adapters.slot_holds(DEV)
    assert holds == "held"
    build, message = FAILING[case]
    if case.startswith("fails_mid_swap"):
        monkeypatch.setattr(peft.utils.hotswap, "hotswap_adapter_from_state_dict",
                            FailFirstSwap(peft.utils.hotswap.hotswap_adapter_from_state_dict))
    with pytest.raises(InputError, match=f"^extra_lora: .*{message}"):
        adapters.add("failing", write_lora(tmp_path, "failing", build(transformer)))
        render(slot_predictor, "failing")
    monkeypatch.undo()
    assert_bitwise_equal(transformer_state(transformer), before)
    assert adapters.names() == names and adapters.slot_holds(DEV) == holds
    assert np.array_equal(render(slot_predictor, "held"), held_image)
    adapters.remove("held")


def test_every_extra_lora_runs_in_the_one_slot_at_its_rank(slot_predictor, tmp_path):
    """A rank-4 and a mixed rank-2/6 LoRA both run through the rank-8 slot, one after the other."""
    adapters, transformer = slot_predictor.variants.adapters, slot_predictor.models.transformers["dev"]
    adapters.add("narrow", write_lora(tmp_path, "narrow", LORAS["peft"](transformer)))
    adapters.add("wide", write_lora(tmp_path, "wide", mixed_rank_lora(transformer)))
    layer = transformer.transformer_blocks[0].attn.to_q
    try:
        for name in ("narrow", "wide", "narrow"):
            adapters.activate(DEV, {LASSIE_ADAPTER: 0.5, name: 1.0})
            assert layer.active_adapters == [LASSIE_ADAPTER, SLOT_ADAPTER]
            assert layer.lora_A[SLOT_ADAPTER].weight.shape[0] == SLOT_RANK
            assert adapters.slot_holds(DEV) == name
    finally:
        adapters.remove("narrow")
        adapters.remove("wide")
        adapters.activate(DEV, {LASSIE_ADAPTER: 1.0})
    assert adapters.slot_holds(DEV) is None


def counting_conversions(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The LoRA files diffusers is asked to convert from now on."""
    converted, convert = [], adapters._convert
    monkeypatch.setattr(adapters, "_convert", lambda path, field: converted.append(path) or convert(path, field))
    return converted


def test_switching_back_to_a_kept_extra_lora_reads_and_converts_nothing(slot_predictor, services, monkeypatch):
    transformer = slot_predictor.models.transformers["dev"]
    urls = [services.serve(f"/kept/{index}.safetensors",
                           save(forms.random_lora(transformer, list(forms.PEFT_MODULES), seed=30 + index)))
            for index in range(KEPT_EXTRA_LORAS + 1)]
    converted = counting_conversions(monkeypatch)
    first = [image_of(slot_predictor, extra_lora=url) for url in urls[:KEPT_EXTRA_LORAS]]
    assert [image_of(slot_predictor, extra_lora=url) for url in urls[:KEPT_EXTRA_LORAS]] == first
    assert len(converted) == KEPT_EXTRA_LORAS and len(set(first)) == KEPT_EXTRA_LORAS
    image_of(slot_predictor, extra_lora=urls[-1])  # one more: the least recently used (urls[0]) goes
    assert len(slot_predictor.variants.adapters.names()) == 1 + KEPT_EXTRA_LORAS
    assert image_of(slot_predictor, extra_lora=urls[1]) == first[1] and len(converted) == KEPT_EXTRA_LORAS + 1
    assert image_of(slot_predictor, extra_lora=urls[0]) == first[0] and len(converted) == KEPT_EXTRA_LORAS + 2


def test_without_slots_only_the_last_extra_lora_stays_an_adapter(predictor, services):
    """Kept named adapters would each hold device memory the memory plan does not count."""
    transformer = predictor.models.transformers["dev"]
    for index in range(3):
        url = services.serve(f"/named/{index}.safetensors",
                             save(forms.random_lora(transformer, list(forms.PEFT_MODULES), seed=40 + index)))
        image_of(predictor, extra_lora=url)
        assert len(predictor.variants.adapters.names()) == 2  # Lassie and this one


def text_encoder_lora(lassie: Lassie) -> dict[str, torch.Tensor]:
    """Transformer and CLIP parts, as kohya-trained FLUX LoRAs often have: the CLIP part always loads
    as its own adapter (the text encoder is never compiled), the transformer part into a slot."""
    encoder = lassie.models.text_encoder
    clip_linears = [name for name, module in encoder.named_modules()
                    if isinstance(module, torch.nn.Linear) and name.endswith(("q_proj", "v_proj"))]
    clip = make_tiny_weights.random_lora(make_tiny_weights.linear_sizes(encoder, clip_linears), seed=21,
                                         prefix="text_encoder", scale=0.2)
    return {**forms.random_lora(lassie.models.transformers["dev"], list(forms.PEFT_MODULES), seed=20), **clip}


def diffusers_image(reference, extra: dict[str, torch.Tensor]) -> np.ndarray:
    """diffusers' own pipeline with Lassie at 1 and `extra` at SCALE, each loaded by diffusers."""
    pipe = reference(FluxPipeline, lora_scale=1.0)
    pipe.load_lora_weights(dict(extra), adapter_name="extra")
    pipe.set_adapters(["lassie", "extra"], [1.0, SCALE])
    (image,) = reference_images(pipe)
    return image


@pytest.mark.parametrize("mode", ["slot", "named adapters"])
def test_a_lora_with_a_text_encoder_part_gives_diffusers_own_image(mode, predictor, slot_predictor, reference,
                                                                   services):
    lassie = slot_predictor if mode == "slot" else predictor
    lora = text_encoder_lora(lassie)
    url = services.serve(f"/with-clip/{mode.replace(' ', '-')}.safetensors", save(lora))
    expected = diffusers_image(reference, lora)
    (actual,) = run(lassie, extra_lora=url, extra_lora_scale=SCALE)
    assert_equal_but_for_rounding(actual, expected)
    without_clip = diffusers_image(reference, {key: value for key, value in lora.items()
                                               if key.startswith("transformer.")})
    assert np.abs(expected.astype(np.int16) - without_clip).max() > 10  # the CLIP part changes the image
    (after,) = run(lassie)  # the LoRA is kept (slot mode): its CLIP adapter must no longer run
    (lassie_only,) = reference_images(reference(FluxPipeline, lora_scale=1.0))
    assert_equal_but_for_rounding(after, lassie_only)
