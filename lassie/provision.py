"""Filling the weights directory: FLUX.1 dev and schnell, the safety models and the Lassie LoRA.

Everything that can fail cheaply is checked before the first byte of FLUX is fetched: where the
Lassie LoRA comes from, the Hugging Face token's access to the gated repo, that the directory is
writable, and that its disk has room for what is still to come (the hub lists every file's size).

Every file is checked against what its source says it is (the hub's LFS sha256 or git blob id, a
parseable safetensors header) and recorded in manifest.json with source, revision, size and
sha256. The manifest is what makes a second run free: a source whose recorded files are all still
on disk at their recorded size is not asked about again, so a provisioned box needs no network;
a manifest shipped without the weights (in the image) pins each repo to the commit it recorded.

Hub downloads go through huggingface_hub (which honours HF_ENDPOINT and HF_TOKEN and picks a
dropped transfer up where it stopped); the manifest is written after every file, so a run that is
killed part-way is resumed by running again, without fetching the finished files twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx2
from huggingface_hub import HfApi, get_token, hf_hub_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.utils import filter_repo_objects, tqdm

from lassie.lora_files import UnusableSafetensorsError, inspect_safetensors
from lassie.weights import MissingWeightsError, WeightsLayout, tiny_weights_hint

log = logging.getLogger(__name__)

LORA_URL_ENV = "LASSIE_LORA_URL"
TRIGGER_WORD_ENV = "LASSIE_TRIGGER_WORD"
HF_ENDPOINT_ENV = "HF_ENDPOINT"
HF_OFFLINE_ENV = "HF_HUB_OFFLINE"
DEFAULT_ENDPOINT = "https://huggingface.co"
LORA_MEMBER = "lora.safetensors"
MANIFEST_FORMAT = 1
CHUNK = 8 * 1024 * 1024
# A dropped connection loses the chunk being read: keep it small so a resume loses little.
DOWNLOAD_CHUNK = 64 * 1024
LOG_BAR = "  {percentage:3.0f}% of {total_fmt}B, {rate_fmt}, {remaining} left"

# Pickled or foreign-framework weights: the layout loads safetensors only.
IGNORED_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data")


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
        return (f"fetched {len(self.fetched)} files ({human_size(self.bytes_fetched)}), "
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


# --- the manifest -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileRecord:
    source: str
    revision: str | None
    size: int
    sha256: str


@dataclass
class Manifest:
    """What each file is and where it came from; saved after every file so progress survives a kill."""

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

    def complete(self, source: str, revision: str, names: set[str]) -> None:
        """Marks `source` done at `revision`, forgetting files it no longer has."""
        for stale in set(self.files_from(source)) - names:
            del self.files[stale]
        self.complete_sources[source] = revision
        self.save()


# --- checking files -----------------------------------------------------------------------------


def hash_file(path: Path, new_digest: Callable[[], "hashlib._Hash"]) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, new_digest).hexdigest()


def sha256_of(path: Path) -> str:
    return hash_file(path, hashlib.sha256)


def git_blob_id(path: Path) -> str:
    """The id git (and so the hub) gives a file that is not stored in LFS."""
    header = f"blob {path.stat().st_size}\0".encode()
    return hash_file(path, lambda: hashlib.sha1(header))


def check_safetensors(path: Path, name: str) -> None:
    """The project's one safetensors check: catches truncation and non-safetensors payloads."""
    try:
        inspect_safetensors(path)
    except UnusableSafetensorsError as problem:
        raise CorruptFileError(f"{name} is not a valid safetensors file: {problem}") from None


def is_intact(path: Path, record: FileRecord, verify: bool) -> bool:
    """The cheap check (size) always; the sha256 only when asked, since real weights are ~60 GB."""
    if not path.is_file() or path.stat().st_size != record.size:
        return False
    return not verify or sha256_of(path) == record.sha256


def check_against_hub(path: Path, name: str, remote: RepoSibling) -> str:
    """The file's sha256, after making sure it is byte for byte the file the hub lists."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        raise CorruptFileError(f"{name} has {size} bytes but the hub lists {remote.size}")
    sha256 = sha256_of(path)
    if remote.lfs is not None and sha256 != remote.lfs.sha256:
        raise CorruptFileError(f"{name} has sha256 {sha256} but the hub lists {remote.lfs.sha256}")
    if remote.lfs is None and remote.blob_id and git_blob_id(path) != remote.blob_id:
        raise CorruptFileError(f"{name} does not match the hub's git blob {remote.blob_id}")
    if path.suffix == ".safetensors":
        check_safetensors(path, name)
    return sha256


class ProgressLog(tqdm):
    """A bar on a terminal; elsewhere (Cog's setup log) a log line every 30 s, where no bar is seen."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.to_log = not sys.stderr.isatty()
        if self.to_log:
            kwargs |= {"disable": False, "mininterval": 30, "file": io.StringIO(), "bar_format": LOG_BAR}
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if not self.to_log:
            return super().display(msg, pos)
        if self.n:
            log.info(self.format_meter(**self.format_dict))
        return True


def human_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


# --- the hub ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubAccess:
    """Where the hub is and who we are; read at call time, so HF_ENDPOINT set late still counts."""

    endpoint: str
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_environment(cls) -> HubAccess:
        return cls(os.environ.get(HF_ENDPOINT_ENV, DEFAULT_ENDPOINT).rstrip("/"), get_token())

    def list_files(self, source: HubSource, revision: str | None) -> tuple[str, list[RepoSibling]]:
        """The commit and the wanted files, with the sizes and hashes to check them against."""
        api = HfApi(endpoint=self.endpoint, token=self.token)
        info = api.model_info(source.repo_id, revision=revision, files_metadata=True)
        wanted = filter_repo_objects(info.siblings or [], allow_patterns=list(source.patterns),
                                     ignore_patterns=list(IGNORED_PATTERNS), key=lambda sibling: sibling.rfilename)
        return info.sha, sorted(wanted, key=lambda sibling: sibling.rfilename)

    def check_access(self, source: HubSource) -> None:
        """One small request: a gated repo whose license the token has not accepted fails here."""
        HfApi(endpoint=self.endpoint, token=self.token).auth_check(source.repo_id)

    def download(self, source: HubSource, filename: str, commit: str) -> None:
        hf_hub_download(source.repo_id, filename, revision=commit, local_dir=source.directory,
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
    """Turns huggingface_hub's errors into messages that say what to do next."""
    try:
        yield
    except (GatedRepoError, RepositoryNotFoundError) as error:
        if source.gated:
            raise ProvisionError(access.gated_message(source.repo_id)) from None
        raise ProvisionError(f"{source.repo_id} is not reachable on {access.endpoint}: {error}") from None
    except (HfHubHTTPError, OSError, httpx2.HTTPError) as error:
        raise ProvisionError(f"fetching {source.repo_id} failed: {error}\n"
                             "Files finished so far are kept; run again to resume.") from error


def is_in_place(source: HubSource, manifest: Manifest, verify: bool) -> bool:
    """A source whose recorded files are all on disk is not asked about again: no network needed."""
    recorded = manifest.files_from(source.repo_id)
    root = manifest.path.parent
    return source.repo_id in manifest.complete_sources and all(
        is_intact(root / name, record, verify) for name, record in recorded.items())


def token_problem(source: HubSource, access: HubAccess) -> str | None:
    return access.gated_message(source.repo_id) if source.gated and access.token is None else None


@dataclass(frozen=True)
class HubPlan:
    """What one source still needs, listed (metadata only) before anything is downloaded."""

    source: HubSource
    commit: str
    files: list[RepoSibling]
    bytes_to_fetch: int


def plan_hub_source(source: HubSource, access: HubAccess, manifest: Manifest) -> HubPlan:
    """The commit to fetch from and its files; a token without access to a gated repo fails here."""
    with explained_hub_errors(source, access):
        if source.gated:
            access.check_access(source)
        # A manifest that came with the image pins each repo to the commit it recorded.
        commit, remote_files = access.list_files(source, manifest.complete_sources.get(source.repo_id))
    missing = [remote for remote in remote_files if not has_size(source.directory / remote.rfilename, remote)]
    to_fetch = sum(remote.size or 0 for remote in missing) - partial_bytes(source.directory)
    return HubPlan(source, commit, remote_files, max(0, to_fetch))


def has_size(path: Path, remote: RepoSibling) -> bool:
    return path.is_file() and path.stat().st_size == remote.size


def partial_bytes(directory: Path) -> int:
    """What interrupted downloads left; huggingface_hub resumes them, so they need no new room."""
    downloads = directory / ".cache" / "huggingface" / "download"
    return sum(path.stat().st_size for path in downloads.rglob("*.incomplete"))


def fetch_hub_source(plan: HubPlan, access: HubAccess, manifest: Manifest, report: ProvisionReport,
                     verify: bool) -> None:
    source = plan.source
    with explained_hub_errors(source, access):
        names = set()
        for number, remote in enumerate(plan.files, 1):
            log.info("%s [%d/%d] %s (%s)", source.repo_id, number, len(plan.files), remote.rfilename,
                     human_size(remote.size or 0))
            names.add(provision_hub_file(source, remote, plan.commit, access, manifest, report, verify))
    manifest.complete(source.repo_id, plan.commit, names)


def provision_hub_file(source: HubSource, remote: RepoSibling, commit: str, access: HubAccess,
                       manifest: Manifest, report: ProvisionReport, verify: bool) -> str:
    """Keeps a file already verified at this commit; otherwise fetches and checks it. Returns its name."""
    path = source.directory / remote.rfilename
    name = manifest.name_of(path)
    record = manifest.files.get(name)
    if record is not None and record.revision == commit and is_intact(path, record, verify):
        report.kept.append(name)
        return name
    sha256 = verified_local_copy(path, name, remote)
    if sha256 is None:
        path.unlink(missing_ok=True)
        access.download(source, remote.rfilename, commit)
        sha256 = checked_or_removed(path, name, remote)
        report.add_fetched(name, path.stat().st_size)
    else:
        report.kept.append(name)
    manifest.record(path, FileRecord(source.repo_id, commit, path.stat().st_size, sha256))
    return name


def verified_local_copy(path: Path, name: str, remote: RepoSibling) -> str | None:
    """A file already on disk but not in the manifest (e.g. the manifest was lost) is reused if it checks out."""
    if not path.is_file():
        return None
    try:
        return check_against_hub(path, name, remote)
    except CorruptFileError as error:
        log.info("replacing %s: %s", name, error)
        return None


def checked_or_removed(path: Path, name: str, remote: RepoSibling) -> str:
    try:
        return check_against_hub(path, name, remote)
    except CorruptFileError as error:
        path.unlink(missing_ok=True)
        raise CorruptFileError(f"{error}; the download was corrupted and has been removed, "
                               "run again to fetch it anew") from None


# --- the Lassie LoRA ----------------------------------------------------------------------------


def public_origin(origin: str) -> str:
    """The origin without credentials: signed URLs carry them in the query, some in user:password@."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https"):
        return str(Path(origin).expanduser().resolve())
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def is_url(origin: str) -> bool:
    return urlsplit(origin).scheme in ("http", "https")


def download_url(url: str, partial: Path, label: str) -> None:
    """Appends to `partial` from where an earlier attempt stopped, if the server honours Range."""
    offset = partial.stat().st_size if partial.is_file() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    timeout = httpx2.Timeout(60, connect=10)
    try:
        with httpx2.stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True) as response:
            if response.status_code == 416:  # an earlier attempt received it all
                return
            response.raise_for_status()
            offset = offset if response.status_code == 206 else 0
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length else None
            with partial.open("ab" if offset else "wb") as out, \
                    ProgressLog(total=total, initial=offset, unit="B", unit_scale=True, desc=label) as progress:
                for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                    out.write(chunk)
                    progress.update(len(chunk))
    except httpx2.HTTPError as error:
        raise ProvisionError(f"downloading {label} failed ({failure_reason(error)}); what arrived is kept in "
                             f"{partial.name}, run again to resume") from None


def failure_reason(error: httpx2.HTTPError) -> str:
    """Never str(error): it holds the URL, and signed URLs carry secrets in their query."""
    if isinstance(error, httpx2.HTTPStatusError):
        return f"HTTP {error.response.status_code}"
    return type(error).__name__


def lora_from_archive(archive: Path, destination: Path) -> None:
    """A Replicate training output: a tar holding lora.safetensors (and captions, configs).

    Member names are only compared, never used as paths, so no member can write outside `destination`.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = [member for member in tar.getmembers() if member.isfile()]
            named = [member for member in members if Path(member.name).name == LORA_MEMBER]
            candidates = named or [member for member in members if member.name.endswith(".safetensors")]
            if len(candidates) != 1:
                found = ", ".join(member.name for member in candidates) or "no .safetensors file"
                raise ProvisionError(f"expected one {LORA_MEMBER} in the LoRA archive, found: {found}")
            with tar.extractfile(candidates[0]) as source, destination.open("wb") as out:
                shutil.copyfileobj(source, out, CHUNK)
    except (tarfile.TarError, EOFError) as error:
        raise ProvisionError(f"the LoRA archive is not a readable tar ({error})") from None


def install_lora(fetched: Path, target: Path) -> None:
    """From a tar or a bare .safetensors; atomically, so a bad file never replaces a good one."""
    staged = target.with_name(target.name + ".tmp")
    try:
        if tarfile.is_tarfile(fetched):
            lora_from_archive(fetched, staged)
        else:
            shutil.copyfile(fetched, staged)
        check_safetensors(staged, "the Lassie LoRA")
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)


def lora_origin_problem(layout: WeightsLayout, origin: str | None) -> str | None:
    """Why the Lassie LoRA could not be had from `origin`, found before 60 GB of FLUX are fetched for nothing."""
    if not origin:
        if layout.lassie_lora.is_file():
            return None
        return (f"{layout.lassie_lora} is missing and {LORA_URL_ENV} is not set: set it to the Replicate training "
                "output (a .tar holding lora.safetensors), a .safetensors URL, or a local path to either")
    if Path(origin).expanduser().is_file():
        return None
    try:
        url = httpx2.URL(origin)
    except httpx2.InvalidURL:
        return f"{LORA_URL_ENV} is not a well-formed URL"
    if url.scheme in ("http", "https"):
        return None if url.host else f"{LORA_URL_ENV} has no host: {public_origin(origin)}"
    if url.scheme:
        return f"{LORA_URL_ENV} must be an http(s) URL or a local path, not a {url.scheme}: URL"
    return f"{LORA_URL_ENV} is neither an http(s) URL nor an existing file: {public_origin(origin)}"


def provision_lassie_lora(layout: WeightsLayout, manifest: Manifest, report: ProvisionReport,
                          origin: str | None, verify: bool) -> None:
    """Installs the LoRA from `origin` (see lora_origin_problem); no origin keeps the one in place."""
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
    if is_url(origin):
        partial = layout.lassie_dir / f".download-{hashlib.sha256(source.encode()).hexdigest()[:16]}.part"
        log.info("fetching the Lassie LoRA from %s", source)
        download_url(origin, partial, "the Lassie LoRA")
        try:
            install_lora(partial, layout.lassie_lora)
        finally:
            partial.unlink()
    else:
        install_lora(Path(origin).expanduser(), layout.lassie_lora)
    size = layout.lassie_lora.stat().st_size
    report.add_fetched(name, size)
    manifest.record(layout.lassie_lora, FileRecord(source, None, size, sha256_of(layout.lassie_lora)))


def write_trigger_word(layout: WeightsLayout, word: str | None) -> None:
    if word and word.strip() != layout.trigger_word():
        layout.lassie_dir.mkdir(parents=True, exist_ok=True)
        layout.trigger_word_file.write_text(word.strip() + "\n")


# --- entry points -------------------------------------------------------------------------------


def writing_problem(root: Path) -> str | None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            return None
    except OSError as error:
        return f"cannot write to the weights directory {root}: {error.strerror or error}"


def space_problem(root: Path, plans: list[HubPlan]) -> str | None:
    needed = sum(plan.bytes_to_fetch for plan in plans)
    free = shutil.disk_usage(root).free
    if needed <= free:
        return None
    return (f"{root} has {human_size(free)} free but the files still to fetch need {human_size(needed)}: "
            "free some space or give another weights directory")


def fail_on(problems: list[str | None]) -> None:
    """All problems found at once, so one rerun can fix them all."""
    found = [problem for problem in problems if problem]
    if found:
        raise ProvisionError("\n".join(found))


def provision(weights_dir: Path, *, lora_origin: str | None = None, verify: bool = False,
              access: HubAccess | None = None) -> ProvisionReport:
    """Brings `weights_dir` to the complete layout; `verify` rehashes files the manifest vouches for.

    `lora_origin` defaults to $LASSIE_LORA_URL; the trigger word comes from $LASSIE_TRIGGER_WORD.
    Nothing is downloaded until every check passed: first those needing no network (LoRA origin,
    writable directory, a token for the gated repo), then the hub's listings (token access, sizes
    against free space). The LoRA, small, is fetched last.
    """
    layout = WeightsLayout(Path(weights_dir))
    origin = lora_origin or os.environ.get(LORA_URL_ENV)
    access = access or HubAccess.from_environment()
    manifest = Manifest.load(layout.manifest)
    report = ProvisionReport()
    pending = []
    for source in hub_sources(layout):
        if is_in_place(source, manifest, verify):
            log.info("%s: all %d files in place", source.repo_id, len(manifest.files_from(source.repo_id)))
            report.kept.extend(manifest.files_from(source.repo_id))
        else:
            pending.append(source)
    fail_on([lora_origin_problem(layout, origin), writing_problem(layout.root),
             *(token_problem(source, access) for source in pending)])
    plans = [plan_hub_source(source, access, manifest) for source in pending]
    fail_on([space_problem(layout.root, plans)])
    for plan in plans:
        fetch_hub_source(plan, access, manifest, report, verify)
    provision_lassie_lora(layout, manifest, report, origin, verify)
    write_trigger_word(layout, os.environ.get(TRIGGER_WORD_ENV))
    layout.require_complete()
    return report


def is_offline() -> bool:
    return os.environ.get(HF_OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def ensure_weights(layout: WeightsLayout) -> None:
    """What setup() calls: nothing to do on a complete directory; otherwise fetch, unless HF_HUB_OFFLINE."""
    missing = layout.missing()
    if not missing:
        return
    if is_offline():
        layout.require_complete()  # raises, naming every missing file
    log.warning("weights missing (%s); fetching them", ", ".join(missing))
    try:
        log.info(provision(layout.root).summary())
    except ProvisionError as error:
        raise ProvisionError(f"{error}\n{tiny_weights_hint()}") from error
    except Exception as error:
        raise MissingWeightsError(f"weights directory {layout.root} is incomplete (missing: {', '.join(missing)}) "
                                  f"and fetching them failed: {error}\n{tiny_weights_hint()}") from error
