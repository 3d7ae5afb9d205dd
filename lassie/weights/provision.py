"""Setup's weights (`ensure_weights`) and the weights folders from tars, for a box with no token.

Replicate gives a model no Hugging Face token, so LASSIE_WEIGHTS_URL or a folder's own URL names a
tar for each missing layout folder (`lassie.weights.downloads`: fetched at full speed, renamed into
place only when complete); without one, the Hugging Face hub fills the directory
(`lassie.weights.hub`). The Lassie LoRA from LASSIE_LORA_URL goes into weights/lassie/ by
`lassie.weights.lassie_lora`, the path setup also uses for COG_WEIGHTS.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from filelock import FileLock, Timeout

from lassie.settings import FOLDER_URL_ENVS, WEIGHTS_URL_ENV, Settings
from lassie.weights.downloads import STAGING_PREFIX, DownloadError, FetchOptions, fetch_folder, remove_leftovers
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
LOCK_HOLDER_SUFFIX = ".pid"  # beside a lock: the process id of its holder, written once it holds it
LOCK_WAIT_REPORT_SECONDS = 10.0


def missing_folders(layout: WeightsLayout, lassie: bool) -> list[str]:
    """The layout folders with anything missing, each fetched whole from its tar."""
    missing = {name.split("/", 1)[0] for name in layout.missing(lassie=lassie)}
    return [folder for folder in LAYOUT_FOLDERS if folder in missing]


def unpacked_lacks(folder: str, unpacked: Path) -> list[str]:
    """What the layout needs from `folder` that the unpacked tar at `unpacked` lacks."""
    with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=unpacked.parent) as probe:
        (Path(probe) / folder).parent.mkdir(parents=True, exist_ok=True)
        (Path(probe) / folder).symlink_to(unpacked.resolve(), target_is_directory=True)
        return [name for name in WeightsLayout(Path(probe)).missing() if name.startswith(f"{folder}/")]


def unpacked_problems(folder: str, unpacked: Path) -> list[str]:
    """Why the unpacked tar at `unpacked` may not become `folder`: files that fail their check,
    else files the layout needs that it lacks. An empty list lets it go into place."""
    problems = file_problems(unpacked, folder)
    if problems:
        return problems
    lacks = unpacked_lacks(folder, unpacked)
    return [f"lacks {', '.join(lacks)}: expected the {folder} folder's files at the tar's root or under one "
            "top-level folder"] if lacks else []


def tar_urls_problem(settings: Settings, folders: list[str]) -> str | None:
    unnamed = [folder for folder in folders if settings.provision.tar_url(folder) is None]
    if not unnamed:
        return None
    own = ", ".join(FOLDER_URL_ENVS[folder] for folder in unnamed if folder in FOLDER_URL_ENVS)
    return (f"{', '.join(unnamed)} missing and no URL names a tar for it: set {WEIGHTS_URL_ENV} "
            f"(each folder is fetched from <{WEIGHTS_URL_ENV}>/<folder>.tar){f' or {own}' if own else ''}")


def lock_holder(lock_path: Path) -> str:
    """The pid the lock's holder recorded, as text for a log line ("" when it recorded none)."""
    try:
        pid = lock_path.with_name(lock_path.name + LOCK_HOLDER_SUFFIX).read_text().strip()
    except OSError:
        return ""
    return f", held by pid {pid}" if pid.isdigit() else ""


@contextmanager
def fetch_lock(lock_path: Path, report_every: float = LOCK_WAIT_REPORT_SECONDS) -> Iterator[None]:
    """The directory's fetch lock. A boot that must wait for another process's fetch (one still
    downloading after its server was stopped, or a second container) says so every `report_every`
    seconds instead of sitting silent; the holder records its pid beside the lock for that line."""
    lock = FileLock(lock_path)
    waited = 0.0
    while True:
        try:
            lock.acquire(timeout=report_every)
            break
        except Timeout:
            waited += report_every
            log.info("waiting for another process's fetch of the weights (lock %s%s); %.0f s so far",
                     lock_path, lock_holder(lock_path), waited)
    holder = lock_path.with_name(lock_path.name + LOCK_HOLDER_SUFFIX)
    try:
        holder.write_text(f"{os.getpid()}\n")
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def fetch_missing_folders(layout: WeightsLayout, settings: Settings, lassie: bool = True,
                          options: FetchOptions | None = None) -> list[str]:
    """Each missing layout folder from its tar, and each damaged one that has a tar URL, renamed into
    place only when every file checks; returns the folders fetched.

    A lock on the directory lets one process fetch while others sharing the directory wait and
    then find the folders in place; staging folders of a killed fetch are removed under it.
    """
    fail_on([tar_urls_problem(settings, missing_folders(layout, lassie)), writing_problem(layout.root)])
    options = options or FetchOptions(deadline_seconds=settings.provision.weights_download_timeout)
    fetched = []
    with fetch_lock(layout.root / FETCH_LOCK):
        remove_leftovers(layout.root)
        missing = missing_folders(layout, lassie)
        damaged = {folder: problems for folder, problems in damaged_folders(layout, lassie).items()
                   if settings.provision.tar_url(folder)}
        for folder in [folder for folder in LAYOUT_FOLDERS if folder in missing or folder in damaged]:
            if folder in damaged:
                log.warning("%s is damaged (%s); fetching it again", layout.root / folder, "; ".join(damaged[folder]))
            url = settings.provision.tar_url(folder)
            try:
                fetch_folder(url, layout.root / folder, layout.root, partial(unpacked_problems, folder), options)
            except DownloadError as error:
                raise ProvisionError(f"fetching {layout.root / folder} failed: {error}\n{RUN_AGAIN}") from None
            fetched.append(folder)
    return fetched


def provision_from_tars(weights_dir: Path, settings: Settings) -> list[str]:
    """scripts/download_weights.py without a token: the missing (or damaged) folders from their tars,
    and the Lassie LoRA from LASSIE_LORA_URL when set (else weights/lassie/ from `<base>/lassie.tar`);
    a damaged folder no URL names fails it, as it would fail setup."""
    layout = WeightsLayout(Path(weights_dir))
    origin = settings.provision.lora_url
    fail_on([lora_origin_problem(layout, origin) if origin else None])
    fetched = fetch_missing_folders(layout, settings, lassie=origin is None)
    if origin:
        provision_lassie_lora(layout, Manifest.load(layout.manifest), ProvisionReport(), origin, False, settings)
    layout.require_complete()
    fail_on([damage_problem(layout, damaged_folders(layout, lassie=True))])
    return fetched


# --- setup ----------------------------------------------------------------------------------------


def ensure_weights(layout: WeightsLayout, settings: Settings) -> None:
    """What setup() calls: nothing to do on a complete directory whose files check; otherwise fetch,
    unless HF_HUB_OFFLINE.

    Missing folders come as tars where LASSIE_WEIGHTS_URL or a folder's own URL is set (no token
    needed), else from the Hugging Face hub. weights/lassie/ is needed only when neither
    COG_WEIGHTS nor LASSIE_LORA_URL names the Lassie LoRA. A folder in place whose files fail their
    check (`file_problems`: headers and sizes, no hashing) is fetched again once where a tar URL
    names it; otherwise, or if it is still damaged, setup fails naming it and what is wrong.
    """
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
