"""Extra LoRAs on local disk, kept under a size budget. An entry appears only whole and validated (staged, then
renamed); a checksum beside it catches later damage. Per-LoRA `flock`s (threads and processes alike) make concurrent
requests download a LoRA once and let a request hold it from `prepare` to its end, so nothing is fetched again on the
GPU's thread. A full or read-only cache refuses new LoRAs, saying what to do; cached ones keep serving."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from lassie.fetch.files import sha256_of, validate_safetensors
from lassie.fetch.http import DownloadLimits, FetchError, human_bytes
from lassie.fetch.lora_sources import ExtraLora
from lassie.request.errors import EXTRA_LORA_FIELD as FIELD
from lassie.request.errors import InputError
from lassie.settings import LORA_CACHE_ENV, LoraSettings

logger = logging.getLogger(__name__)

STALE_STAGING_SECONDS = 6 * 3600
FULL_DISK = frozenset({errno.ENOSPC, errno.EDQUOT})
READ_ONLY = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


@dataclass
class HeldLora:
    """An extra LoRA's identity and its validated file, which stays in the cache until `release`."""

    lora: ExtraLora
    path: Path
    _hold: IO[bytes] | ExitStack = field(repr=False)

    def release(self) -> None:
        """Lets eviction take the file again; later calls do nothing. Unreleased, it ends when garbage-collected."""
        self._hold.close()


class LoraCache:
    """`hold(extra_lora)` -> a validated local .safetensors, or InputError for what the user can fix, per `settings`."""

    def __init__(self, settings: LoraSettings, default_directory: Path) -> None:
        self.settings = settings
        self.directory = Path(settings.cache_dir or default_directory)
        self.max_bytes = settings.cache_bytes
        self.staging_dir, self.locks_dir = self.directory / ".partial", self.directory / ".locks"
        for folder in (self.staging_dir, self.locks_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._verified: dict[str, tuple[int, int, int]] = {}
        cutoff = time.time() - STALE_STAGING_SECONDS  # left by a crash; newer ones may be another process's download
        for leftover in self.staging_dir.iterdir():
            with suppress(FileNotFoundError):
                if leftover.stat().st_mtime < cutoff:
                    shutil.rmtree(leftover, ignore_errors=True)

    def hold(self, lora: ExtraLora) -> HeldLora:
        """`fetch`, the file kept in the cache until released; held before the lookup, so no eviction comes between."""
        hold = self._lock(f"{lora.key}.hold", fcntl.LOCK_SH)
        try:
            return HeldLora(lora, self.fetch(lora), hold)
        except BaseException:
            hold.close()
            raise

    def fetch(self, lora: ExtraLora) -> Path:
        """The LoRA's file, from the cache or downloaded; may evict other LoRAs nobody holds."""
        try:
            lock = self._lock(f"{lora.key}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # said once: the wait can last as long as the other fetch's download
            logger.info("extra_lora: waiting for another fetch of %s to finish", lora.source.describe())
            lock = self._lock(f"{lora.key}.lock", fcntl.LOCK_EX)
        with lock:
            path = self._cached(lora) or self._download(lora)
        self._evict(keep=lora.key)
        return path

    def forget(self, held: HeldLora) -> None:
        """Releases `held` and drops its LoRA, refused after its download (it fits no FLUX layer, say), unless another
        request still holds it (refused the same way, that one drops it then): the cache keeps LoRAs that can serve."""
        held.release()
        described = held.lora.source.describe()
        try:
            if self._remove_unless_in_use(held.lora.key):
                logger.info("extra_lora: removed the refused %s from the LoRA cache", described)
        except OSError as error:
            logger.warning("extra_lora: could not remove the refused %s from the LoRA cache (%s)", described,
                           error.strerror)

    def cached_files(self) -> list[Path]:
        return [path for path, _ in self._entries()]

    def _files(self, key: str) -> tuple[Path, Path]:
        """An entry: the LoRA and its record (size and checksum)."""
        data = self.directory / f"{key}.safetensors"
        return data, data.with_suffix(".json")

    def _cached(self, lora: ExtraLora) -> Path | None:
        data, record = self._files(lora.key)
        if not data.exists() and not record.exists():
            return None
        if (problem := self._damage(lora)) is not None:
            logger.warning("extra_lora: cached copy of %s is damaged (%s); fetching it again", lora.source.describe(),
                           problem)
            self._remove(lora.key)
            return None
        _mark_used(data)
        logger.info("extra_lora: using cached %s", lora.source.describe())
        return data

    def _damage(self, lora: ExtraLora) -> str | None:
        """What is wrong with a cached entry. The checksum is recomputed once per process and file version (inode,
        size, mtime), so repeated requests stay cheap while replaced files are caught."""
        data, record_path = self._files(lora.key)
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = None
        if not isinstance(record, dict) or not data.is_file():
            return "incomplete entry"
        try:
            validate_safetensors(data, lora.source.describe())
        except InputError as error:
            return str(error)
        version = _version(data)
        if self._verified.get(lora.key) != version and sha256_of(data) != record.get("sha256"):
            return "checksum mismatch"
        self._verified[lora.key] = version
        return None

    def _download(self, lora: ExtraLora) -> Path:
        described = lora.source.describe()
        logger.info("extra_lora: fetching %s", described)
        try:
            with tempfile.TemporaryDirectory(prefix=f"{lora.key}-", dir=self.staging_dir,
                                             ignore_cleanup_errors=True) as name:
                fetched = lora.source.fetch(Path(name), self.settings, DownloadLimits.from_settings(self.settings))
                validate_safetensors(fetched, described)
                return self._store(lora, fetched, Path(name, "record.json"))
        except FetchError as error:  # the user gave the address: the client's failures are the field's
            raise InputError(FIELD, str(error)) from None
        except OSError as error:
            _refuse_disk_fault(error, described)
            raise
        except BaseException as interrupt:
            if not isinstance(interrupt, Exception):  # the request was cancelled: its download stops here
                logger.info("extra_lora: stopped fetching %s (%s)", described, type(interrupt).__name__)
            raise

    def _store(self, lora: ExtraLora, fetched: Path, staged_record: Path) -> Path:
        size = fetched.stat().st_size
        record = {"key": lora.source.cache_key, "source": lora.source.describe(), "size": size,
                  "sha256": sha256_of(fetched)}
        staged_record.write_text(json.dumps(record, indent=1))
        data, record_path = self._files(lora.key)
        os.replace(fetched, data)
        os.replace(staged_record, record_path)
        _mark_used(data)
        self._verified[lora.key] = _version(data)
        logger.info("extra_lora: cached %s (%s)", lora.source.describe(), human_bytes(size))
        return data

    def _remove(self, key: str) -> None:
        self._verified.pop(key, None)
        for path in self._files(key):
            path.unlink(missing_ok=True)

    def _entries(self) -> list[tuple[Path, os.stat_result]]:
        """The cached files with their stat, least recently used first (the access time is the clock)."""
        entries = []
        for path in self.directory.glob("*.safetensors"):
            with suppress(FileNotFoundError):
                entries.append((path, path.stat()))
        return sorted(entries, key=lambda entry: entry[1].st_atime_ns)

    def _evict(self, keep: str) -> None:
        """LRU first, until under budget, enough disk free; never `keep` nor one another request fetches or holds."""
        try:
            entries = self._entries()
            total = sum(stat.st_size for _, stat in entries)
            for path, stat in entries:
                if total <= self.max_bytes and shutil.disk_usage(self.directory).free >= self.settings.min_free_bytes:
                    return
                if path.stem != keep and self._remove_unless_in_use(path.stem):
                    total -= stat.st_size
                    logger.info("extra_lora: evicted %s from the LoRA cache", path.name)
        except OSError as error:
            logger.warning("extra_lora: could not evict from the LoRA cache (%s); check %s", error.strerror,
                           LORA_CACHE_ENV)

    def _lock(self, name: str, operation: int) -> IO[bytes] | ExitStack:
        """<key>.lock is held while a LoRA is looked up and fetched, <key>.hold shared by the requests using it, each
        `flock`ed on a descriptor of its own so threads wait as processes do (closing it unlocks; BlockingIOError under
        LOCK_NB). An empty ExitStack stands in where the file cannot be made: a read-only cache has nothing to lock."""
        try:
            handle = os.fdopen(os.open(self.locks_dir / name, os.O_RDONLY | os.O_CREAT, 0o644), "rb")
        except OSError as error:
            if error.errno not in READ_ONLY:
                raise
            return ExitStack()
        try:
            fcntl.flock(handle, operation)
        except BaseException:
            handle.close()
            raise
        return handle

    def _remove_unless_in_use(self, key: str) -> bool:
        """Removes `key`'s entry unless a fetch of it runs or a request holds it, waiting for neither."""
        try:
            with (self._lock(f"{key}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB),
                  self._lock(f"{key}.hold", fcntl.LOCK_EX | fcntl.LOCK_NB)):
                self._remove(key)
        except BlockingIOError:
            return False
        return True


def _refuse_disk_fault(error: OSError, described: str) -> None:
    """A full or read-only cache disk in words that say what to do; other OS errors pass unchanged."""
    if error.errno in FULL_DISK:
        raise InputError(FIELD, f"the LoRA cache has no space left to store {described}. The operator can "
                                f"free space on its disk, point {LORA_CACHE_ENV} at a larger one, or lower "
                                "LASSIE_LORA_CACHE_BYTES / raise LASSIE_LORA_CACHE_MIN_FREE_BYTES so that older "
                                "LoRAs are evicted sooner") from None
    if error.errno in READ_ONLY:
        raise InputError(FIELD, f"the LoRA cache cannot be written ({error.strerror}), so {described} "
                                "cannot be stored; LoRAs already cached still serve. The operator can make it "
                                f"writable or point {LORA_CACHE_ENV} at a writable directory") from None


def _version(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _mark_used(path: Path) -> None:
    """The access time is the LRU clock (the mtime names the verified version); a read-only cache's stands still."""
    try:
        os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))
    except OSError as error:
        if error.errno not in READ_ONLY:
            raise
