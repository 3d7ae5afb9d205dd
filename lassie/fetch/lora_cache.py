"""Extra LoRAs on local disk: fetched once, validated, kept under a size budget.

A file only appears under its final name complete and validated (written in a staging folder inside
the cache, then renamed), and a checksum beside it catches later damage, so a partial or corrupted
download is never taken for a good LoRA. A file lock per LoRA (threads and processes alike) makes
concurrent requests download it once; one that waits on another's download says so in the log.

A request holds its LoRA from `prepare` to its end (`hold`, a shared lock that eviction passes over),
so nothing is fetched again on the GPU's thread.

A full or read-only cache refuses new LoRAs with an error that names the cache's variable and what
to do, while LoRAs already in it keep serving (without lock files, fetches lock within this process
and the LRU clock stands still).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from filelock import FileLock, Timeout

from lassie.fetch.files import sha256_of, validate_safetensors
from lassie.fetch.http import human_bytes
from lassie.fetch.lora_fetch import fetch_source
from lassie.fetch.lora_sources import ExtraLora, LoraSource
from lassie.request.errors import EXTRA_LORA_FIELD as FIELD
from lassie.request.errors import InputError
from lassie.settings import LORA_CACHE_ENV, LoraSettings

logger = logging.getLogger(__name__)

STAGING_DIR = ".partial"
LOCKS_DIR = ".locks"
STALE_STAGING_SECONDS = 6 * 3600
FULL_DISK = frozenset({errno.ENOSPC, errno.EDQUOT})
READ_ONLY = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


@dataclass
class HeldLora:
    """An extra LoRA's identity and its validated file, which stays in the cache until `release`."""

    lora: ExtraLora
    path: Path
    _hold: IO[bytes] | None = field(default=None, repr=False)

    def release(self) -> None:
        """Lets eviction take the file again; later calls do nothing. A hold never released ends
        with its file handle, when the object is garbage-collected."""
        if self._hold is not None:
            self._hold.close()
            self._hold = None


class LoraCache:
    """`hold(extra_lora)` -> a validated local .safetensors; InputError for anything the user can fix.
    Place, budget and fetching come from `settings`; the place defaults to `default_directory`."""

    def __init__(self, settings: LoraSettings, default_directory: Path) -> None:
        self.settings = settings
        self.directory = Path(settings.cache_dir or default_directory)
        self.max_bytes = settings.cache_bytes
        self.min_free_bytes = settings.min_free_bytes
        self.staging_dir = self.directory / STAGING_DIR
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self._locks = _KeyLocks(self.directory / LOCKS_DIR)
        self._verified: dict[str, tuple[int, int, int]] = {}
        self._remove_stale_staging()

    def hold(self, lora: ExtraLora) -> HeldLora:
        """`fetch`, with the file kept in the cache until the returned hold is released. The hold is
        taken before the lookup, so no eviction can come between the two."""
        hold = self._locks.hold(lora.key)
        try:
            return HeldLora(lora, self.fetch(lora), hold)
        except BaseException:
            if hold is not None:
                hold.close()
            raise

    def fetch(self, lora: ExtraLora) -> Path:
        """The LoRA's file, from the cache or downloaded; may evict other LoRAs nobody holds."""
        key, source = lora.key, lora.source
        with self._locks.fetching(key, source):
            path = self._cached(key, source) or self._download(key, source)
        self._evict(keep=key)
        return path

    def forget(self, held: HeldLora) -> None:
        """Releases `held` and drops its LoRA, refused after its download (it fits no FLUX layer,
        say): the cache keeps only LoRAs that can serve. One another request still holds stays for
        it (that request is refused the same way, and drops it then)."""
        held.release()
        key, source = held.lora.key, held.lora.source
        with self._locks.fetching(key, source), self._locks.unheld(key) as free:
            if not free:
                return
            try:
                self._remove(key)
            except OSError as error:
                logger.warning("extra_lora: could not remove the refused %s from the LoRA cache (%s)",
                               source.describe(), error.strerror)
                return
        logger.info("extra_lora: removed the refused %s from the LoRA cache", source.describe())

    def cached_files(self) -> list[Path]:
        """The cached LoRA files, least recently used first."""
        return [path for path, _ in self._entries()]

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
            if sha256_of(data) != record.get("sha256"):
                return "checksum mismatch"
            self._verified[key] = version
        return None

    def _download(self, key: str, source: LoraSource) -> Path:
        logger.info("extra_lora: fetching %s", source.describe())
        with _disk_faults(source):
            staging = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=self.staging_dir))
            try:
                fetched = fetch_source(source, staging, self.settings)
                validate_safetensors(fetched, source.describe())
                return self._store(key, source, fetched, staging)
            except BaseException as interrupt:
                if not isinstance(interrupt, Exception):  # the request was cancelled: its download stops here
                    logger.info("extra_lora: stopped fetching %s (%s)", source.describe(), type(interrupt).__name__)
                raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _store(self, key: str, source: LoraSource, fetched: Path, staging: Path) -> Path:
        record = {"key": source.cache_key, "source": source.describe(), "size": fetched.stat().st_size,
                  "sha256": sha256_of(fetched)}
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
        """The cached files with their stat, least recently used first (the access time is the clock)."""
        entries = []
        for path in self.directory.glob("*.safetensors"):
            try:
                entries.append((path, path.stat()))
            except FileNotFoundError:
                continue
        return sorted(entries, key=lambda entry: entry[1].st_atime_ns)

    def _evict(self, keep: str) -> None:
        """Least recently used first, until under the size budget and enough disk is free; never
        the entry just returned, never one another request is fetching or holds right now."""
        try:
            self._evict_least_used(keep)
        except OSError as error:
            logger.warning("extra_lora: could not evict from the LoRA cache (%s); check %s", error.strerror,
                           LORA_CACHE_ENV)

    def _evict_least_used(self, keep: str) -> None:
        entries = self._entries()
        total = sum(stat.st_size for _, stat in entries)
        for path, stat in entries:
            if total <= self.max_bytes and shutil.disk_usage(self.directory).free >= self.min_free_bytes:
                return
            key = path.stem
            if key == keep:
                continue
            with self._locks.unless_in_use(key) as free:
                if free:
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


@contextmanager
def _disk_faults(source: LoraSource) -> Iterator[None]:
    """A full or read-only cache disk in words that say what to do; other OS errors pass unchanged."""
    try:
        yield
    except OSError as error:
        if error.errno in FULL_DISK:
            problem = (f"the LoRA cache has no space left to store {source.describe()}. The operator can free "
                       f"space on its disk, point {LORA_CACHE_ENV} at a larger one, or lower "
                       "LASSIE_LORA_CACHE_BYTES / raise LASSIE_LORA_CACHE_MIN_FREE_BYTES so that older LoRAs "
                       "are evicted sooner")
        elif error.errno in READ_ONLY:
            problem = (f"the LoRA cache cannot be written ({error.strerror}), so {source.describe()} cannot be "
                       f"stored; LoRAs already cached still serve. The operator can make it writable or point "
                       f"{LORA_CACHE_ENV} at a writable directory")
        else:
            raise
        raise InputError(FIELD, problem) from None


def _mark_used(path: Path) -> None:
    """The access time is the LRU clock; the modification time is left alone, as it identifies the
    file version whose checksum was verified. A read-only cache keeps its clock as it was."""
    stat = path.stat()
    try:
        os.utime(path, ns=(time.time_ns(), stat.st_mtime_ns))
    except OSError as error:
        if error.errno not in READ_ONLY:
            raise


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class _KeyLocks:
    """One fetch per LoRA at a time: a file lock per key, which threads and processes sharing the
    cache wait on alike. Holds: a shared `flock` per key on a file of its own, one descriptor per
    request, which eviction must take exclusively (without waiting) to remove the entry.

    Where no lock file can be made (the cache turned read-only), a lock per key within this process
    stands in: nobody can write there then, and nothing can be evicted, so no hold is needed.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._in_process: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _hold_file(self, key: str) -> IO[bytes] | None:
        """Its own descriptor on `key`'s hold file (flock locks belong to a descriptor), or None
        where the cache is read-only."""
        try:
            return os.fdopen(os.open(self.directory / f"{key}.hold", os.O_RDONLY | os.O_CREAT, 0o644), "rb")
        except OSError as error:
            if error.errno not in READ_ONLY:
                raise
        return None

    def hold(self, key: str) -> IO[bytes] | None:
        """A shared hold on `key` (closing the returned file releases it)."""
        handle = self._hold_file(key)
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_SH)
        return handle

    @contextmanager
    def unheld(self, key: str) -> Iterator[bool]:
        """Yields whether no one holds `key`; if so, no hold can start until the block ends."""
        handle = self._hold_file(key)
        if handle is None:
            yield True
            return
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True

    def _acquire(self, key: str, blocking: bool) -> FileLock | threading.Lock | None:
        """The held lock, or None when `blocking` is false and another fetch holds it."""
        lock = FileLock(self.directory / f"{key}.lock")
        try:
            lock.acquire(blocking=blocking)
            return lock
        except Timeout:
            return None
        except OSError as error:
            if error.errno not in READ_ONLY:
                raise
        logger.debug("extra_lora: no lock file in the LoRA cache (%s); locking within this process", key)
        with self._guard:
            fallback = self._in_process.setdefault(key, threading.Lock())
        return fallback if fallback.acquire(blocking=blocking) else None

    @contextmanager
    def fetching(self, key: str, source: LoraSource) -> Iterator[None]:
        """Held while `source` is looked up and fetched; a wait for another fetch of it is logged
        once, since it can last as long as that download."""
        lock = self._acquire(key, blocking=False)
        if lock is None:
            logger.info("extra_lora: waiting for another fetch of %s to finish", source.describe())
            lock = self._acquire(key, blocking=True)
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def unless_in_use(self, key: str) -> Iterator[bool]:
        """Yields whether the fetch lock could be had without waiting and no one holds `key`
        (both kept until the block ends)."""
        lock = self._acquire(key, blocking=False)
        if lock is None:
            yield False
            return
        try:
            with self.unheld(key) as free:
                yield free
        finally:
            lock.release()
