"""Every LoRA key form diffusers' FLUX loader converts acts exactly like the same LoRA in PEFT keys,
and LoRAs that do not fit FLUX are refused with the model left exactly as it was.

Images are float arrays in [0, 1] from the dev txt2img pipeline (256x256, 2 steps, fixed seed).
A form and its canonical PEFT LoRA must agree to ATOL while both differ from the image without
the extra LoRA by far more than that, so a LoRA that silently loads as nothing cannot pass.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lora_formats as forms
from conftest import settings_for
from helpers import dev_float_image
from lassie.engine.variants import Variant
from lassie.predictor import Lassie
from lassie.request.errors import InputError
from lassie.weights.layout import WeightsLayout

DEV = Variant("dev", False)

ATOL = 1e-4
SCALE = 0.75
ALPHA_RATIO = 0.25  # alpha = rank / 4: the loader must apply alpha for the images to match
QKV_GROUPS = [modules for modules in forms.XLABS_MODULES.values() if len(modules) == 3]
# A layer neither the Lassie LoRA nor the form tests adapt: refusals are for the reason each case
# is about, and a load that fails there starts from a plain nn.Linear.
FRESH = "transformer_blocks.0.norm1_context.linear"

LoraPair = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def kohya_pair(writer: Callable, alpha_ratio: float | None) -> Callable[[torch.nn.Module], LoraPair]:
    def build(transformer: torch.nn.Module) -> LoraPair:
        canonical = forms.random_lora(transformer, forms.modules_of(forms.KOHYA_MODULES), seed=1)
        return canonical, writer(canonical, alpha_ratio)
    return build


def xlabs_pair(transformer: torch.nn.Module) -> LoraPair:
    canonical = forms.random_lora(transformer, forms.modules_of(forms.XLABS_MODULES), seed=2,
                                  shared_down=QKV_GROUPS)
    return canonical, forms.to_xlabs(canonical)


def partial_pair(transformer: torch.nn.Module) -> LoraPair:
    """No proj_mlp LoRA at all must act like a proj_mlp LoRA that changes nothing."""
    untrained = ["single_transformer_blocks.0.proj_mlp"]
    lora = forms.random_lora(transformer, list(forms.PEFT_MODULES), seed=3)
    return forms.with_zero_up(lora, untrained), forms.without_modules(lora, untrained)


def peft_with_prefix_pair(transformer: torch.nn.Module) -> LoraPair:
    canonical = forms.random_lora(transformer, list(forms.PEFT_MODULES), seed=4)
    return canonical, forms.to_peft_with_prefix(canonical)


FORMS = {
    "kohya_with_alpha": kohya_pair(forms.to_kohya, ALPHA_RATIO),
    "kohya_without_alpha": kohya_pair(forms.to_kohya, None),
    "comfyui_with_alpha": kohya_pair(forms.to_comfyui, ALPHA_RATIO),
    "xlabs": xlabs_pair,
    "partial_peft": partial_pair,
}

# case -> (LoRA for the transformer, what the error must name)
REFUSED = {
    "wrong_input_size": (lambda t: forms.with_input_size(forms.random_lora(t, [FRESH], seed=5), FRESH, 64), FRESH),
    "wrong_rank": (lambda t: forms.with_rank(forms.random_lora(t, [FRESH], seed=5), FRESH, 8), FRESH),
    "sd15_kohya": (lambda t: forms.sd15_kohya_lora(), "lora_unet_down_blocks_0"),
    "lycoris_lokr": (lambda t: forms.lycoris_lokr_lora(), "lokr_w1"),
    "flux_control": (lambda t: forms.control_lora(forms.random_lora(t, [FRESH], seed=5), t), "x_embedder"),
}


def render_with(predictor, extra: str) -> np.ndarray:
    predictor.variants.adapters.activate(DEV, {"lassie": 0.0, extra: SCALE})
    return dev_float_image(predictor)


@pytest.fixture(scope="module")
def base_image(predictor) -> np.ndarray:
    """The image without any extra LoRA (and the Lassie LoRA at 0)."""
    predictor.variants.adapters.activate(DEV, {"lassie": 0.0})
    try:
        return dev_float_image(predictor)
    finally:
        predictor.variants.adapters.activate(DEV, {"lassie": 1.0})


@pytest.fixture
def add_lora(predictor, tmp_path):
    """Saves and adds extra LoRAs; the session predictor is shared, so every one is removed after."""
    names = []

    def add(name: str, state_dict: dict[str, torch.Tensor]) -> None:
        path = tmp_path / f"{name}.safetensors"
        save_file(state_dict, path)
        names.append(name)
        predictor.variants.adapters.add(name, path)

    yield add
    for name in names:
        predictor.variants.adapters.remove(name)
    predictor.variants.adapters.activate(DEV, {"lassie": 1.0})


def model_state(predictor) -> dict[str, torch.Tensor]:
    modules = {**predictor.models.transformers, "text_encoder": predictor.models.text_encoder}
    return {f"{owner}.{key}": tensor.detach().clone()
            for owner, module in modules.items() for key, tensor in module.state_dict().items()}


@pytest.mark.parametrize("form", FORMS)
def test_form_changes_the_image_like_the_same_lora_in_peft_keys(predictor, add_lora, base_image, form):
    canonical, written = FORMS[form](predictor.models.transformers["dev"])
    add_lora(f"peft_{form}", canonical)
    add_lora(form, written)
    expected = render_with(predictor, f"peft_{form}")
    actual = render_with(predictor, form)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ATOL)
    assert np.abs(actual - base_image).max() > 100 * ATOL


@pytest.mark.xfail(raises=InputError, strict=True, reason=(
    "diffusers 0.42.1 sends every key holding 'base_model' to _convert_fal_kontext_lora_to_diffusers, which "
    "requires BFL names for all 19 double and 38 single blocks at FLUX.1 sizes: no tiny LoRA loads that way"))
def test_peft_with_base_model_prefix_changes_the_image_like_peft_keys(predictor, add_lora, base_image):
    canonical, written = peft_with_prefix_pair(predictor.models.transformers["dev"])
    add_lora("peft_fal", canonical)
    add_lora("fal", written)
    np.testing.assert_allclose(render_with(predictor, "fal"), render_with(predictor, "peft_fal"), rtol=0, atol=ATOL)


def test_an_extra_lora_may_adapt_layers_the_lassie_lora_adapts(predictor, add_lora, base_image):
    """Nearly every FLUX LoRA trains attention, which the Lassie LoRA has already wrapped in PEFT layers."""
    add_lora("on_to_q", forms.random_lora(predictor.models.transformers["dev"], ["transformer_blocks.0.attn.to_q"],
                                          seed=6))
    assert np.abs(render_with(predictor, "on_to_q") - base_image).max() > 100 * ATOL


@pytest.mark.parametrize("case", REFUSED)
def test_lora_that_does_not_fit_is_refused_and_leaves_the_model_as_it_was(predictor, add_lora, base_image, case):
    build, culprit = REFUSED[case]
    before = model_state(predictor)
    names_before = predictor.variants.adapters.names()
    with pytest.raises(InputError) as error:
        add_lora(case, build(predictor.models.transformers["dev"]))
        predictor.variants.adapters.activate(DEV, {"lassie": 0.0, case: SCALE})
    assert error.value.field == "extra_lora"
    assert culprit in str(error.value)
    after = model_state(predictor)
    assert after.keys() == before.keys()
    assert all(after[key].shape == before[key].shape and torch.equal(after[key], before[key]) for key in before)
    assert predictor.variants.adapters.names() == names_before
    predictor.variants.adapters.activate(DEV, {"lassie": 0.0})
    assert np.array_equal(dev_float_image(predictor), base_image)


def test_a_lassie_lora_that_does_not_fit_fails_setup_naming_the_lassie_lora(tiny_weights, tmp_path):
    """The Lassie LoRA comes from the weights at setup, not from a request: its errors name its file."""
    root = tmp_path / "weights"
    shutil.copytree(tiny_weights, root)
    layout = WeightsLayout(root)
    build, culprit = REFUSED["sd15_kohya"]
    save_file(build(None), layout.lassie_lora)
    with pytest.raises(InputError) as error:
        Lassie(settings_for(root)).setup()
    assert str(error.value).startswith(f"Lassie LoRA ({layout.lassie_lora}): ")
    assert culprit in str(error.value) and "extra_lora" not in str(error.value)
