"""A prediction's image files: written as webp/jpg/png, in one fresh folder per prediction, none left behind. Cog
serves the files after `predict()` returns, so a folder is removed when the next prediction starts, the last at exit.
A killed process cannot do that, so folder names carry the host and process id, and each start removes those of this
host's processes that no longer run (a `$TMPDIR` shared across hosts or pid namespaces keeps the others')."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

PREFIX = "lassie-out-"
PIL_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


def save_images(images: list[Image.Image], output_format: str, quality: int, directory: Path) -> list[Path]:
    """`out-{i}.{ext}`; quality applies to webp and jpg, png is always lossless."""
    directory.mkdir(parents=True, exist_ok=True)
    # libwebp's fastest method 0: about 3x faster than Pillow's default (4) for a few % larger files. zlib's fastest
    # level 1: a 1024x1024 photo encodes about 3.4x faster than at Pillow's default (6), for about 11% larger files
    # (docs/benchmarks.md); still lossless.
    options = {"png": {"compress_level": 1}, "jpg": {"quality": quality},
               "webp": {"quality": quality, "method": 0}}[output_format]
    paths = [directory / f"out-{index}.{output_format}" for index in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        image.convert("RGB").save(path, format=PIL_FORMATS[output_format], **options)
    return paths


def host_prefix() -> str:
    return f"{PREFIX}{socket.gethostname()}-"


def process_runs(pid: int) -> bool:
    """Whether a process with this id exists here (one of another user's counts: it is not ours to judge)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputFolders:
    """This process's current output folder, under the temporary directory as it is when used."""

    def __init__(self) -> None:
        self._current: Path | None = None

    def fresh(self) -> Path:
        """A new, empty folder; the previous prediction's outputs have been served by now."""
        self.remove_current()
        self._current = Path(tempfile.mkdtemp(prefix=f"{host_prefix()}{os.getpid()}-"))
        return self._current

    def remove_current(self) -> None:
        if self._current is not None:
            shutil.rmtree(self._current, ignore_errors=True)
            self._current = None

    @staticmethod
    def remove_leftovers() -> list[Path]:
        """The output folders of this host's processes that no longer run (killed or stopped servers), removed."""
        prefix = host_prefix()
        removed = []
        for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
            pid = folder.name[len(prefix):].split("-", 1)[0]
            if folder.is_dir() and pid.isdigit() and not process_runs(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        if removed:
            log.info("removed %d output folder(s) left by stopped servers in %s", len(removed), tempfile.gettempdir())
        return removed
