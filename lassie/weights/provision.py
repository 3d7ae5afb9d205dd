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

The Lassie LoRA comes through the downloader and tar rule extra LoRAs use (`lassie.fetch.http`,
`lassie.fetch.files`), with the operator's address trusted: LASSIE_LORA_URL and COG_WEIGHTS may be
private mirrors. At setup COG_WEIGHTS wins over LASSIE_LORA_URL, which wins over weights/lassie/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx2
from filelock import FileLock, Timeout
from huggingface_hub import HfApi, get_token, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils.sha import git_hash

from lassie.fetch.files import (
    UnusableArchiveError,
    UnusableSafetensorsError,
    inspect_safetensors,
    safetensors_from_tar,
    sha256_of,
)
from lassie.fetch.http import AddressRule, DownloadLimits, ProgressLog, download_file, human_bytes, redact_url
from lassie.fetch.hub_errors import HUB_ERRORS, hub_problem
from lassie.fetch.storage import writable_place, write_problem
from lassie.request.errors import InputError
from lassie.settings import FOLDER_URL_ENVS, LORA_URL_ENV, WEIGHTS_URL_ENV, Settings
from lassie.weights.downloads import STAGING_PREFIX, DownloadError, FetchOptions, fetch_folder, remove_leftovers
from lassie.weights.layout import LAYOUT_FOLDERS, MissingWeightsError, WeightsLayout, tiny_weights_hint

log = logging.getLogger(__name__)

LORA_MEMBER = "lora.safetensors"
TRIGGER_WORD_MEMBER = "trigger_word.txt"
COG_WEIGHTS_ENV = "COG_WEIGHTS"
FETCHED_LORA_DIRNAME = "fetched-lora"
FETCH_LOCK = ".fetching.lock"
LOCK_HOLDER_SUFFIX = ".pid"  # beside a lock: the process id of its holder, written once it holds it
LOCK_WAIT_REPORT_SECONDS = 10.0
MAX_TEXT_MEMBER_BYTES = 1024**2
# Replicate's FLUX trainer (ai-toolkit) writes `trigger_word: TOK` into the config.yaml of its output tar.
CONFIG_TRIGGER_WORD = re.compile(r"""^[\s-]*trigger_word:\s*["']?([^"'#\n]+?)["']?\s*(?:#.*)?$""", re.M)
MANIFEST_FORMAT = 1
RUN_AGAIN = "Files finished so far are kept; run again to resume."

# Pickled or foreign-framework weights: the layout loads safetensors only.
IGNORED_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data")

# The operator's own LASSIE_LORA_URL may point at a private mirror, unlike a user's extra_lora.
OPERATOR_ADDRESSES = AddressRule(allow_all=True)


class ProvisionError(RuntimeError):
    """Fetching stopped; the message says what to do (a token, a license, running again)."""


class CorruptFileError(ProvisionError):
    """A file is not what its source says it is; it has been removed so a rerun fetches it anew."""


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


# --- the manifest: a provenance record ----------------------------------------------------------


@dataclass(frozen=True)
class FileRecord:
    source: str
    revision: str | None
    size: int
    sha256: str


@dataclass
class Manifest:
    """What each file is and where it came from; saved after each source, so finished sources survive a kill."""

    path: Path
    files: dict[str, FileRecord] = field(default_factory=dict)
    complete_sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        if not path.is_file():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            files = {name: FileRecord(**record) for name, record in data["files"].items()}
            return cls(path, files, dict(data["sources"]))
        except (ValueError, KeyError, TypeError) as error:
            log.warning("ignoring unreadable manifest %s (%s): every file will be checked again", path, error)
            return cls(path)

    def save(self) -> None:
        data = {
            "format": MANIFEST_FORMAT,
            "sources": dict(sorted(self.complete_sources.items())),
            "files": {name: asdict(record) for name, record in sorted(self.files.items())},
        }
        partial = self.path.with_name(self.path.name + ".tmp")
        partial.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(partial, self.path)

    def name_of(self, path: Path) -> str:
        return path.relative_to(self.path.parent).as_posix()

    def record(self, path: Path, record: FileRecord) -> None:
        self.files[self.name_of(path)] = record
        self.save()

    def files_from(self, source: str) -> dict[str, FileRecord]:
        return {name: record for name, record in self.files.items() if record.source == source}

    def record_source(self, source: str, revision: str, files: dict[str, FileRecord], complete: bool) -> None:
        """Replaces what is recorded of `source` by `files`; `complete` marks it done at `revision`."""
        for stale in self.files_from(source):
            del self.files[stale]
        self.files |= files
        if complete:
            self.complete_sources[source] = revision
        else:
            self.complete_sources.pop(source, None)
        self.save()


def has_size(path: Path, size: int | None) -> bool:
    return path.is_file() and path.stat().st_size == size


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


def mismatch_with_hub(path: Path, name: str, remote: RepoSibling) -> tuple[str | None, str]:
    """(what is wrong with the file compared with the hub's listing, its sha256)."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"{name} has {size} bytes but the hub lists {remote.size}", ""
    sha256 = sha256_of(path)
    if remote.lfs is not None and sha256 != remote.lfs.sha256:
        return f"{name} has sha256 {sha256} but the hub lists {remote.lfs.sha256}", sha256
    if remote.lfs is None and remote.blob_id and git_hash(path.read_bytes()) != remote.blob_id:
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


# --- the Lassie LoRA ----------------------------------------------------------------------------


def public_origin(origin: str) -> str:
    """The origin without credentials: signed URLs carry them in the query, some in user:password@."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https"):
        return str(Path(origin).expanduser().resolve())
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def is_url(origin: str) -> bool:
    return urlsplit(origin).scheme in ("http", "https")


def without_field(error: InputError) -> str:
    """The shared downloader speaks of the extra_lora field; here its words are about LASSIE_LORA_URL."""
    return str(error).removeprefix(f"{error.field}: ")


def download_lora(url: str, staging: Path, limits: DownloadLimits, variable: str = LORA_URL_ENV) -> Path:
    fetched = staging / "fetched"
    log.info("fetching the Lassie LoRA from %s", redact_url(url))
    try:
        download_file(url, fetched, limits=limits)
    except InputError as error:
        raise ProvisionError(f"downloading the Lassie LoRA ({variable}) failed: {without_field(error)}\n"
                             f"{RUN_AGAIN}") from None
    return fetched


def install_lora(fetched: Path, target: Path, staging: Path, max_bytes: int) -> None:
    """From a tar (the extra LoRAs' rule: its one .safetensors) or a bare .safetensors; atomically,
    so a bad file never replaces a good one."""
    staged = staging / LORA_MEMBER
    if tarfile.is_tarfile(fetched):
        try:
            safetensors_from_tar(fetched, staged, max_bytes=max_bytes)
        except UnusableArchiveError as problem:
            raise ProvisionError(f"expected one {LORA_MEMBER} in the LoRA archive, but it {problem}") from None
    else:
        shutil.copyfile(fetched, staged)
    check_safetensors(staged, "the Lassie LoRA")
    os.replace(staged, target)


def lora_origin_problem(layout: WeightsLayout, origin: str | None) -> str | None:
    """Why the Lassie LoRA could not be had from `origin`, found before 60 GB of FLUX are fetched for nothing."""
    if not origin:
        if layout.lassie_lora.is_file():
            return None
        return (f"{layout.lassie_lora} is missing and {LORA_URL_ENV} is not set: set it to the Replicate training "
                "output (a .tar holding lora.safetensors), a .safetensors URL, or a local path to either")
    return origin_problem(origin, LORA_URL_ENV)


def origin_problem(origin: str, variable: str) -> str | None:
    """What is wrong with a LoRA address before anything is fetched: a URL without host, a missing file."""
    if Path(origin).expanduser().is_file():
        return None
    try:
        url = httpx2.URL(origin)
    except httpx2.InvalidURL:
        return f"{variable} is not a well-formed URL"
    if url.scheme in ("http", "https"):
        return None if url.host else f"{variable} has no host: {public_origin(origin)}"
    if url.scheme:
        return f"{variable} must be an http(s) URL or a local path, not a {url.scheme}: URL"
    return f"{variable} is neither an http(s) URL nor an existing file: {public_origin(origin)}"


def is_intact(path: Path, record: FileRecord, verify: bool) -> bool:
    """The size always; the recorded sha256 only when asked (a LoRA URL has no listing to ask)."""
    return has_size(path, record.size) and (not verify or sha256_of(path) == record.sha256)


def provision_lassie_lora(layout: WeightsLayout, manifest: Manifest, report: ProvisionReport, origin: str | None,
                          verify: bool, limits: DownloadLimits = DownloadLimits(rule=OPERATOR_ADDRESSES)) -> None:
    """Installs the LoRA from `origin` (see lora_origin_problem), with the trigger word its tar
    names; no origin keeps the one in place."""
    name = manifest.name_of(layout.lassie_lora)
    if not origin:
        report.kept.append(name)
        return
    source = public_origin(origin)
    record = manifest.files.get(name)
    if record is not None and record.source == source and is_intact(layout.lassie_lora, record, verify):
        report.kept.append(name)
        return
    layout.lassie_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=layout.lassie_dir) as staging:
        fetched = download_lora(origin, Path(staging), limits) if is_url(origin) else Path(origin).expanduser()
        install_lora(fetched, layout.lassie_lora, Path(staging), limits.max_bytes)
        write_trigger_word(layout, trigger_word_in_tar(fetched) if tarfile.is_tarfile(fetched) else None)
    size = layout.lassie_lora.stat().st_size
    report.add_fetched(name, size)
    manifest.record(layout.lassie_lora, FileRecord(source, None, size, sha256_of(layout.lassie_lora)))


def write_trigger_word(layout: WeightsLayout, word: str | None) -> None:
    if word and word.strip() != layout.trigger_word():
        layout.lassie_dir.mkdir(parents=True, exist_ok=True)
        layout.trigger_word_file.write_text(word.strip() + "\n")


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
        limits = DownloadLimits(max_bytes=settings.lora.max_download_bytes, rule=OPERATOR_ADDRESSES)
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
                          options: FetchOptions = FetchOptions()) -> list[str]:
    """Each missing layout folder from its tar, renamed into place only when complete; returns the folders fetched.

    A lock on the directory lets one process fetch while others sharing the directory wait and
    then find the folders in place; staging folders of a killed fetch are removed under it.
    """
    fail_on([tar_urls_problem(settings, missing_folders(layout, lassie)), writing_problem(layout.root)])
    fetched = []
    with fetch_lock(layout.root / FETCH_LOCK):
        remove_leftovers(layout.root)
        for folder in missing_folders(layout, lassie):
            url = settings.provision.tar_url(folder)
            try:
                fetch_folder(url, layout.root / folder, layout.root, partial(unpacked_lacks, folder), options)
            except DownloadError as error:
                raise ProvisionError(f"fetching {layout.root / folder} failed: {error}\n{RUN_AGAIN}") from None
            fetched.append(folder)
    return fetched


def provision_from_tars(weights_dir: Path, settings: Settings) -> list[str]:
    """scripts/download_weights.py without a token: the missing folders from their tars, and the
    Lassie LoRA from LASSIE_LORA_URL when set (else weights/lassie/ from `<base>/lassie.tar`)."""
    layout = WeightsLayout(Path(weights_dir))
    origin = settings.provision.lora_url
    fail_on([lora_origin_problem(layout, origin) if origin else None])
    fetched = fetch_missing_folders(layout, settings, lassie=origin is None)
    if origin:
        limits = DownloadLimits(max_bytes=settings.lora.max_download_bytes, rule=OPERATOR_ADDRESSES)
        provision_lassie_lora(layout, Manifest.load(layout.manifest), ProvisionReport(), origin, False, limits)
        write_trigger_word(layout, settings.provision.trigger_word)
    layout.require_complete()
    return fetched


# --- the Lassie LoRA at setup: COG_WEIGHTS, then LASSIE_LORA_URL, then weights/lassie/ ----------


@dataclass(frozen=True)
class LassieLora:
    path: Path
    trigger_word: str


def trigger_word_in_tar(archive: Path) -> str | None:
    """The trigger word a training output names: its trigger_word.txt, else `trigger_word:` in its
    config.yaml (Replicate's FLUX trainer). Members are only read, never written anywhere."""
    texts = {}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            basename = member.name.rsplit("/", 1)[-1]
            if member.isfile() and basename in (TRIGGER_WORD_MEMBER, "config.yaml") \
                    and member.size <= MAX_TEXT_MEMBER_BYTES and basename not in texts:
                source = tar.extractfile(member)
                texts[basename] = source.read().decode("utf-8", "replace") if source else ""
    if texts.get(TRIGGER_WORD_MEMBER, "").strip():
        return texts[TRIGGER_WORD_MEMBER].strip()
    found = CONFIG_TRIGGER_WORD.search(texts.get("config.yaml", ""))
    return found.group(1).strip() if found else None


def origin_variable(settings: Settings) -> str:
    return COG_WEIGHTS_ENV if settings.provision.cog_weights else LORA_URL_ENV


def installed_from(layout: WeightsLayout, origin: str) -> bool:
    """weights/lassie/ holds the LoRA from `origin` (scripts/download_weights.py put it there)."""
    record = Manifest.load(layout.manifest).files.get("lassie/lora.safetensors")
    return record is not None and record.source == public_origin(origin) and has_size(layout.lassie_lora, record.size)


def fetch_lassie_lora(origin: str, keep: Path, variable: str, limits: DownloadLimits) -> None:
    """The LoRA (and the trigger word its tar names) into `keep`, renamed there only once checked."""
    fail_on([origin_problem(origin, variable)])
    keep.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=keep.parent) as staging_name:
        staging = Path(staging_name)
        fetched = download_lora(origin, staging, limits, variable) if is_url(origin) else Path(origin).expanduser()
        folder = staging / "lora"
        folder.mkdir()
        install_lora(fetched, folder / LORA_MEMBER, folder, limits.max_bytes)
        word = trigger_word_in_tar(fetched) if tarfile.is_tarfile(fetched) else None
        if word:
            (folder / TRIGGER_WORD_MEMBER).write_text(word + "\n")
        shutil.rmtree(keep, ignore_errors=True)
        folder.rename(keep)
    log.info("the Lassie LoRA from %s (%s) is kept in %s", variable, public_origin(origin), keep)


def lassie_lora(layout: WeightsLayout, settings: Settings) -> LassieLora:
    """The Lassie LoRA setup loads: from COG_WEIGHTS, else LASSIE_LORA_URL, else weights/lassie/.

    A LoRA given by address is fetched once and kept under a name derived from the address (a
    restart fetches nothing), beside the weights or, where they are read-only, in a writable place.
    The trigger word is the one its tar names, else LASSIE_TRIGGER_WORD.
    """
    origin = settings.provision.lassie_origin
    configured = settings.provision.trigger_word or ""
    if origin is None or (origin == settings.provision.lora_url and installed_from(layout, origin)):
        return LassieLora(layout.lassie_lora, layout.trigger_word() or configured)
    place = writable_place("fetched Lassie LoRA", layout.root / FETCHED_LORA_DIRNAME)
    keep = place / hashlib.sha256(origin.encode()).hexdigest()[:24]
    with FileLock(keep.with_name(keep.name + ".lock")):  # servers sharing the place fetch it once
        if (keep / LORA_MEMBER).is_file():
            log.info("the Lassie LoRA from %s: already fetched, in %s", origin_variable(settings), keep)
        else:
            limits = DownloadLimits(max_bytes=settings.lora.max_download_bytes, rule=OPERATOR_ADDRESSES)
            fetch_lassie_lora(origin, keep, origin_variable(settings), limits)
    word_file = keep / TRIGGER_WORD_MEMBER
    return LassieLora(keep / LORA_MEMBER, word_file.read_text().strip() if word_file.is_file() else configured)


def ensure_weights(layout: WeightsLayout, settings: Settings) -> None:
    """What setup() calls: nothing to do on a complete directory; otherwise fetch, unless HF_HUB_OFFLINE.

    Missing folders come as tars where LASSIE_WEIGHTS_URL or a folder's own URL is set (no token
    needed), else from the Hugging Face hub. weights/lassie/ is needed only when neither
    COG_WEIGHTS nor LASSIE_LORA_URL names the Lassie LoRA.
    """
    lassie = settings.provision.lassie_origin is None
    missing = layout.missing(lassie=lassie)
    if not missing:
        return
    if settings.provision.offline:
        layout.require_complete(lassie=lassie)  # raises, naming every missing file
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
