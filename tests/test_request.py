import typing
from dataclasses import replace
from pathlib import Path

import pytest

from lassie.request.bounds import BOUNDS
from lassie.request.errors import InputError
from lassie.request.plan import Mode, Plan, Request, describe, make_plan, random_seed

PHOTO = {"image": Path("x.png"), "image_size": (600, 400)}
"""An image input as the predictor plans it: the path, and the size its decoded image has."""


def plan(image_size=None, **fields):
    return make_plan(Request(prompt="a dog", **fields), image_size)


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
    assert plan(**PHOTO).mode is Mode.IMG2IMG
    assert plan(**PHOTO, mask=Path("m.png")).mode is Mode.INPAINT


def test_image_inputs_are_planned_once_from_the_decoded_image_size():
    """The plan is complete when made: nothing fills its size in later (`Plan.size` is never None)."""
    assert typing.get_type_hints(Plan)["size"] == tuple[int, int]
    p = plan(image=Path("x.png"), image_size=(2880, 1440), aspect_ratio="custom", width=512, height=512)
    assert (p.size, p.input_size) == ((1440, 720), (2880, 1440))
    inpaint = plan(image=Path("x.png"), mask=Path("m.png"), image_size=(333, 500))
    assert (inpaint.size, inpaint.input_size) == ((336, 496), (333, 500))
    assert (plan(seed=1).size, plan(seed=1).input_size) == ((1024, 1024), None)


def test_image_inputs_are_not_planned_without_their_size():
    with pytest.raises(TypeError, match="image_size"):
        plan(image=Path("x.png"))
    with pytest.raises(TypeError, match="image_size"):
        plan(image_size=(600, 400))


def test_mask_without_image_is_a_clear_error():
    with pytest.raises(InputError, match=r"^mask: .*image"):
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
    assert plan(go_fast=True, **PHOTO).go_fast


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


@pytest.mark.parametrize("field", list(BOUNDS))
def test_every_bound_of_the_table_is_checked(field):
    bound = BOUNDS[field]
    for inside in (bound.low, bound.high):
        plan(**{field: inside})
    for outside in (bound.low - 1, bound.high + 1):
        with pytest.raises(InputError, match=f"^{field}: must be between {bound.low} and {bound.high}, got "):
            plan(**{field: outside})


def test_custom_without_width_names_width():
    with pytest.raises(InputError, match=r"^width: is required when aspect_ratio is custom"):
        plan(aspect_ratio="custom", height=512)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("seed", 2**64 + 5, "seed: must be between 0 and 18446744073709551615, got 18446744073709551621"),
    ("seed", -(2**70), "seed: must be between 0 and 18446744073709551615, got -1180591620717411303424"),
    ("width", 10**7, "width: must be between 256 and 1440, got 10000000"),
    ("num_outputs", 1234567, "num_outputs: must be between 1 and 4, got 1234567"),
    ("guidance_scale", 10.25, "guidance_scale: must be between 0 and 10, got 10.25"),
    ("prompt_strength", 1.0000001, "prompt_strength: must be between 0 and 1, got 1.0000001"),
])
def test_errors_print_bounds_and_values_exactly(field, value, message):
    with pytest.raises(InputError) as error:
        plan(**{field: value})
    assert str(error.value) == message


def test_the_largest_seed_is_a_seed():
    assert plan(seed=2**64 - 1).seed == 2**64 - 1


def test_whole_floats_in_integer_fields_become_ints():
    """The Cog server passes 2.0 on as a float (JSON Schema counts it as an integer)."""
    p = plan(num_outputs=2.0, num_inference_steps=3.0, seed=5.0, output_quality=50.0,
             aspect_ratio="custom", width=300.0, height=512.0)
    values = (p.num_outputs, p.num_inference_steps, p.seed, p.output_quality, *p.size)
    assert values == (2, 3, 5, 50, 304, 512) and all(type(value) is int for value in values)


@pytest.mark.parametrize(("field", "value"), [
    ("num_outputs", 2.5), ("num_inference_steps", 2.5), ("seed", 2.5), ("output_quality", 2.5), ("width", 300.5),
])
def test_fractional_integer_fields_name_their_field(field, value):
    with pytest.raises(InputError, match=f"^{field}: must be a whole number, got {value}$"):
        plan(**{field: value})


@pytest.mark.parametrize(("steps", "strength", "expected"), [
    (8, 0.8, 7), (28, 0.8, 23), (50, 0.01, 1), (1, 1.0, 1), (50, 1.0, 50), (28, 0.0, 0), (1, 1e-20, 0),
    # Where diffusers would start from pure noise below 1.0, denoising starts one step in.
    (4, 0.8, 3), (4, 0.9, 3), (4, 1.0, 4), (2, 0.6, 1), (1, 0.8, 0), (28, 0.99, 27),
])
def test_steps_run_follow_diffusers_strength_rounding(steps, strength, expected):
    p = plan(**PHOTO, num_inference_steps=steps, prompt_strength=strength)
    assert p.steps_run == expected


def test_txt2img_runs_every_step_whatever_the_strength():
    assert plan(num_inference_steps=8, prompt_strength=0.0).steps_run == 8


def test_the_log_line_names_strength_input_size_and_steps_that_run():
    p = plan(**PHOTO, num_inference_steps=8)
    assert describe(p) == ("img2img from a 600x400 input image: size 608x400, "
                           "prompt_strength 0.8 runs 7 of 8 steps, from step 2, 1 output(s)")
    unchanged = replace(p, strength=0.0, mode=Mode.INPAINT)
    assert describe(unchanged) == ("inpaint from a 600x400 input image: size 608x400, prompt_strength 0.0 runs "
                                   "0 of 8 steps (the input image comes back unchanged), 1 output(s)")
    assert describe(plan(megapixels="0.25", num_inference_steps=3)) == "size 512x512, 3 steps, 1 output(s)"
    assert describe(plan(**PHOTO, num_inference_steps=4, model="schnell")) == (
        "img2img from a 600x400 input image: size 608x400, prompt_strength 0.8 runs 3 of 4 steps, from step 2 "
        "(one step in: 4 x 0.2 < 1 would start from pure noise), 1 output(s)")
    assert describe(plan(**PHOTO, num_inference_steps=1, prompt_strength=0.5)) == (
        "img2img from a 600x400 input image: size 608x400, prompt_strength 0.5 runs 0 of 1 steps (one step in: "
        "1 x 0.5 < 1 would start from pure noise, which leaves none; the input image comes back unchanged), "
        "1 output(s)")
    assert describe(plan(**PHOTO, num_inference_steps=4, prompt_strength=1.0)) == (
        "img2img from a 600x400 input image: size 608x400, prompt_strength 1.0 runs 4 of 4 steps, from pure noise, "
        "1 output(s)")
