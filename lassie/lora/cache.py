"""Extra LoRAs on local disk: fetched once, validated, kept under a size budget.

A file only ever appears under its final name complete and validated (it is written in a staging
folder inside the cache, then renamed), and a checksum beside it catches later damage, so a
partial or corrupted download can never be mistaken for a good LoRA. Fetches of the same LoRA are
serialised (threads and processes), so concurrent requests download it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from lassie.download import (
    MAX_BYTES_ENV,
    Credential,
    DownloadLimits,
    download_file,
    env_bytes,
    fetch_json,
    human_bytes,
    redact_secrets,
)
from lassie.errors import InputError
from lassie.lora_files import extract_single_safetensors, validate_safetensors
from lassie.lora_sources import (
    CIVITAI_HOSTS,
    FIELD,
    CivitaiModelSource,
    CivitaiVersionSource,
    HuggingFaceSource,
    LoraSource,
    ReplicateSource,
    ServiceAddresses,
    UrlSource,
    parse_extra_lora,
)
from lassie.weights import WeightsLayout

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "LASSIE_LORA_CACHE"
CACHE_BYTES_ENV = "LASSIE_LORA_CACHE_BYTES"
MIN_FREE_ENV = "LASSIE_LORA_CACHE_MIN_FREE_BYTES"
GIB = 1024**3
DEFAULT_CACHE_BYTES = 20 * GIB
DEFAULT_MIN_FREE_BYTES = 5 * GIB

STAGING_DIR = ".partial"
LOCKS_DIR = ".locks"
STALE_STAGING_SECONDS = 6 * 3600

CIVITAI_LORA_TYPES = frozenset({"LORA", "LoCon", "DoRA"})


def lora_cache_dir(layout: WeightsLayout) -> Path:
    """`LASSIE_LORA_CACHE` when set, else beside the weights it belongs to."""
    configured = os.environ.get(CACHE_DIR_ENV, "").strip()
    return Path(configured) if configured else layout.lora_cache_dir


class LoraCache:
    """`fetch(extra_lora)` -> a validated local .safetensors; InputError for anything the user can fix."""

    def __init__(self, directory: Path, max_bytes: int | None = None, *, min_free_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes if max_bytes is not None else env_bytes(CACHE_BYTES_ENV, DEFAULT_CACHE_BYTES)
        self.min_free_bytes = (
            min_free_bytes if min_free_bytes is not None else env_bytes(MIN_FREE_ENV, DEFAULT_MIN_FREE_BYTES)
        )
        self.staging_dir = self.directory / STAGING_DIR
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self._locks = _KeyLocks(self.directory / LOCKS_DIR)
        self._verified: dict[str, tuple[int, int, int]] = {}
        self._remove_stale_staging()

    def fetch(self, extra_lora: str) -> Path:
        source = parse_extra_lora(extra_lora)
        key = hashlib.sha256(source.cache_key.encode()).hexdigest()[:40]
        with self._locks.held(key, blocking=True):
            path = self._cached(key, source) or self._download(key, source)
        self._evict(keep=key)
        return path

    def cached_files(self) -> list[Path]:
        """The cached LoRA files, least recently used first."""
        return [path for path, _ in sorted(self._entries(), key=lambda entry: entry[1].st_atime_ns)]

    # --- entries --------------------------------------------------------------------------------

    def _data_path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def _record_path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def _cached(self, key: str, source: LoraSource) -> Path | None:
        data, record = self._data_path(key), self._record_path(key)
        if not data.exists() and not record.exists():
            return None
        problem = self._damage(key, source)
        if problem is not None:
            logger.warning("extra_lora: cached copy of %s is damaged (%s); fetching it again",
                           source.describe(), problem)
            self._remove(key)
            return None
        _mark_used(data)
        logger.info("extra_lora: using cached %s", source.describe())
        return data

    def _damage(self, key: str, source: LoraSource) -> str | None:
        """What is wrong with a cached entry. The checksum is recomputed once per process and file
        version (inode, size, mtime), so repeated requests stay cheap while replaced files are caught."""
        data = self._data_path(key)
        record = _read_record(self._record_path(key))
        if record is None or not data.is_file():
            return "incomplete entry"
        stat = data.stat()
        if stat.st_size != record.get("size"):
            return f"size {stat.st_size} instead of {record.get('size')}"
        try:
            validate_safetensors(data, source.describe())
        except InputError as error:
            return str(error)
        version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if self._verified.get(key) != version:
            if _sha256(data) != record.get("sha256"):
                return "checksum mismatch"
            self._verified[key] = version
        return None

    def _download(self, key: str, source: LoraSource) -> Path:
        logger.info("extra_lora: fetching %s", source.describe())
        staging = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=self.staging_dir))
        try:
            fetched = _fetch_source(source, staging)
            validate_safetensors(fetched, source.describe())
            return self._store(key, source, fetched, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _store(self, key: str, source: LoraSource, fetched: Path, staging: Path) -> Path:
        record = {"key": source.cache_key, "source": source.describe(), "size": fetched.stat().st_size,
                  "sha256": _sha256(fetched)}
        record_tmp = staging / "record.json"
        record_tmp.write_text(json.dumps(record, indent=1))
        data = self._data_path(key)
        os.replace(fetched, data)
        os.replace(record_tmp, self._record_path(key))
        _mark_used(data)
        stat = data.stat()
        self._verified[key] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        logger.info("extra_lora: cached %s (%s)", source.describe(), human_bytes(record["size"]))
        return data

    def _remove(self, key: str) -> None:
        self._verified.pop(key, None)
        self._data_path(key).unlink(missing_ok=True)
        self._record_path(key).unlink(missing_ok=True)

    # --- housekeeping ---------------------------------------------------------------------------

    def _entries(self) -> list[tuple[Path, os.stat_result]]:
        entries = []
        for path in self.directory.glob("*.safetensors"):
            try:
                entries.append((path, path.stat()))
            except FileNotFoundError:
                continue
        return entries

    def _evict(self, keep: str) -> None:
        """Least recently used first, until under the size budget and enough disk is free; never
        the entry just returned, never one another request is fetching right now."""
        entries = sorted(self._entries(), key=lambda entry: entry[1].st_atime_ns)
        total = sum(stat.st_size for _, stat in entries)
        for path, stat in entries:
            if total <= self.max_bytes and shutil.disk_usage(self.directory).free >= self.min_free_bytes:
                return
            key = path.stem
            if key == keep:
                continue
            with self._locks.held(key, blocking=False) as held:
                if held:
                    self._remove(key)
                    total -= stat.st_size
                    logger.info("extra_lora: evicted %s from the LoRA cache", path.name)

    def _remove_stale_staging(self) -> None:
        """Staging folders left by a crash; recent ones may belong to another process's download."""
        cutoff = time.time() - STALE_STAGING_SECONDS
        for leftover in self.staging_dir.iterdir():
            try:
                stale = leftover.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            if stale:
                shutil.rmtree(leftover, ignore_errors=True)


def _mark_used(path: Path) -> None:
    """The access time is the LRU clock; the modification time is left alone, as it identifies the
    file version whose checksum was verified."""
    stat = path.stat()
    os.utime(path, ns=(time.time_ns(), stat.st_mtime_ns))


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _sha256(path: Path) -> str:
    with path.open("rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


class _KeyLocks:
    """One fetch per LoRA at a time: a thread lock per key, plus an flock on a lock file so that
    other processes sharing the cache directory wait too."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._guard = threading.Lock()
        self._thread_locks: dict[str, threading.Lock] = {}

    def _thread_lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._thread_locks.setdefault(key, threading.Lock())

    @contextmanager
    def held(self, key: str, blocking: bool) -> Iterator[bool]:
        """Yields whether the lock is held; with blocking=True it always is."""
        lock = self._thread_lock(key)
        if not lock.acquire(blocking=blocking):
            yield False
            return
        try:
            with (self.directory / f"{key}.lock").open("a") as handle:
                acquired = _flock(handle.fileno(), blocking)
                try:
                    yield acquired
                finally:
                    if acquired:
                        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        finally:
            lock.release()


def _flock(descriptor: int, blocking: bool) -> bool:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


# --- fetching each kind of source into a staging folder ----------------------------------------


def _fetch_source(source: LoraSource, staging: Path) -> Path:
    """Downloads `source` into `staging` and returns the .safetensors there (not yet validated)."""
    addresses = ServiceAddresses.from_env()
    limits = DownloadLimits.from_env()
    match source:
        case UrlSource():
            return _download_to(source.url, staging, None, limits)
        case ReplicateSource():
            return _fetch_replicate(source, staging, addresses, limits)
        case CivitaiVersionSource():
            credential = Credential.from_env(addresses.civitai, "CIVITAI_API_TOKEN")
            return _download_to(source.download_url(addresses), staging, credential, limits)
        case CivitaiModelSource():
            return _fetch_civitai_model(source, staging, addresses, limits)
        case HuggingFaceSource():
            return _fetch_huggingface(source, staging, addresses, limits)
    raise TypeError(f"unknown LoRA source {source!r}")


def _download_to(url: str, staging: Path, credential: Credential | None, limits: DownloadLimits) -> Path:
    target = staging / "lora.safetensors"
    download_file(url, target, credential=credential, limits=limits)
    return target


def _fetch_replicate(source: ReplicateSource, staging: Path, addresses: ServiceAddresses,
                     limits: DownloadLimits) -> Path:
    """Replicate serves trained weights as a tar around one .safetensors (plus captions)."""
    credential = Credential.from_env(addresses.replicate, "REPLICATE_API_TOKEN")
    archive = staging / "weights.tar"
    download_file(source.weights_url(addresses), archive, credential=credential, limits=limits)
    if not tarfile.is_tarfile(archive):
        return archive
    lora = staging / "lora.safetensors"
    extract_single_safetensors(archive, lora, max_bytes=limits.max_bytes, origin=source.describe())
    archive.unlink()
    return lora


def _fetch_civitai_model(source: CivitaiModelSource, staging: Path, addresses: ServiceAddresses,
                         limits: DownloadLimits) -> Path:
    """A page's model id is not a download id: the API maps it to a version and that version's
    SafeTensor file (mapping the model id straight onto the download endpoint 404s)."""
    credential = Credential.from_env(addresses.civitai, "CIVITAI_API_TOKEN")
    model = fetch_json(f"{addresses.civitai}/api/v1/models/{source.model_id}", credential=credential, limits=limits)
    version = _civitai_version(model, source)
    chosen = _civitai_safetensors_file(version, source)
    size_kb = chosen.get("sizeKB")
    if isinstance(size_kb, int | float):
        _refuse_oversized(source.describe(), size_kb * 1024, limits)
    return _download_to(_on_configured_civitai(chosen["downloadUrl"], addresses), staging, credential, limits)


def _refuse_oversized(described: str, size: float, limits: DownloadLimits) -> None:
    """Checks sizes the services announce, before any byte of the file is fetched."""
    if size > limits.max_bytes:
        raise InputError(FIELD, f"{described} is {human_bytes(size)}, more than the "
                                f"{human_bytes(limits.max_bytes)} allowed for a LoRA ({MAX_BYTES_ENV})")


def _civitai_version(model: Any, source: CivitaiModelSource) -> dict[str, Any]:
    if not isinstance(model, dict) or not isinstance(model.get("modelVersions"), list):
        raise InputError(FIELD, f"CivitAI answered with an unexpected document for {source.describe()}")
    kind = model.get("type")
    if kind is not None and kind not in CIVITAI_LORA_TYPES:
        raise InputError(FIELD, f"{source.describe()} is a {kind}, not a LoRA")
    versions = [version for version in model["modelVersions"] if isinstance(version, dict)]
    if source.version_id is None:
        if not versions:
            raise InputError(FIELD, f"{source.describe()} has no published versions")
        return versions[0]
    for version in versions:
        if version.get("id") == source.version_id:
            return version
    known = ", ".join(str(version.get("id")) for version in versions) or "none"
    raise InputError(FIELD, f"{source.describe()} not found; that model's versions are: {known}")


def _civitai_safetensors_file(version: dict[str, Any], source: CivitaiModelSource) -> dict[str, Any]:
    files = [item for item in version.get("files") or [] if isinstance(item, dict)]
    candidates = [item for item in files if _is_civitai_safetensors(item) and isinstance(item.get("downloadUrl"), str)]
    if not candidates:
        listed = ", ".join(f"{item.get('name')} ({(item.get('metadata') or {}).get('format')})" for item in files)
        raise InputError(FIELD, f"{source.describe()} (version {version.get('id')}) has no SafeTensor file "
                                f"(files: {listed or 'none'}); only .safetensors LoRAs are loaded")
    return sorted(candidates, key=lambda item: (not item.get("primary"), item.get("type") != "Model"))[0]


def _is_civitai_safetensors(item: dict[str, Any]) -> bool:
    metadata = item.get("metadata") if isinstance(item.get("metadata"), dict) else {}
    return metadata.get("format") == "SafeTensor" or str(item.get("name", "")).lower().endswith(".safetensors")


def _on_configured_civitai(url: str, addresses: ServiceAddresses) -> str:
    """The API names civitai.com in its download links; a configured mirror serves them instead."""
    parts = urlsplit(url)
    if (parts.hostname or "").lower() not in CIVITAI_HOSTS:
        return url
    query = f"?{parts.query}" if parts.query else ""
    return f"{addresses.civitai}{parts.path}{query}"


def _fetch_huggingface(source: HuggingFaceSource, staging: Path, addresses: ServiceAddresses,
                       limits: DownloadLimits) -> Path:
    token: str | bool = os.environ.get("HF_TOKEN", "").strip() or False
    with _huggingface_errors(source, bool(token)):
        api = HfApi(endpoint=addresses.huggingface, token=token)
        tree = api.list_repo_tree(source.repo_id, revision=source.revision, recursive=True)
        chosen = _choose_hf_file(source, [item for item in tree if isinstance(item, RepoFile)])
        described = f"{source.describe()}: {chosen.path}"
        _refuse_oversized(described, chosen.size, limits)
        local = Path(hf_hub_download(source.repo_id, chosen.path, revision=source.revision,
                                     endpoint=addresses.huggingface, token=token, cache_dir=staging / "hub"))
    _refuse_oversized(described, local.stat().st_size, limits)
    return local.resolve()


def _choose_hf_file(source: HuggingFaceSource, files: list[RepoFile]) -> RepoFile:
    candidates = sorted((item for item in files if item.path.lower().endswith(".safetensors")),
                        key=lambda item: item.path)
    names = ", ".join(item.path for item in candidates) or "none"
    if source.filename is not None:
        for item in files:
            if item.path == source.filename:
                return item
        raise InputError(FIELD, f"{source.describe()}: no such file; its .safetensors files are: {names}")
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise InputError(FIELD, f"{source.describe()} holds no .safetensors file")
    raise InputError(FIELD, f"{source.describe()} holds several .safetensors files ({names}); name one, e.g. "
                            f"huggingface.co/{source.repo_id}/{candidates[0].path}")


@contextmanager
def _huggingface_errors(source: HuggingFaceSource, has_token: bool) -> Iterator[None]:
    """huggingface_hub's exceptions -> InputErrors that say what to do (and never show a token)."""
    described = source.describe()
    access = "HF_TOKEN has no access to it" if has_token else "if it is private, set HF_TOKEN"
    try:
        yield
    except GatedRepoError:
        raise InputError(FIELD, f"{described} is gated: accept its terms on Hugging Face and set HF_TOKEN "
                                "to a token of that account") from None
    except RepositoryNotFoundError:
        raise InputError(FIELD, f"{described} not found ({access})") from None
    except RevisionNotFoundError:
        raise InputError(FIELD, f"{described}: revision {source.revision!r} not found") from None
    except RemoteEntryNotFoundError:
        raise InputError(FIELD, f"{described}: file not found") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        raise InputError(FIELD, f"{described}: Hugging Face answered HTTP {status}") from None
    except HFValidationError:
        raise InputError(FIELD, f"{described}: not a valid Hugging Face repo id or revision") from None
    except (LocalEntryNotFoundError, httpx2.HTTPError, OSError) as error:
        reason = redact_secrets(f"{type(error).__name__}: {error}")[:300]
        raise InputError(FIELD, f"{described}: could not be downloaded ({reason})") from None
