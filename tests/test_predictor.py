"""The predictor against diffusers' own pipelines on the same weights, pixel for pixel (the Lassie
LoRA is an adapter, as in diffusers, and the images are bitwise equal; some tests allow float32
rounding, see `helpers.assert_equal_but_for_rounding`)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers import assert_equal_but_for_rounding, reference_images, run, write_compvis, write_falcon
from lassie.request.plan import Request, denoising_steps, diffusers_skipped_steps, make_plan


def test_txt2img_equals_diffusers_flux_pipeline_with_the_lora(predictor, reference):
    expected = reference_images(reference(FluxPipeline, lora_scale=1.0))
    assert_equal_but_for_rounding(run(predictor)[0], expected[0])


@pytest.mark.parametrize("scale", [1.0, 0.5, -1.0])
def test_the_default_lassie_adapter_gives_diffusers_own_images_bit_for_bit(predictor, reference, scale):
    """The Lassie adapter's scale is a tensor, always active: the same sums as diffusers' float scale."""
    expected = reference_images(reference(FluxPipeline, lora_scale=scale))
    assert np.array_equal(run(predictor, lora_scale=scale)[0], expected[0])


def test_lora_scale_zero_equals_the_base_model(predictor, reference):
    base = reference_images(reference(FluxPipeline))
    assert_equal_but_for_rounding(run(predictor, lora_scale=0)[0], base[0])
    assert not np.array_equal(run(predictor, lora_scale=1)[0], base[0])


def test_scale_is_linear_and_negative_scales_work(predictor, reference):
    expected = reference_images(reference(FluxPipeline, lora_scale=-1.0))
    assert_equal_but_for_rounding(run(predictor, lora_scale=-1)[0], expected[0])


def test_output_at_a_scale_does_not_depend_on_earlier_scales(predictor, caplog):
    """Scale changes reload nothing and leave the base weights bitwise as they were (no drift)."""
    transformer = predictor.models.transformers["dev"]
    base = {key: value.clone() for key, value in transformer.state_dict().items() if ".lora_" not in key}
    first = run(predictor, lora_scale=0.6)[0]
    with caplog.at_level(logging.INFO, logger="lassie"):
        for scale in (3, -1, 0, 1.7):
            run(predictor, lora_scale=scale)
    assert np.array_equal(run(predictor, lora_scale=0.6)[0], first)
    assert "loaded into" not in caplog.text
    after = transformer.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in base.items())


def test_schnell_equals_diffusers_with_schnell_transformer(predictor, reference):
    expected = reference_images(reference(FluxPipeline, "schnell", lora_scale=1.0), max_sequence_length=256,
                                guidance_scale=0.0)
    assert_equal_but_for_rounding(run(predictor, model="schnell")[0], expected[0])


def test_four_outputs_come_from_one_batched_call_and_differ(predictor, reference):
    outputs = run(predictor, num_outputs=4)
    expected = reference_images(reference(FluxPipeline, lora_scale=1.0), num_images_per_prompt=4)
    assert len(outputs) == len(expected) == 4
    for output, reference_output in zip(outputs, expected, strict=True):
        assert_equal_but_for_rounding(output, reference_output)
    assert len({o.tobytes() for o in outputs}) == 4


def test_same_seed_same_image_other_seed_other_image(predictor):
    assert np.array_equal(run(predictor, seed=0)[0], run(predictor, seed=0)[0])
    assert not np.array_equal(run(predictor, seed=0)[0], run(predictor, seed=1)[0])


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.effect_noise((600, 400), 60).convert("RGB").save(path)
    return path


@pytest.fixture
def mask(tmp_path):
    path = tmp_path / "mask.png"
    image = Image.new("L", (300, 200), 0)
    image.paste(255, (100, 50, 200, 150))
    image.save(path)
    return path


def test_img2img_equals_diffusers_img2img(predictor, reference, photo):
    """0.7 of 4 steps: diffusers' own rounding (skip 1, run 3) holds, so its strength is the request's."""
    outputs = run(predictor, image=photo, prompt_strength=0.7, num_inference_steps=4)
    image = Image.open(photo).convert("RGB")
    expected = reference_images(reference(FluxImg2ImgPipeline, lora_scale=1.0), image=image, strength=0.7,
                                width=608, height=400, num_inference_steps=4)
    assert outputs[0].shape == (400, 608, 3)
    assert_equal_but_for_rounding(outputs[0], expected[0])


def test_the_plan_is_made_once_from_the_decoded_image_and_is_what_the_pipeline_runs(predictor, photo, monkeypatch):
    """No plan is completed later: the one made from the 600x400 image reaches the pipeline call."""
    import lassie.predictor as module

    made, generated = [], []
    make_plan, generate = module.make_plan, module.generate
    monkeypatch.setattr(module, "make_plan", lambda *args: made.append(make_plan(*args)) or made[-1])
    monkeypatch.setattr(module, "generate", lambda pipeline, plan, inputs: generated.append(
        (plan, inputs)) or generate(pipeline, plan, inputs))
    run(predictor, image=photo, prompt_strength=0.7)
    assert [(plan.size, plan.input_size) for plan in made] == [((608, 400), (600, 400))]
    [(plan, inputs)] = generated
    assert plan is made[0] and inputs.image.size == plan.size


def test_inpainting_equals_diffusers_inpaint(predictor, reference, photo, mask):
    """0.9 of 4 steps would skip none in diffusers (pure noise); it starts one step in, which is
    diffusers' own inpainting at 0.75 of 4 (skip 1, run 3)."""
    outputs = run(predictor, image=photo, mask=mask, prompt_strength=0.9, num_inference_steps=4)
    image = Image.open(photo).convert("RGB").resize((608, 400), Image.Resampling.LANCZOS)
    mask_image = Image.open(mask).convert("L").resize((608, 400), Image.Resampling.LANCZOS)
    expected = reference_images(reference(FluxInpaintPipeline, lora_scale=1.0), image=image, mask_image=mask_image,
                                strength=0.75, width=608, height=400, num_inference_steps=4)
    assert_equal_but_for_rounding(outputs[0], expected[0])


@pytest.mark.parametrize("output_format", ["webp", "jpg", "png"])
def test_output_formats_and_names(predictor, output_format):
    paths = predictor.predict(Request(prompt="x", num_inference_steps=1, seed=1, megapixels="0.25",
                                      aspect_ratio="3:2", num_outputs=2, output_format=output_format))
    assert [p.name for p in paths] == [f"out-0.{output_format}", f"out-1.{output_format}"]
    expected_format = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}[output_format]
    assert all(Image.open(p).format == expected_format and Image.open(p).size == (608, 416) for p in paths)


def test_a_prediction_draws_no_progress_bar(predictor, capfd):
    """Warm-up (LASSIE_COMPILE=1) and requests run the same pipelines: a denoising bar would put
    carriage returns into the setup log and each request's log."""
    capfd.readouterr()
    run(predictor)
    captured = capfd.readouterr()
    assert "\r" not in captured.err + captured.out, captured.err[-500:]


def test_output_quality_changes_lossy_files(predictor):
    low, high = (predictor.predict(Request(prompt="x", num_inference_steps=1, seed=1, megapixels="0.25",
                                           output_format="jpg", output_quality=q))[0].stat().st_size
                 for q in (5, 95))
    assert low < high


@pytest.fixture(scope="module")
def flagging_weights(tiny_weights, tmp_path_factory):
    """A copy of the tiny weights whose CompVis checker flags everything."""
    from lassie.weights.layout import WeightsLayout

    root = tmp_path_factory.mktemp("flagging")
    shutil.copytree(tiny_weights, root, dirs_exist_ok=True)
    write_compvis(WeightsLayout(tiny_weights), WeightsLayout(root), "all")
    return root


@pytest.mark.parametrize(("falcon_says", "kept"), [("nsfw", 0), ("normal", 3)])
def test_safety_checker_drops_only_what_both_models_flag(tiny_weights, flagging_weights, falcon_says, kept):
    from conftest import settings_for
    from lassie.engine.safety import AllOutputsFlaggedError
    from lassie.predictor import Lassie
    from lassie.weights.layout import WeightsLayout

    write_falcon(WeightsLayout(tiny_weights), WeightsLayout(flagging_weights), falcon_says)
    lassie = Lassie(settings_for(flagging_weights))
    lassie.setup()
    request = dict(prompt="x", num_inference_steps=1, seed=1, megapixels="0.25", num_outputs=3)
    if kept == 0:
        with pytest.raises(AllOutputsFlaggedError, match="All 3 outputs were flagged as NSFW"):
            lassie.predict(Request(**request))
    else:
        assert len(lassie.predict(Request(**request))) == kept
    assert len(lassie.predict(Request(**request, disable_safety_checker=True))) == 3


@settings(max_examples=300, deadline=None, database=None)
@given(steps=st.integers(1, 50), strength=st.floats(0, 1))
@example(steps=5, strength=0.8)  # 5 * (1 - 0.8) < 1 in floats, yet diffusers' int(5 - 5 * 0.8) skips 1
def test_steps_run_are_what_diffusers_get_timesteps_runs(steps, strength):
    """The strength the pipeline gets makes diffusers run exactly the planned steps; it is the request's
    own strength unless diffusers' rounding would start from pure noise below 1.0."""
    plan = make_plan(Request(prompt="x", image=Path("photo.png"), num_inference_steps=steps,
                             prompt_strength=strength), (600, 400))
    assert plan.steps_run == denoising_steps(steps, strength)
    noise_first = diffusers_skipped_steps(steps, strength) == 0 and strength < 1
    assert (plan.pipeline_strength == strength) != noise_first
    for pipeline_class in (FluxImg2ImgPipeline, FluxInpaintPipeline):
        scheduler = FlowMatchEulerDiscreteScheduler()
        scheduler.set_timesteps(steps)
        own = SimpleNamespace(scheduler=scheduler)
        _, runs = pipeline_class.get_timesteps(own, steps, plan.pipeline_strength, "cpu")
        assert plan.steps_run in (runs, 0)
        if not noise_first:
            assert pipeline_class.get_timesteps(own, steps, strength, "cpu")[1] == runs


@pytest.fixture
def transformer_calls(predictor):
    """Counts forward calls of the dev transformer: one per denoising step and output batch."""
    calls = []
    handle = predictor.models.transformers["dev"].register_forward_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


@pytest.mark.parametrize("with_mask", [False, True])
def test_img2img_logs_and_runs_the_steps_that_strength_leaves(predictor, photo, mask, transformer_calls, caplog,
                                                              with_mask):
    inputs = {"image": photo, "mask": mask} if with_mask else {"image": photo}
    with caplog.at_level(logging.INFO, logger="lassie"):
        run(predictor, **inputs, num_inference_steps=8, prompt_strength=0.8)
    mode = "inpaint" if with_mask else "img2img"
    assert (f"{mode} from a 600x400 input image: size 608x400, prompt_strength 0.8 runs 7 of 8 steps, from step 2"
            in caplog.text)
    assert len(transformer_calls) == 7


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("strength", [0, 1e-20])
def test_prompt_strength_zero_gives_the_input_image_back(predictor, photo, mask, transformer_calls, caplog, with_mask,
                                                         strength):
    inputs = {"image": photo, "mask": mask} if with_mask else {"image": photo}
    with caplog.at_level(logging.INFO, logger="lassie"):
        outputs = run(predictor, **inputs, prompt_strength=strength, num_outputs=2)
    expected = np.asarray(Image.open(photo).convert("RGB").resize((608, 400), Image.Resampling.LANCZOS))
    assert len(outputs) == 2 and all(np.array_equal(output, expected) for output in outputs)
    assert transformer_calls == [] and "runs 0 of 2 steps (the input image comes back unchanged)" in caplog.text


def test_a_bad_setting_fails_predict_py_setup_naming_the_variable(tiny_weights):
    """predict.py reads the settings once, first: a typo fails setup there, before any weights load."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "LASSIE_WEIGHTS_DIR": str(tiny_weights),
           "LASSIE_GO_FAST_MODE": "bogus"}
    result = subprocess.run([sys.executable, "-c", "import predict; predict.Predictor().setup()"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert ("SettingError: LASSIE_GO_FAST_MODE must be one of auto, fp8, fp8-weight-only, unquantized, got 'bogus'"
            in result.stderr)
    assert "loading FLUX.1 dev" not in result.stderr


def test_a_compile_backend_this_torch_lacks_fails_setup_naming_the_variable(tiny_weights):
    """Only the hardware's torch knows its backends: setup checks the setting against them."""
    from conftest import settings_for
    from lassie.predictor import Lassie
    from lassie.settings import SettingError

    lassie = Lassie(settings_for(tiny_weights, LASSIE_COMPILE="1", LASSIE_COMPILE_BACKEND="bogus"))
    with pytest.raises(SettingError, match=r"LASSIE_COMPILE_BACKEND must be one of .*aot_eager.*, got 'bogus'"):
        lassie.setup()
    assert lassie.models is None


PREDICT_PY_RELEASES = '''
import asyncio, dataclasses, threading
import predict
from lassie.request.plan import Request
from lassie.serial import SerialRunner

class Interrupted(BaseException):
    pass

class Prepared:  # stands in for lassie's: only `release` matters here
    def __init__(self):
        self.released = 0
    def release(self):
        self.released += 1

class FakeLassie:
    def __init__(self, outcome):
        self.outcome, self.prepared, self.made = outcome, [], threading.Event()
    def prepare(self, request):
        self.prepared.append(Prepared())
        self.made.set()
        return self.prepared[-1]
    def predict_prepared(self, prepared):
        if self.outcome == "failed":
            raise RuntimeError("GPU fault")
        assert self.outcome == "done", "a request cancelled in line never runs"
        return []

async def request(outcome):
    predictor = predict.Predictor()
    predictor.runner, predictor.lassie = SerialRunner(interrupt=Interrupted), FakeLassie(outcome)
    fields = {field.name: field.default for field in dataclasses.fields(Request) if field.name != "prompt"}
    gate = threading.Event()
    line = asyncio.ensure_future(predictor.runner.run(lambda: gate.wait(60)))  # the GPU busy with another
    if outcome != "cancelled":
        gate.set()
    task = asyncio.ensure_future(predictor.predict(prompt="a dog", **fields))
    for _ in range(500):
        if predictor.lassie.made.is_set():
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # the request now waits in line
    if outcome == "cancelled":
        task.cancel()
    try:
        await task
    except (asyncio.CancelledError, RuntimeError) as error:
        print(outcome, type(error).__name__)
    gate.set()
    await line
    print(outcome, [prepared.released for prepared in predictor.lassie.prepared])

for outcome in ("done", "failed", "cancelled"):
    asyncio.run(request(outcome))
'''


def test_predict_py_releases_a_request_s_extra_lora_when_it_ends_done_failed_or_cancelled():
    """The hold on an extra LoRA's cached file ends with the request, also one cancelled in line."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    result = subprocess.run([sys.executable, "-c", PREDICT_PY_RELEASES], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["done [1]", "failed RuntimeError", "failed [1]",
                                          "cancelled CancelledError", "cancelled [1]"]
