from pathlib import Path

import pytest

from lassie.errors import InputError
from lassie.request import Mode, Request, make_plan, random_seed


def plan(**fields):
    return make_plan(Request(prompt="a dog", **fields))


def test_defaults_follow_the_schema():
    p = plan(seed=1)
    assert (p.mode, p.model, p.size, p.num_inference_steps, p.guidance_scale) == (Mode.TXT2IMG, "dev", (1024, 1024), 28, 3.0)
    assert (p.num_outputs, p.output_format, p.output_quality, p.safety_checker) == (1, "webp", 80, True)
    assert (p.lora_scale, p.extra_lora, p.max_sequence_length, p.go_fast) == (1.0, None, 512, False)


def test_seed_zero_is_a_seed_and_missing_seed_is_random_32_bit():
    assert plan(seed=0).seed == 0
    seeds = {plan().seed for _ in range(20)}
    assert len(seeds) > 15 and all(0 <= s < 2**32 for s in seeds)
    assert max(random_seed() for _ in range(200)) >= 2**16


def test_modes_follow_the_inputs():
    assert plan(image=Path("x.png")).mode is Mode.IMG2IMG
    assert plan(image=Path("x.png"), mask=Path("m.png")).mode is Mode.INPAINT
    assert plan(image=Path("x.png")).size is None


def test_mask_without_image_is_a_clear_error():
    with pytest.raises(InputError, match="^mask: .*image"):
        plan(mask=Path("m.png"))


def test_schnell_uses_four_steps_no_guidance_and_t5_256():
    p = plan(model="schnell", num_inference_steps=28, guidance_scale=7)
    assert (p.num_inference_steps, p.guidance_scale, p.max_sequence_length) == (4, 0.0, 256)
    assert plan(model="schnell", num_inference_steps=2).num_inference_steps == 2


def test_go_fast_multiplies_both_lora_scales_by_one_and_a_half():
    p = plan(go_fast=True, lora_scale=0.8, extra_lora="a/b", extra_lora_scale=-0.5)
    assert (p.go_fast, p.lora_scale, p.extra_lora_scale) == (True, pytest.approx(1.2), pytest.approx(-0.75))


def test_custom_size_runs_without_go_fast_even_when_asked():
    p = plan(go_fast=True, aspect_ratio="custom", width=500, height=300, lora_scale=1.0)
    assert (p.go_fast, p.lora_scale, p.size) == (False, 1.0, (496, 304))


def test_go_fast_applies_to_image_inputs():
    assert plan(go_fast=True, image=Path("x.png")).go_fast


@pytest.mark.parametrize(("field", "value"), [
    ("num_outputs", 0), ("num_outputs", 5), ("num_inference_steps", 51), ("guidance_scale", 10.5),
    ("prompt_strength", 1.1), ("output_quality", 101), ("lora_scale", -1.5), ("extra_lora_scale", 3.5),
    ("model", "pro"), ("output_format", "gif"), ("aspect_ratio", "2:1"), ("megapixels", "2"),
    ("width", 100), ("height", 5000), ("seed", -1), ("extra_lora", "   "),
])
def test_bad_values_name_their_field(field, value):
    with pytest.raises(InputError) as error:
        plan(**{field: value})
    assert error.value.field == field


def test_custom_without_width_names_width():
    with pytest.raises(InputError, match="^width: is required when aspect_ratio is custom"):
        plan(aspect_ratio="custom", height=512)
