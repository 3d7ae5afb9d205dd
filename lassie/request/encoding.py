"""Writing output images as webp / jpg / png files Cog can return."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

PIL_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
# libwebp's fastest method: about 3x faster than Pillow's default (4) for a few % larger files.
WEBP_METHOD = 0
# zlib's fastest level: a 1024x1024 photo encodes about 3.4x faster than at Pillow's default (6), for about 11% larger
# files (docs/benchmarks.md); still lossless.
PNG_COMPRESS_LEVEL = 1


def save_images(images: list[Image.Image], output_format: str, quality: int, directory: Path) -> list[Path]:
    """`out-{i}.{ext}`; quality applies to webp and jpg, png is always lossless."""
    directory.mkdir(parents=True, exist_ok=True)
    options = {"png": {"compress_level": PNG_COMPRESS_LEVEL}, "jpg": {"quality": quality},
               "webp": {"quality": quality, "method": WEBP_METHOD}}[output_format]
    paths = [directory / f"out-{index}.{output_format}" for index in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        image.convert("RGB").save(path, format=PIL_FORMATS[output_format], **options)
    return paths
