"""Filling the weights directory: FLUX.1 dev and schnell, the safety models and the Lassie LoRA.

Everything that can fail cheaply is checked before the first byte of FLUX is fetched: where the
Lassie LoRA comes from, the Hugging Face token's access to the gated repo, that the directory is
writable, and that its disk has room for what is still to come (the hub lists every file's size).

Each hub source is one `huggingface_hub.snapshot_download` into its directory, pinned to the commit
listed first: the library skips files it already fetched (its metadata lives in each directory's
`.cache/huggingface/`), retries a dropped transfer from where it stopped and checks sizes. What it
fetched is then checked against the hub's listing (LFS sha256 or git blob id), and manifest.json
records, after each source, what came from which repo and commit, with size and sha256. The
manifest is what makes a second run free: a source whose recorded files are all still on disk at
their recorded size is not asked about again, so a provisioned box needs no network; a manifest
shipped without the weights (in the image) pins each repo to the commit it recorded.

Without a token (Replicate gives a model none), LASSIE_WEIGHTS_URL or a folder's own URL names a
tar for each missing layout folder instead (`lassie.weights.downloads`: fetched at full speed, renamed
into place only when complete).

The Lassie LoRA from LASSIE_LORA_URL is installed into weights/lassie/ by `lassie.weights.lassie_lora`,
the path setup uses for COG_WEIGHTS, and recorded here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from filelock import FileLock, Timeout
from huggingface_hub import HfApi, get_token, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.utils import filter_repo_objects

from lassie.fetch.files import UnusableSafetensorsError, inspect_safetensors, sha256_of
from lassie.fetch.http import DownloadLimits, ProgressLog, human_bytes
from lassie.fetch.hub_errors import HUB_ERRORS, hub_problem
from lassie.fetch.storage import write_problem
from lassie.settings import FOLDER_URL_ENVS, LORA_URL_ENV, WEIGHTS_URL_ENV, Settings
from lassie.weights.downloads import STAGING_PREFIX, DownloadError, FetchOptions, fetch_folder, remove_leftovers
from lassie.weights.lassie_lora import (
    OPERATOR_ADDRESSES,
    install,
    limits_for,
    lora_origin_problem,
    public_origin,
    write_trigger_word,
)
from lassie.weights.layout import (
    LAYOUT_FOLDERS,
    PROVIDE_COMMAND,
    RUN_AGAIN,
    CorruptFileError,
    MissingWeightsError,
    ProvisionError,
    WeightsLayout,
    tiny_weights_hint,
)
from lassie.weights.manifest import FileRecord, Manifest, has_size, is_intact

log = logging.getLogger(__name__)

FETCH_LOCK = ".fetching.lock"
LOCK_HOLDER_SUFFIX = ".pid"  # beside a lock: the process id of its holder, written once it holds it
LOCK_WAIT_REPORT_SECONDS = 10.0

# Pickled or foreign-framework weights: the layout loads safetensors only.
IGNORED_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data")


@dataclass
class ProvisionReport:
    fetched: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    bytes_fetched: int = 0

    def add_fetched(self, name: str, size: int) -> None:
        self.fetched.append(name)
        self.bytes_fetched += size

    def summary(self) -> str:
        return (f"fetched {len(self.fetched)} files ({human_bytes(self.bytes_fetched)}), "
                f"{len(self.kept)} already in place")


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
    return (
        HubSource("black-forest-labs/FLUX.1-dev", layout.dev_dir, dev_parts, gated=True),
        HubSource("black-forest-labs/FLUX.1-schnell", layout.schnell_dir,
                  ("model_index.json", "scheduler/*", "transformer/*")),
        HubSource("CompVis/stable-diffusion-safety-checker", layout.compvis_dir, safety_files),
        HubSource("Falconsai/nsfw_image_detection", layout.falcon_dir, safety_files),
    )


def check_safetensors(path: Path, name: str) -> None:
    """The project's one safetensors check: catches truncation and non-safetensors payloads."""
    try:
        inspect_safetensors(path)
    except UnusableSafetensorsError as problem:
        raise CorruptFileError(f"{name} is not a valid safetensors file: {problem}") from None


# --- the hub ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubAccess:
    """Where the hub is and who we are, passed to every huggingface_hub call."""

    endpoint: str
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> HubAccess:
        """HF_TOKEN from the settings, else the token `hf auth login` stored."""
        return cls(settings.provision.hf_endpoint.rstrip("/"), settings.lora.tokens.get("HF_TOKEN") or get_token())

    def api(self) -> HfApi:
        return HfApi(endpoint=self.endpoint, token=self.token)

    def list_files(self, source: HubSource, revision: str | None) -> tuple[str, list[RepoSibling]]:
        """The commit and the wanted files, with the sizes and hashes to check them against."""
        info = self.api().model_info(source.repo_id, revision=revision, files_metadata=True)
        wanted = filter_repo_objects(info.siblings or [], allow_patterns=list(source.patterns),
                                     ignore_patterns=list(IGNORED_PATTERNS), key=lambda sibling: sibling.rfilename)
        return info.sha, sorted(wanted, key=lambda sibling: sibling.rfilename)

    def check_access(self, source: HubSource) -> None:
        """One small request: a gated repo whose license the token has not accepted fails here."""
        self.api().auth_check(source.repo_id)

    def download(self, source: HubSource, commit: str) -> None:
        snapshot_download(source.repo_id, revision=commit, local_dir=source.directory,
                          allow_patterns=list(source.patterns), ignore_patterns=list(IGNORED_PATTERNS),
                          endpoint=self.endpoint, token=self.token, tqdm_class=ProgressLog)

    def gated_message(self, repo_id: str) -> str:
        page = f"{self.endpoint}/{repo_id}"
        if self.token is None:
            problem = f"{repo_id} is gated and no Hugging Face token is set."
        else:
            problem = f"{repo_id} is gated and the token in HF_TOKEN has no access to it."
        return (f"{problem} Accept its license at {page} (logged in to Hugging Face), create a read token "
                f"at {self.endpoint}/settings/tokens and run again with HF_TOKEN=<that token> in the environment.")


@contextmanager
def explained_hub_errors(source: HubSource, access: HubAccess) -> Iterator[None]:
    """A gated repo gets setup's own guidance (its license page, the token to create); any other
    failure the project's one wording of hub errors, and a rerun resumes."""
    try:
        yield
    except RepositoryNotFoundError as error:
        if source.gated:
            raise ProvisionError(access.gated_message(source.repo_id)) from None
        raise ProvisionError(hub_problem_of(source, access, error)) from None
    except HUB_ERRORS as error:
        raise ProvisionError(f"{hub_problem_of(source, access, error)}\n{RUN_AGAIN}") from None


def hub_problem_of(source: HubSource, access: HubAccess, error: BaseException) -> str:
    tokens = {"HF_TOKEN": access.token} if access.token else {}
    return hub_problem(error, f"{source.repo_id} on {access.endpoint}", revision=None,
                       has_token=bool(access.token), tokens=tokens)


def is_in_place(source: HubSource, manifest: Manifest) -> bool:
    """A source whose recorded files are all on disk is not asked about again: no network needed."""
    root = manifest.path.parent
    return source.repo_id in manifest.complete_sources and all(
        has_size(root / name, record.size) for name, record in manifest.files_from(source.repo_id).items())


def token_problem(source: HubSource, access: HubAccess) -> str | None:
    return access.gated_message(source.repo_id) if source.gated and access.token is None else None


def git_blob_sha1(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """The id git gives the file's content (what the hub lists for files outside LFS): sha1 of
    `blob <size>\\0` and the bytes, read in chunks."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


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


def plan_hub_source(source: HubSource, access: HubAccess, manifest: Manifest, verify: bool) -> HubPlan:
    """The commit to fetch from and its files; a token without access to a gated repo fails here.

    A file on disk that is not what the hub lists (a wrong size; with `verify`, a wrong hash) is
    removed, so that the download fetches it anew.
    """
    with explained_hub_errors(source, access):
        if source.gated:
            access.check_access(source)
        # A manifest that came with the image pins each repo to the commit it recorded.
        commit, remote_files = access.list_files(source, manifest.complete_sources.get(source.repo_id))
    vouched = {}
    for remote in remote_files:
        path = source.directory / remote.rfilename
        name = manifest.name_of(path)
        record = manifest.files.get(name)
        if not path.is_file():
            continue
        problem, sha256 = mismatch_with_hub(path, name, remote) if verify else (None, "")
        if problem is None and has_size(path, remote.size) and record is not None and record.revision == commit:
            vouched[name] = FileRecord(source.repo_id, commit, record.size, sha256 or record.sha256)
        elif problem is not None or not has_size(path, remote.size):
            log.info("replacing %s: %s", name, problem or "its size differs from the hub's")
            path.unlink()
    missing = sum(remote.size or 0 for remote in remote_files if not (source.directory / remote.rfilename).is_file())
    return HubPlan(source, commit, remote_files, vouched, missing)


def fetch_hub_source(plan: HubPlan, access: HubAccess, manifest: Manifest, report: ProvisionReport) -> None:
    """One snapshot_download, then a check of what it fetched; the manifest is written afterwards."""
    source = plan.source
    log.info("%s: %d files, %s to fetch", source.repo_id, len(plan.files), human_bytes(plan.bytes_to_fetch))
    present = {remote.rfilename for remote in plan.files if (source.directory / remote.rfilename).is_file()}
    with explained_hub_errors(source, access):
        access.download(source, plan.commit)
    records, problems = {}, []
    for remote in plan.files:
        path = source.directory / remote.rfilename
        name = manifest.name_of(path)
        if name in plan.vouched:
            records[name] = plan.vouched[name]
            report.kept.append(name)
            continue
        problem, sha256 = mismatch_with_hub(path, name, remote)
        if problem is not None:
            path.unlink()
            problems.append(problem)
            continue
        records[name] = FileRecord(source.repo_id, plan.commit, path.stat().st_size, sha256)
        if remote.rfilename in present:
            report.kept.append(name)
        else:
            report.add_fetched(name, path.stat().st_size)
    manifest.record_source(source.repo_id, plan.commit, records, complete=not problems)
    if problems:
        raise CorruptFileError("\n".join(problems) + "; the download was corrupted and has been removed, "
                               "run again to fetch it anew")


# --- the Lassie LoRA into weights/lassie/ (lassie.weights.lassie_lora installs it) -------------


def provision_lassie_lora(layout: WeightsLayout, manifest: Manifest, report: ProvisionReport, origin: str | None,
                          verify: bool, limits: DownloadLimits | None = None) -> None:
    """Installs the LoRA from `origin` (see lora_origin_problem) and records it; no origin, or the
    one recorded from it still whole, keeps the one in place."""
    name = manifest.name_of(layout.lassie_lora)
    record = manifest.files.get(name)
    if not origin or (record is not None and record.source == public_origin(origin)
                      and is_intact(layout.lassie_lora, record, verify)):
        report.kept.append(name)
        return
    install(origin, layout.lassie_dir, LORA_URL_ENV, limits or DownloadLimits(rule=OPERATOR_ADDRESSES))
    size = layout.lassie_lora.stat().st_size
    report.add_fetched(name, size)
    manifest.record(layout.lassie_lora, FileRecord(public_origin(origin), None, size, sha256_of(layout.lassie_lora)))


# --- entry points -------------------------------------------------------------------------------


def writing_problem(root: Path) -> str | None:
    problem = write_problem(root)
    return None if problem is None else f"cannot write to the weights directory {root}: {problem}"


def space_problem(root: Path, plans: list[HubPlan]) -> str | None:
    needed = sum(plan.bytes_to_fetch for plan in plans)
    free = shutil.disk_usage(root).free
    if needed <= free:
        return None
    return (f"{root} has {human_bytes(free)} free but the files still to fetch need {human_bytes(needed)}: "
            "free some space or give another weights directory")


def fail_on(problems: list[str | None]) -> None:
    """All problems found at once, so one rerun can fix them all."""
    found = [problem for problem in problems if problem]
    if found:
        raise ProvisionError("\n".join(found))


def provision(weights_dir: Path, settings: Settings = Settings(), *, verify: bool = False,
              lassie: bool = True) -> ProvisionReport:
    """Brings `weights_dir` to the complete layout; `verify` rehashes every file against the hub's listing.

    Nothing is downloaded until every check passed: first those needing no network (LoRA origin,
    writable directory, a token for the gated repo), then the hub's listings (token access, sizes
    against free space). The LoRA, small, is fetched last; `lassie` False leaves weights/lassie/
    alone (the Lassie LoRA comes from COG_WEIGHTS or LASSIE_LORA_URL at setup instead).
    """
    layout = WeightsLayout(Path(weights_dir))
    origin = settings.provision.lora_url
    access = HubAccess.from_settings(settings)
    manifest = Manifest.load(layout.manifest)
    report = ProvisionReport()
    pending = []
    for source in hub_sources(layout):
        if not verify and is_in_place(source, manifest):
            log.info("%s: all %d files in place", source.repo_id, len(manifest.files_from(source.repo_id)))
            report.kept.extend(manifest.files_from(source.repo_id))
        else:
            pending.append(source)
    fail_on([lora_origin_problem(layout, origin) if lassie else None, writing_problem(layout.root),
             *(token_problem(source, access) for source in pending)])
    plans = [plan_hub_source(source, access, manifest, verify) for source in pending]
    fail_on([space_problem(layout.root, plans)])
    for plan in plans:
        fetch_hub_source(plan, access, manifest, report)
    if lassie:
        limits = limits_for(settings)
        provision_lassie_lora(layout, manifest, report, origin, verify, limits)
        write_trigger_word(layout, settings.provision.trigger_word)
    layout.require_complete(lassie=lassie)
    return report


# --- weights from tar URLs (no token) -----------------------------------------------------------


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


def layout_files(folder: Path) -> list[Path]:
    """The files of a layout folder, without hidden folders (huggingface_hub's `.cache/` metadata)."""
    found = []
    for parent, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        found += [Path(parent, name) for name in sorted(files)]
    return found


def file_problems(folder: Path, name: str) -> list[str]:
    """What is wrong with the files of a layout folder, cheap enough for every start (no hashing):
    each JSON file parses, each safetensors header parses and its tensors fit the file's size."""
    problems = []
    for path in layout_files(folder):
        shown = f"{name}/{path.relative_to(folder).as_posix()}"
        try:
            if path.suffix == ".json":
                json.loads(path.read_bytes())
            elif path.suffix == ".safetensors":
                inspect_safetensors(path)
        except UnusableSafetensorsError as problem:
            problems.append(f"{shown} is not a usable .safetensors file: {problem}")
        except ValueError as error:
            problems.append(f"{shown} is not valid JSON ({error})")
        except OSError as error:
            problems.append(f"{shown} cannot be read ({error.strerror or error})")
    return problems


def damaged_folders(layout: WeightsLayout, lassie: bool) -> dict[str, list[str]]:
    """The layout folders in place whose files fail their check (a 0-byte or cut safetensors, a
    JSON file that does not parse), with what is wrong."""
    wanted = [folder for folder in LAYOUT_FOLDERS if (lassie or folder != "lassie") and (layout.root / folder).is_dir()]
    found = {folder: file_problems(layout.root / folder, folder) for folder in wanted}
    return {folder: problems for folder, problems in found.items() if problems}


def damage_problem(layout: WeightsLayout, damaged: dict[str, list[str]]) -> str | None:
    """Setup's refusal of damaged folders it cannot fetch again (no tar URL names them, or offline)."""
    if not damaged:
        return None
    described = "\n".join(f"{layout.root / folder} is damaged: {'; '.join(problems)}"
                           for folder, problems in damaged.items())
    return (f"{described}\nSet {WEIGHTS_URL_ENV} (or the folder's own URL) to fetch it again from its tar, or remove "
            f"it and run `{PROVIDE_COMMAND} {layout.root}`.")


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
        limits = limits_for(settings)
        provision_lassie_lora(layout, Manifest.load(layout.manifest), ProvisionReport(), origin, False, limits)
        write_trigger_word(layout, settings.provision.trigger_word)
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
