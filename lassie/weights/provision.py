"""Setup's weights (`ensure_weights`). Replicate gives a model no Hugging Face token, so LASSIE_WEIGHTS_URL or a
folder's own URL names a tar for each missing or damaged layout folder (`downloads`); without one, the hub (`hub`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from itertools import count
from pathlib import Path

from filelock import FileLock, Timeout

from lassie.settings import FOLDER_URL_ENVS, WEIGHTS_URL_ENV, Settings
from lassie.weights.downloads import STAGING_PREFIX, DownloadError, FetchOptions, fetch_folder
from lassie.weights.hub import provision
from lassie.weights.lassie_lora import lora_origin_problem, provision_lassie_lora
from lassie.weights.layout import (
    LAYOUT_FOLDERS,
    RUN_AGAIN,
    MissingWeightsError,
    ProvisionError,
    WeightsLayout,
    damage_problem,
    damaged_folders,
    fail_on,
    file_problems,
    tiny_weights_hint,
    writing_problem,
)
from lassie.weights.manifest import Manifest, ProvisionReport

log = logging.getLogger(__name__)

FETCH_LOCK = ".fetching.lock"
LOCK_WAIT_REPORT_SECONDS = 10.0


def missing_folders(layout: WeightsLayout, lassie: bool) -> list[str]:
    """The layout folders with anything missing, each fetched whole from its tar."""
    missing = {name.split("/", 1)[0] for name in layout.missing(lassie=lassie)}
    return [folder for folder in LAYOUT_FOLDERS if folder in missing]


def unpacked_problems(unpacked: Path) -> list[str]:
    """Why the unpacked tar at `<staging>/<folder>` may not become that folder: files that fail their check, else
    files the layout needs that it lacks. An empty list lets it go into place."""
    folder = unpacked.name
    lacks = ", ".join(name for name in WeightsLayout(unpacked.parent).missing() if name.startswith(f"{folder}/"))
    expected = f"lacks {lacks}: expected the {folder} folder's files at the tar's root or under one top-level folder"
    return file_problems(unpacked, folder) or ([expected] if lacks else [])


@contextmanager
def fetch_lock(lock_path: Path, report_every: float = LOCK_WAIT_REPORT_SECONDS) -> Iterator[None]:
    """A boot waiting for another process's fetch (a stopped server's worker, a second container) says so every
    `report_every` seconds, naming the pid the holder records beside the lock (filelock records no owner)."""
    lock, holder = FileLock(lock_path), lock_path.with_name(lock_path.name + ".pid")
    for waited in count(report_every, report_every):
        try:
            lock.acquire(timeout=report_every)
            break
        except Timeout:
            pid = ""
            with suppress(OSError):  # it may have none yet, or be letting go
                pid = holder.read_text().strip()
            log.info("waiting for another process's fetch of the weights (lock %s%s); %.0f s so far",
                     lock_path, f", held by pid {pid}" if pid.isdigit() else "", waited)
    try:
        holder.write_text(f"{os.getpid()}\n")
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def fetch_missing_folders(layout: WeightsLayout, settings: Settings, lassie: bool = True,
                          options: FetchOptions | None = None) -> list[str]:
    """Each missing folder, and each damaged one a tar URL names, from its tar; returns them. Others sharing the
    directory wait on its lock, then find them in place; a killed fetch's staging folders are removed under it."""
    unnamed = [folder for folder in missing_folders(layout, lassie) if settings.provision.tar_url(folder) is None]
    own = ", ".join(FOLDER_URL_ENVS[folder] for folder in unnamed if folder in FOLDER_URL_ENVS)
    fail_on([f"{', '.join(unnamed)} missing and no URL names a tar for it: set {WEIGHTS_URL_ENV} (each folder is "
             f"fetched from <{WEIGHTS_URL_ENV}>/<folder>.tar){f' or {own}' if own else ''}" if unnamed else None,
             writing_problem(layout.root)])
    options = options or FetchOptions(deadline_seconds=settings.provision.weights_download_timeout)
    with fetch_lock(layout.root / FETCH_LOCK):
        for leftover in layout.root.glob(f"{STAGING_PREFIX}*"):  # a killed fetch's (or Lassie LoRA install's)
            shutil.rmtree(leftover, ignore_errors=True)
        missing = missing_folders(layout, lassie)
        damaged = {folder: problems for folder, problems in damaged_folders(layout, lassie).items()
                   if settings.provision.tar_url(folder)}
        wanted = [folder for folder in LAYOUT_FOLDERS if folder in missing or folder in damaged]
        for folder in wanted:
            if folder in damaged:
                log.warning("%s is damaged (%s); fetching it again", layout.root / folder, "; ".join(damaged[folder]))
            try:
                fetch_folder(settings.provision.tar_url(folder), layout.root / folder, layout.root, unpacked_problems,
                             options)
            except DownloadError as error:
                raise ProvisionError(f"fetching {layout.root / folder} failed: {error}\n{RUN_AGAIN}") from None
    return wanted


def provision_from_tars(weights_dir: Path, settings: Settings) -> list[str]:
    """scripts/download_weights.py without a token: folders from their tars, the Lassie LoRA from LASSIE_LORA_URL
    where set (else from `<base>/lassie.tar`); a damaged folder no URL names fails it, as it would fail setup."""
    layout = WeightsLayout(Path(weights_dir))
    origin = settings.provision.lora_url
    fail_on([lora_origin_problem(layout, origin) if origin else None])
    fetched = fetch_missing_folders(layout, settings, lassie=origin is None)
    if origin:
        provision_lassie_lora(layout, Manifest.load(layout.manifest), ProvisionReport(), origin, False, settings)
    layout.require_complete()
    fail_on([damage_problem(layout, damaged_folders(layout, lassie=True))])
    return fetched


def ensure_weights(layout: WeightsLayout, settings: Settings) -> None:
    """Nothing to do on a complete directory whose files check (`file_problems`, no hashing); else fetch, unless
    HF_HUB_OFFLINE. weights/lassie/ is needed only when neither COG_WEIGHTS nor LASSIE_LORA_URL names the LoRA. A
    damaged folder is fetched again once where a tar URL names it; else, or still damaged, setup fails naming it."""
    lassie = settings.provision.lassie_origin is None
    damaged = damaged_folders(layout, lassie)
    fail_on([damage_problem(layout, {folder: problems for folder, problems in damaged.items()
                                     if settings.provision.tar_url(folder) is None})])
    missing = layout.missing(lassie=lassie)
    if not missing and not damaged:
        return
    if settings.provision.offline:
        layout.require_complete(lassie=lassie)  # raises, naming every missing file
        fail_on([damage_problem(layout, damaged)])
    if missing:
        log.warning("weights missing (%s); fetching them", ", ".join(missing))
    try:
        if settings.provision.fetches_tars:
            fetch_missing_folders(layout, settings, lassie)
            layout.require_complete(lassie=lassie)
        else:
            log.info(provision(layout.root, settings, lassie=lassie).summary())
    except ProvisionError as error:
        raise ProvisionError(f"{error}\n{tiny_weights_hint()}") from error
    except Exception as error:
        raise MissingWeightsError(f"weights directory {layout.root} is incomplete (missing: {', '.join(missing)}) "
                                  f"and fetching them failed: {error}\n{tiny_weights_hint()}") from error
    fail_on([damage_problem(layout, damaged_folders(layout, lassie))])
