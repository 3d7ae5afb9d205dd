"""What several test modules use (fixtures they share are in conftest.py); no test module imports another.

LoRA files (every LoRA a test uses comes from `make_tiny_weights.random_lora`, the builder of the tiny
Lassie LoRA itself), Replicate-style tars, data URIs, predictor runs beside diffusers' own pipeline,
safety models made to flag deterministically, and the messages of library loggers.
"""

from __future__ import annotations

import base64
import io
import logging
import shutil
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import save
from transformers import CLIPImageProcessor, ViTForImageClassification

import make_tiny_weights
from lassie.request.plan import Mode, Request
from lassie.weights.layout import WeightsLayout

# --- LoRA files and tars ------------------------------------------------------------------------

LORA_METADATA = {"format": "pt"}


def make_lora(seed: int = 0) -> bytes:
    """A small, sound LoRA file for tests where only its bytes matter (fetching, caching, checking).

    Rank 2 on two 8-wide linears: 4 tensors, under 1 kB; its content varies with `seed`.
    """
    linears = {f"transformer_blocks.0.{module}": (8, 8) for module in ("attn.to_q", "attn.to_k")}
    return save(make_tiny_weights.random_lora(linears, seed, rank=2, scale=1.0), metadata=LORA_METADATA)


@cache
def tiny_lassie_linears() -> dict[str, tuple[int, int]]:
    """The sizes of the linears the Lassie LoRA adapts in the tiny dev transformer."""
    transformer = make_tiny_weights.tiny_transformer(guidance_embeds=True, seed=0)
    return make_tiny_weights.linear_sizes(transformer, make_tiny_weights.lassie_targets(transformer))


def tiny_lora(seed: int, only: tuple[str, ...] = (), rank: int = make_tiny_weights.LORA_RANK) -> bytes:
    """An extra LoRA for the tiny transformers, shaped like the Lassie LoRA; `only` keeps just the
    modules whose names contain one of these."""
    linears = {name: size for name, size in tiny_lassie_linears().items()
               if not only or any(part in name for part in only)}
    return save(make_tiny_weights.random_lora(linears, seed, rank=rank), metadata=LORA_METADATA)


def make_tar(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A tar of regular files plus symbolic links (name -> target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


# --- images through the Cog server --------------------------------------------------------------

def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def decode(uri: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    image.load()
    return image


# --- the predictor beside diffusers' own pipelines ----------------------------------------------

STEPS = 2
SIZE = {"megapixels": "0.25"}


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def run(predictor, **fields) -> list[np.ndarray]:
    """The predictor's images for a request (2 steps, 0.25 MP, seed 7, png unless `fields` say otherwise)."""
    fields = {"prompt": "a photo of LSSIE", "num_inference_steps": STEPS, "seed": 7, "output_format": "png",
              **SIZE, **fields}
    return [pixels(path) for path in predictor.predict(Request(**fields))]


def reference_images(pipe, **arguments) -> list[np.ndarray]:
    """A diffusers pipeline's images for the request `run` sends by default (512x512 is 0.25 MP)."""
    arguments = {"prompt": "a photo of LSSIE", "num_inference_steps": STEPS, "guidance_scale": 3.0,
                 "width": 512, "height": 512, "max_sequence_length": 512,
                 "generator": torch.Generator("cpu").manual_seed(7), **arguments}
    return [np.asarray(image) for image in pipe(**arguments).images]


# With LASSIE_MERGE_LASSIE the Lassie LoRA is merged into the predictor's weights (W + dW) where
# diffusers adds it beside them (Wx + dWx): float32 sums in another order, which moves an 8-bit
# pixel by one level on about 1 value in 30,000 at these sizes. Anything more is a real difference.
ROUNDED_LEVELS = 1
ROUNDED_SHARE = 1e-3


def assert_equal_but_for_rounding(actual: np.ndarray, expected: np.ndarray) -> None:
    """8-bit images equal up to float32 rounding: at most one level, on at most 0.1% of values."""
    assert actual.shape == expected.shape
    difference = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= ROUNDED_LEVELS and (difference > 0).mean() <= ROUNDED_SHARE, \
        (difference.max(), (difference > 0).mean())


def running_adapters(transformer: torch.nn.Module) -> set[str]:
    """The adapters a forward pass computes on the transformer's LoRA layers (PEFT's `active_adapters()`
    still lists adapters after `disable_lora`)."""
    return {name for layer in transformer.modules() if isinstance(layer, LoraLayer) and not layer.disable_adapters
            for name in layer.active_adapters if name in layer.lora_A}


def dev_float_image(lassie) -> np.ndarray:
    """The float image of the dev txt2img pipeline with the adapters active now (256x256, 2 steps, seed 7):
    finer than 8-bit files for comparing LoRAs."""
    pipeline = lassie.models.pipeline("dev", Mode.TXT2IMG)
    return pipeline(prompt="a photo of LSSIE", width=256, height=256, num_inference_steps=2, guidance_scale=3.0,
                    generator=torch.Generator("cpu").manual_seed(7), output_type="np").images[0]


# --- safety models made to flag ------------------------------------------------------------------
# CompVis flags an image when its embedding's cosine to a concept embedding exceeds that concept's
# threshold; Falcon's verdict is its classifier's argmax. Both are set through the models' own
# parameters, then saved where setup loads the real ones.

NEVER = 2.0  # above any cosine: the concept never fires
ALWAYS = -2.0  # below any cosine: the concept always fires


def sample_images() -> list[Image.Image]:
    noise = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    colours = ((200, 30, 30), (30, 200, 30), (30, 30, 200))
    return [Image.new("RGB", (64, 48), colour) for colour in colours] + [Image.fromarray(noise)]


def image_embeddings(checker: StableDiffusionSafetyChecker, processor: CLIPImageProcessor,
                     images: list[Image.Image]) -> torch.Tensor:
    pixel_values = processor(images=images, return_tensors="pt").pixel_values
    pooled = checker.vision_model(pixel_values)[1]
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


# --- library logs -------------------------------------------------------------------------------

@contextmanager
def library_log(*logger_names: str) -> Iterator[list[str]]:
    """Every message that reaches these library loggers' handlers (diffusers and transformers
    keep their own handlers and do not propagate to the root logger that caplog watches)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    for name in logger_names:
        logging.getLogger(name).addHandler(handler)
    try:
        yield messages
    finally:
        for name in logger_names:
            logging.getLogger(name).removeHandler(handler)


# --- weights as tars (Replicate's weights host, COG_WEIGHTS) -------------------------------------

def folder_tar(folder, top: str | None = None) -> bytes:
    """A tar of `folder`'s files, at its root or under one top-level folder `top` (as Replicate's
    `FLUX.1-dev/...` tar)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                name = path.relative_to(folder).as_posix()
                tar.add(path, arcname=f"{top}/{name}" if top else name)
    return buffer.getvalue()


def training_output_tar(lora: bytes, trigger_word: str = "LSSIE") -> bytes:
    """Shaped like Replicate's FLUX trainer output: the LoRA deep in a folder, beside its config
    (which names the trigger word) and captions."""
    folder = "output/flux_train_replicate"
    return make_tar({f"{folder}/config.yaml": f"config:\n  process:\n    - trigger_word: \"{trigger_word}\"\n".encode(),
                     f"{folder}/captions/1.txt": f"a photo of {trigger_word}".encode(),
                     f"{folder}/lora.safetensors": lora})
