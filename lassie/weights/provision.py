"""The weights directory made complete, at setup (`ensure_weights`) and by scripts/download_weights.py. Replicate gives
a model no Hugging Face token, so each missing or damaged folder comes from the tar LASSIE_WEIGHTS_URL or its own URL
names; else from the hub, one `snapshot_download` per source pinned to the commit first listed, checked, recorded."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from itertools import count
from pathlib import Path

from filelock import FileLock, Timeout
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.utils import filter_repo_objects

from lassie.fetch.files import sha256_of
from lassie.fetch.http import HUB_ERRORS, ProgressLog, hub_problem, human_bytes
from lassie.settings import FOLDER_URL_ENVS, WEIGHTS_URL_ENV, Settings
from lassie.weights.downloads import STAGING_PREFIX, DownloadError, FetchOptions, fetch_folder
from lassie.weights.lassie_lora import lora_origin_problem, provision_lassie_lora
from lassie.weights.layout import (
    LAYOUT_FOLDERS,
    RUN_AGAIN,
    TINY_WEIGHTS_HINT,
    CorruptFileError,
    MissingWeightsError,
    ProvisionError,
    WeightsLayout,
    damage_problem,
    damaged_folders,
    fail_on,
    file_problems,
    writing_problem,
)
from lassie.weights.manifest import FileRecord, Manifest, ProvisionReport, has_size

log = logging.getLogger(__name__)

# Pickled or foreign-framework weights: the layout loads safetensors only.
IGNORED_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data")
FETCH_LOCK = ".fetching.lock"


@dataclass(frozen=True)
class HubSource:
    """Some files of one hub repo, placed in one directory of the weights layout."""

    repo_id: str
    directory: Path
    patterns: tuple[str, ...]
    gated: bool = False


def hub_sources(layout: WeightsLayout) -> tuple[HubSource, ...]:
    """dev in diffusers layout (not its single-file checkpoints), and only what schnell does not share."""
    dev_parts = ("model_index.json", "scheduler/*", "text_encoder/*", "text_encoder_2/*", "tokenizer/*",
                 "tokenizer_2/*", "transformer/*", "vae/*")
    safety_files = ("config.json", "model.safetensors", "preprocessor_config.json")
    return (HubSource("black-forest-labs/FLUX.1-dev", layout.dev_dir, dev_parts, gated=True),
            HubSource("black-forest-labs/FLUX.1-schnell", layout.schnell_dir,
                      ("model_index.json", "scheduler/*", "transformer/*")),
            HubSource("CompVis/stable-diffusion-safety-checker", layout.compvis_dir, safety_files),
            HubSource("Falconsai/nsfw_image_detection", layout.falcon_dir, safety_files))


def gated_message(api: HfApi, repo_id: str) -> str:
    problem = "no Hugging Face token is set" if api.token is None else "the token in HF_TOKEN has no access to it"
    return (f"{repo_id} is gated and {problem}. Accept its license at {api.endpoint}/{repo_id} (logged in to "
            f"Hugging Face), create a read token at {api.endpoint}/settings/tokens and run again with "
            "HF_TOKEN=<that token> in the environment.")


@contextmanager
def explained_hub_errors(source: HubSource, api: HfApi) -> Iterator[None]:
    """A gated repo gets setup's own guidance (its license page, the token to create); any other failure the
    project's one wording of hub errors, and where it may pass, the note that a rerun resumes."""
    try:
        yield
    except HUB_ERRORS as error:
        not_found = isinstance(error, RepositoryNotFoundError)
        if not_found and source.gated:
            raise ProvisionError(gated_message(api, source.repo_id)) from None
        problem = hub_problem(error, f"{source.repo_id} on {api.endpoint}", revision=None,
                              tokens={"HF_TOKEN": api.token} if api.token else {})
        raise ProvisionError(problem if not_found else f"{problem}\n{RUN_AGAIN}") from None


def git_blob_sha1(path: Path) -> str:
    """The id git gives the content (the hub lists it for files outside LFS): sha1 of `blob <size>\\0` and the bytes."""
    header = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as file:
        return hashlib.file_digest(file, lambda: header).hexdigest()


def mismatch_with_hub(path: Path, name: str, remote: RepoSibling) -> tuple[str | None, str]:
    """(what is wrong with the file compared with the hub's listing, its sha256)."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"{name} has {size} bytes but the hub lists {remote.size}", ""
    sha256 = sha256_of(path)
    if remote.lfs is not None and sha256 != remote.lfs.sha256:
        return f"{name} has sha256 {sha256} but the hub lists {remote.lfs.sha256}", sha256
    if remote.lfs is None and remote.blob_id and git_blob_sha1(path) != remote.blob_id:
        return f"{name} does not match the hub's git blob {remote.blob_id}", sha256
    return None, sha256


@dataclass(frozen=True)
class HubPlan:
    """What one source still needs, listed (metadata only) before anything is downloaded."""

    source: HubSource
    commit: str
    files: list[RepoSibling]
    vouched: dict[str, FileRecord]  # recorded at this commit and still on disk (rehashed, with verify)
    bytes_to_fetch: int


def plan_hub_source(source: HubSource, api: HfApi, manifest: Manifest, verify: bool) -> HubPlan:
    """The commit and its files; a token without access to a gated repo fails here. A file on disk that is not what
    the hub lists (a wrong size; with `verify`, a wrong hash) is removed, so that the download fetches it anew."""
    with explained_hub_errors(source, api):
        if source.gated:
            api.auth_check(source.repo_id)  # one small request: is the license accepted?
        pinned = manifest.complete_sources.get(source.repo_id)  # a manifest shipped in the image pins the commit
        info = api.model_info(source.repo_id, revision=pinned, files_metadata=True)
    files = sorted(filter_repo_objects(info.siblings or [], allow_patterns=list(source.patterns),
                                       ignore_patterns=list(IGNORED_PATTERNS), key=lambda remote: remote.rfilename),
                   key=lambda remote: remote.rfilename)
    vouched, missing = {}, 0
    for remote in files:
        path = source.directory / remote.rfilename
        name = manifest.name_of(path)
        problem, sha256 = mismatch_with_hub(path, name, remote) if verify and path.is_file() else (None, "")
        if problem is None and has_size(path, remote.size):
            if (record := manifest.files.get(name)) is not None and record.revision == info.sha:
                vouched[name] = FileRecord(source.repo_id, info.sha, record.size, sha256 or record.sha256)
        elif path.is_file():
            log.info("replacing %s: %s", name, problem or "its size differs from the hub's")
            path.unlink()
        missing += 0 if path.is_file() else remote.size or 0
    return HubPlan(source, info.sha, files, vouched, missing)


def fetch_hub_source(plan: HubPlan, api: HfApi, manifest: Manifest, report: ProvisionReport) -> None:
    """One snapshot_download, then a check of what it fetched; the manifest is written afterwards."""
    source = plan.source
    log.info("%s: %d files, %s to fetch", source.repo_id, len(plan.files), human_bytes(plan.bytes_to_fetch))
    present = {remote.rfilename for remote in plan.files if (source.directory / remote.rfilename).is_file()}
    with explained_hub_errors(source, api):
        api.snapshot_download(source.repo_id, revision=plan.commit, local_dir=source.directory, tqdm_class=ProgressLog,
                              allow_patterns=list(source.patterns), ignore_patterns=list(IGNORED_PATTERNS))
    records, problems = {}, []
    for remote in plan.files:
        path = source.directory / remote.rfilename
        name = manifest.name_of(path)
        problem, sha256 = (None, "") if name in plan.vouched else mismatch_with_hub(path, name, remote)
        if problem is not None:
            path.unlink()
            problems.append(problem)
            continue
        records[name] = plan.vouched.get(name) or FileRecord(source.repo_id, plan.commit, path.stat().st_size, sha256)
        if remote.rfilename in present:
            report.kept.append(name)
        else:
            report.add_fetched(name, path.stat().st_size)
    manifest.record_source(source.repo_id, plan.commit, records, complete=not problems)
    if problems:
        raise CorruptFileError("\n".join(problems) + "; the download was corrupted and has been removed, "
                               "run again to fetch it anew")


def provision(weights_dir: Path, settings: Settings = Settings(), *, verify: bool = False,
              lassie: bool = True) -> ProvisionReport:
    """Brings `weights_dir` to the complete layout; `verify` rehashes every file against the hub's listing. Nothing is
    downloaded before every check passed, those needing no network first; `lassie` False leaves weights/lassie/ be."""
    layout = WeightsLayout(Path(weights_dir))
    origin = settings.provision.lora_url
    api = HfApi(endpoint=settings.lora.hf_endpoint.rstrip("/"),  # HF_TOKEN, else what `hf auth login` stored
                token=settings.lora.tokens.get("HF_TOKEN") or get_token())
    manifest = Manifest.load(layout.manifest)
    report = ProvisionReport()
    pending = []
    for source in hub_sources(layout):
        recorded = {name: record for name, record in manifest.files.items() if record.source == source.repo_id}
        if not verify and source.repo_id in manifest.complete_sources and all(
                has_size(layout.root / name, record.size) for name, record in recorded.items()):
            log.info("%s: all %d files in place", source.repo_id, len(recorded))
            report.kept.extend(recorded)
        else:
            pending.append(source)
    fail_on([lora_origin_problem(layout, origin) if lassie else None, writing_problem(layout.root),
             *(gated_message(api, source.repo_id) for source in pending if source.gated and api.token is None)])
    plans = [plan_hub_source(source, api, manifest, verify) for source in pending]
    needed, free = sum(plan.bytes_to_fetch for plan in plans), shutil.disk_usage(layout.root).free
    fail_on([f"{layout.root} has {human_bytes(free)} free but the files still to fetch need {human_bytes(needed)}: "
             "free some space or give another weights directory" if needed > free else None])
    for plan in plans:
        fetch_hub_source(plan, api, manifest, report)
    if lassie:
        provision_lassie_lora(layout, manifest, report, origin, verify, settings)
    layout.require_complete(lassie=lassie)
    return report


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
def fetch_lock(lock_path: Path, report_every: float = 10.0) -> Iterator[None]:
    """A boot waiting for another process's fetch (a stopped server's worker, a second container) says so every
    `report_every` seconds, naming the pid the holder records beside the lock (filelock records no owner)."""
    lock, holder = FileLock(lock_path), lock_path.with_name(lock_path.name + ".pid")
    for waited in count(report_every, report_every):
        with suppress(Timeout):
            lock.acquire(timeout=report_every)
            break
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
                fetch_folder(settings.provision.tar_url(folder), layout.root / folder, unpacked_problems, options)
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
    HF_HUB_OFFLINE. A damaged folder is fetched again once where a tar URL names it; else, or still damaged, fails."""
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
        raise ProvisionError(f"{error}\n{TINY_WEIGHTS_HINT}") from error
    except Exception as error:
        raise MissingWeightsError(f"weights directory {layout.root} is incomplete (missing: {', '.join(missing)}) "
                                  f"and fetching them failed: {error}\n{TINY_WEIGHTS_HINT}") from error
    fail_on([damage_problem(layout, damaged_folders(layout, lassie))])
