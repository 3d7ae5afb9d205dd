"""The safety filter: the CompVis checker over the batch, Falconsai's classifier as a second opinion. The CompVis
checker alone flags many harmless images: as Replicate's FLUX models do, an image is dropped only when the Falcon
classifier, asked about each image CompVis flagged, calls it nsfw too."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import AutoImageProcessor, BaseImageProcessor, CLIPImageProcessor, ViTForImageClassification

from lassie.engine.hardware import DeviceInfo
from lassie.weights.layout import WeightsLayout

log = logging.getLogger(__name__)

NSFW_LABEL = "nsfw"


class AllOutputsFlaggedError(RuntimeError):
    """Nothing is left to return: the user gets the reason and what to try instead of an empty result."""

    def __init__(self, count: int) -> None:
        outputs = "The output was" if count == 1 else f"All {count} outputs were"
        super().__init__(f"{outputs} flagged as NSFW by the safety checker, so nothing can be returned. "
                         "Try a different prompt (or set disable_safety_checker).")


@dataclass
class SafetyFilter:
    """Both models, loaded once at setup and kept on the generation device in its dtype, with their processors."""

    checker: StableDiffusionSafetyChecker
    checker_processor: BaseImageProcessor
    classifier: ViTForImageClassification
    classifier_processor: BaseImageProcessor

    @classmethod
    def load(cls, layout: WeightsLayout, device: DeviceInfo) -> SafetyFilter:
        place = {"device": device.torch_device, "dtype": device.dtype}
        return cls(StableDiffusionSafetyChecker.from_pretrained(layout.compvis_dir).to(**place).eval(),
                   CLIPImageProcessor.from_pretrained(layout.compvis_dir),
                   ViTForImageClassification.from_pretrained(layout.falcon_dir).to(**place).eval(),
                   AutoImageProcessor.from_pretrained(layout.falcon_dir))

    @torch.inference_mode()
    def filter(self, images: list[Image.Image]) -> list[Image.Image]:
        """The images kept, in order: every image unless both models flag it; raises when that leaves nothing."""
        pixels = self.checker_processor(images=images, return_tensors="pt").pixel_values
        # The checker blacks out flagged images in the list it is given: give it copies it may spoil.
        _, flags = self.checker(clip_input=pixels.to(self.checker.device, self.checker.dtype),
                                images=[np.asarray(image) for image in images])
        flagged = [index for index, flag in enumerate(flags) if flag]
        dropped = set()
        if flagged:
            pixels = self.classifier_processor(images=[images[i] for i in flagged], return_tensors="pt").pixel_values
            logits = self.classifier(pixel_values=pixels.to(self.classifier.device, self.classifier.dtype)).logits
            labels = [self.classifier.config.id2label[index] for index in logits.argmax(dim=-1).tolist()]
            dropped = {index for index, label in zip(flagged, labels, strict=True) if label.lower() == NSFW_LABEL}
        log.info("safety: %d of %d outputs flagged by CompVis, %d of those confirmed by Falcon and dropped",
                 len(flagged), len(images), len(dropped))
        if images and len(dropped) == len(images):
            raise AllOutputsFlaggedError(len(images))
        return [image for index, image in enumerate(images) if index not in dropped]
