"""Cog adapter: the public input schema, and one call into `lassie`.

`BasePredictor.predict` is understood by every cog release (0.23 logs a deprecation notice for
these names; newer names would crash older CLIs on GPU boxes). It is async so that cog.yaml's
`concurrency.max` can give the server two slots: a client's next request never meets the slot
coglet has not freed yet (HTTP 409), while `SerialRunner` still runs one prediction at a time.

Bounds and choices are written as literals: `cog build` makes the schema by reading this file as
text (static schema generation), and drops a `ge`/`le` it cannot read as a number. A test checks
that they are literals and equal `lassie.request.bounds`, the table request validation and sizes use.
"""

import logging
from functools import partial

from lassie.settings import Settings  # first: it records the operator's environment before torch rewrites it

# isort: split
# (isort would put quiet before settings; settings must be imported first, for the reason above.)
from lassie.quiet import silence_known_noise

silence_known_noise()  # first: torch, torchao and transformers print their known noise as they are imported

from cog import BasePredictor, CancelationException, Input, Path

from lassie.predictor import Lassie
from lassie.request.images import request_file
from lassie.request.plan import Request
from lassie.serial import SerialRunner


class Predictor(BasePredictor):
    def setup(self, weights: str | None = None) -> None:
        """`weights` is COG_WEIGHTS as cog passes it (a fine-tuned version's LoRA, usually a tar URL)."""
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        self.runner = SerialRunner(interrupt=CancelationException)
        self.lassie = Lassie(Settings.from_env(cog_weights=weights))  # the one read of the environment
        self.runner.run_now(self.lassie.setup)

    async def predict(
        self,
        prompt: str = Input(
            description="Prompt for generated image. If you include the `trigger_word` used in the training process you are more likely to activate the trained object, style, or concept in the resulting image.",
        ),
        image: Path | None = Input(
            description="Input image for image to image or inpainting mode. If provided, aspect_ratio, width, and height inputs are ignored.",
            default=None,
        ),
        mask: Path | None = Input(
            description="Image mask for image inpainting mode. If provided, aspect_ratio, width, and height inputs are ignored.",
            default=None,
        ),
        aspect_ratio: str = Input(
            description="Aspect ratio for the generated image. If custom is selected, uses height and width below & will run in bf16 mode",
            choices=["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21", "custom"],
            default="1:1",
        ),
        height: int | None = Input(
            description="Height of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to nearest multiple of 16. Incompatible with fast generation",
            ge=256,
            le=1440,
            default=None,
        ),
        width: int | None = Input(
            description="Width of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to nearest multiple of 16. Incompatible with fast generation",
            ge=256,
            le=1440,
            default=None,
        ),
        prompt_strength: float = Input(
            description="Prompt strength when using img2img. 1.0 corresponds to full destruction of information in image",
            ge=0,
            le=1,
            default=0.8,
        ),
        model: str = Input(
            description="Which model to run inference with. The dev model performs best with around 28 inference steps but the schnell model only needs 4 steps.",
            choices=["dev", "schnell"],
            default="dev",
        ),
        num_outputs: int = Input(
            description="Number of outputs to generate",
            ge=1,
            le=4,
            default=1,
        ),
        num_inference_steps: int = Input(
            description="Number of denoising steps. More steps can give more detailed images, but take longer.",
            ge=1,
            le=50,
            default=28,
        ),
        guidance_scale: float = Input(
            description="Guidance scale for the diffusion process. Lower values can give more realistic images. Good values to try are 2, 2.5, 3 and 3.5",
            ge=0,
            le=10,
            default=3.0,
        ),
        seed: int | None = Input(description="Random seed. Set for reproducible generation", default=None),
        output_format: str = Input(
            description="Format of the output images",
            choices=["webp", "jpg", "png"],
            default="webp",
        ),
        output_quality: int = Input(
            description="Quality when saving the output images, from 0 to 100. 100 is best quality, 0 is lowest quality. Not relevant for .png outputs",
            ge=0,
            le=100,
            default=80,
        ),
        disable_safety_checker: bool = Input(
            description="Disable safety checker for generated images.",
            default=False,
        ),
        go_fast: bool = Input(
            description="Run faster predictions with model optimized for speed (currently fp8 quantized); disable to run in original bf16",
            default=False,
        ),
        megapixels: str = Input(
            description="Approximate number of megapixels for generated image",
            choices=["1", "0.25"],
            default="1",
        ),
        lora_scale: float = Input(
            description="Determines how strongly the main LoRA should be applied. Sane results between 0 and 1 for base inference. For go_fast we apply a 1.5x multiplier to this value; we've generally seen good performance when scaling the base value by that amount. You may still need to experiment to find the best value for your particular lora.",
            ge=-1,
            le=3,
            default=1.0,
        ),
        extra_lora: str | None = Input(
            description="Load LoRA weights. Supports Replicate models in the format <owner>/<username> or <owner>/<username>/<version>, HuggingFace URLs in the format huggingface.co/<owner>/<model-name>, CivitAI URLs in the format civitai.com/models/<id>[/<model-name>], or arbitrary .safetensors URLs from the Internet. For example, 'fofr/flux-pixar-cars'",
            default=None,
        ),
        extra_lora_scale: float = Input(
            description="Determines how strongly the extra LoRA should be applied. Sane results between 0 and 1 for base inference. For go_fast we apply a 1.5x multiplier to this value; we've generally seen good performance when scaling the base value by that amount. You may still need to experiment to find the best value for your particular lora.",
            ge=-1,
            le=3,
            default=1.0,
        ),
    ) -> list[Path]:
        request = Request(
            prompt=prompt,
            image=request_file(image, "image"),
            mask=request_file(mask, "mask"),
            aspect_ratio=aspect_ratio,
            height=height,
            width=width,
            prompt_strength=prompt_strength,
            model=model,
            num_outputs=num_outputs,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            output_format=output_format,
            output_quality=output_quality,
            disable_safety_checker=disable_safety_checker,
            go_fast=go_fast,
            megapixels=megapixels,
            lora_scale=lora_scale,
            extra_lora=extra_lora,
            extra_lora_scale=extra_lora_scale,
        )
        prepared = await self.runner.run_aside(partial(self.lassie.prepare, request))
        try:
            paths = await self.runner.run(partial(self.lassie.predict_prepared, prepared))
        finally:  # done, failed, or cancelled while it waited in line or ran
            prepared.release()
        return [Path(path) for path in paths]
