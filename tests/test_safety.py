"""The safety filter on the tiny safety models, made to flag deterministically by editing copies of them.

CompVis flags an image when its embedding's cosine to a concept embedding exceeds that concept's
threshold; Falcon's verdict is its classifier's argmax. Both are set here through the models' own
parameters, then saved and loaded the way setup loads the real ones.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPImageProcessor, ViTForImageClassification

from lassie.hardware import DeviceInfo
from lassie.safety import AllOutputsFlaggedError, SafetyFilter
from lassie.weights import WeightsLayout

NEVER = 2.0  # above any cosine: the concept never fires
ALWAYS = -2.0  # below any cosine: the concept always fires
CPU = DeviceInfo(kind="cpu")


def sample_images() -> list[Image.Image]:
    noise = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    colours = ((200, 30, 30), (30, 200, 30), (30, 30, 200))
    return [Image.new("RGB", (64, 48), colour) for colour in colours] + [Image.fromarray(noise)]


def image_embeddings(checker: StableDiffusionSafetyChecker, processor: CLIPImageProcessor,
                     images: list[Image.Image]) -> torch.Tensor:
    pixels = processor(images=images, return_tensors="pt").pixel_values
    pooled = checker.vision_model(pixels)[1]
    return torch.nn.functional.normalize(checker.visual_projection(pooled))


def flag_only(checker: StableDiffusionSafetyChecker, processor: CLIPImageProcessor,
              images: list[Image.Image], flagged: list[int]) -> None:
    """One concept per flagged image: the part of its embedding orthogonal to every unflagged image's.

    Its cosine with the flagged image is positive and with every other image zero, so threshold 0
    separates them exactly.
    """
    embeddings = image_embeddings(checker, processor, images)
    others = embeddings[[index for index in range(len(images)) if index not in flagged]]
    basis, _ = torch.linalg.qr(others.T)
    checker.concept_embeds_weights.fill_(NEVER)
    for concept, index in enumerate(flagged):
        own = embeddings[index]
        checker.concept_embeds[concept] = own - basis @ (basis.T @ own)
        checker.concept_embeds_weights[concept] = 0.0


def write_compvis(tiny: WeightsLayout, layout: WeightsLayout, flagged: list[int] | str) -> None:
    """`flagged`: indices into sample_images(), or "all" / "none"."""
    checker = StableDiffusionSafetyChecker.from_pretrained(tiny.compvis_dir)
    processor = CLIPImageProcessor.from_pretrained(tiny.compvis_dir)
    with torch.no_grad():
        checker.special_care_embeds_weights.fill_(NEVER)
        if flagged == "all":
            checker.concept_embeds_weights.fill_(ALWAYS)
        elif flagged == "none":
            checker.concept_embeds_weights.fill_(NEVER)
        else:
            flag_only(checker, processor, sample_images(), flagged)
    checker.save_pretrained(layout.compvis_dir)
    shutil.copy(tiny.compvis_dir / "preprocessor_config.json", layout.compvis_dir)


def write_falcon(tiny: WeightsLayout, layout: WeightsLayout, label: str) -> None:
    """A classifier that answers `label` whatever the image."""
    classifier = ViTForImageClassification.from_pretrained(tiny.falcon_dir)
    bias = torch.full((classifier.config.num_labels,), -5.0)
    bias[classifier.config.label2id[label]] = 5.0
    with torch.no_grad():
        classifier.classifier.weight.zero_()
        classifier.classifier.bias.copy_(bias)
    classifier.save_pretrained(layout.falcon_dir)
    shutil.copy(tiny.falcon_dir / "preprocessor_config.json", layout.falcon_dir)


def safety_filter(tiny_weights: Path, root: Path, compvis_flags: list[int] | str, falcon_says: str) -> SafetyFilter:
    tiny, layout = WeightsLayout(tiny_weights), WeightsLayout(root)
    write_compvis(tiny, layout, compvis_flags)
    write_falcon(tiny, layout, falcon_says)
    return SafetyFilter.load(layout, CPU)


def same_images(kept: list[Image.Image], expected: list[Image.Image]) -> bool:
    """The very images expected, in their order: which were kept and how many dropped."""
    return len(kept) == len(expected) and all(image is wanted for image, wanted in zip(kept, expected))


def test_unmodified_tiny_models_keep_every_image(tiny_weights: Path) -> None:
    images = sample_images()
    assert same_images(SafetyFilter.load(WeightsLayout(tiny_weights), CPU).filter(images), images)


def test_images_both_models_flag_are_dropped(
        tiny_weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = sample_images()
    checker = safety_filter(tiny_weights, tmp_path, compvis_flags=[0, 2], falcon_says="nsfw")
    with caplog.at_level(logging.INFO, logger="lassie.safety"):
        kept = checker.filter(images)
    assert same_images(kept, [images[1], images[3]])
    assert "2 of 4 outputs flagged by CompVis, 2 of those confirmed by Falcon and dropped" in caplog.text


def test_second_opinion_clears_a_compvis_flag(tiny_weights: Path, tmp_path: Path) -> None:
    images = sample_images()
    assert same_images(safety_filter(tiny_weights, tmp_path, compvis_flags="all", falcon_says="normal").filter(images),
                       images)


def test_falcon_alone_drops_nothing(tiny_weights: Path, tmp_path: Path) -> None:
    images = sample_images()
    assert same_images(safety_filter(tiny_weights, tmp_path, compvis_flags="none", falcon_says="nsfw").filter(images),
                       images)


def test_every_output_flagged_fails_with_a_clear_message(tiny_weights: Path, tmp_path: Path) -> None:
    checker = safety_filter(tiny_weights, tmp_path, compvis_flags="all", falcon_says="nsfw")
    with pytest.raises(AllOutputsFlaggedError, match="All 4 outputs were flagged as NSFW") as caught:
        checker.filter(sample_images())
    assert "Try a different prompt" in str(caught.value)
    with pytest.raises(AllOutputsFlaggedError, match="^The output was flagged as NSFW"):
        checker.filter(sample_images()[:1])
