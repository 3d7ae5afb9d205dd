"""Writing output images as webp / jpg / png files Cog can return."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

PIL_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
# libwebp's fastest method: about 3x faster than Pillow's default (4) for a few % larger files.
WEBP_METHOD = 0


def save_images(images: list[Image.Image], output_format: str, quality: int, directory: Path) -> list[Path]:
    """`out-{i}.{ext}`; quality applies to webp and jpg, png is always lossless."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = directory / f"out-{index}.{output_format}"
        options = {"png": {}, "jpg": {"quality": quality}, "webp": {"quality": quality, "method": WEBP_METHOD}}
        image.convert("RGB").save(path, format=PIL_FORMATS[output_format], **options[output_format])
        paths.append(path)
    return paths
