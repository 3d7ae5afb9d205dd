"""The safety filter on the tiny safety models, made to flag deterministically by editing copies of them
(helpers.write_compvis / write_falcon), then saved and loaded the way setup loads the real ones."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from helpers import sample_images, write_compvis, write_falcon
from lassie.engine.hardware import DeviceInfo
from lassie.engine.safety import AllOutputsFlaggedError, SafetyFilter
from lassie.weights.layout import WeightsLayout

CPU = DeviceInfo(kind="cpu")


def safety_filter(tiny_weights: Path, root: Path, compvis_flags: list[int] | str, falcon_says: str) -> SafetyFilter:
    tiny, layout = WeightsLayout(tiny_weights), WeightsLayout(root)
    write_compvis(tiny, layout, compvis_flags)
    write_falcon(tiny, layout, falcon_says)
    return SafetyFilter.load(layout, CPU)


def same_images(kept: list[Image.Image], expected: list[Image.Image]) -> bool:
    """The very images expected, in their order: which were kept and how many dropped."""
    return len(kept) == len(expected) and all(image is wanted for image, wanted in zip(kept, expected, strict=True))


def test_unmodified_tiny_models_keep_every_image(tiny_weights: Path) -> None:
    images = sample_images()
    assert same_images(SafetyFilter.load(WeightsLayout(tiny_weights), CPU).filter(images), images)


def test_images_both_models_flag_are_dropped(
        tiny_weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = sample_images()
    checker = safety_filter(tiny_weights, tmp_path, compvis_flags=[0, 2], falcon_says="nsfw")
    with caplog.at_level(logging.INFO, logger="lassie.engine.safety"):
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
    with pytest.raises(AllOutputsFlaggedError, match=r"^The output was flagged as NSFW"):
        checker.filter(sample_images()[:1])
