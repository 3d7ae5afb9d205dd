"""A weights folder from one tar at full speed, renamed into place only once complete and checked: by `pget` where
it is on PATH, else parallel range requests held to one version of the file, else one stream. The URLs are the
operator's (any host); sizes, members and time (LASSIE_WEIGHTS_DOWNLOAD_TIMEOUT per folder) are bounded."""

from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import httpx2

from lassie.fetch.http import (
    AddressRule,
    Deadline,
    DownloadLimits,
    FetchError,
    ProgressLog,
    body_pieces,
    declared_length,
    human_bytes,
    new_client,
    redact_url,
    request,
)
from lassie.fetch.tars import TarLimits, TarRefused, check_tree, unpack
from lassie.settings import WEIGHTS_DOWNLOAD_TIMEOUT_ENV, ProvisionSettings

log = logging.getLogger(__name__)

MIB = 1024**2
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
STAGING_PREFIX = ".fetching-"


class DownloadError(RuntimeError):
    """A folder could not be fetched; the message names the URL (without its query) and why."""


class FileChanged(DownloadError):
    """The file at the URL changed between two of its range requests: what arrived is no one version."""


@dataclass(frozen=True)
class FetchOptions:
    """The bounds and the parallelism of one folder's fetch; tests and the benchmark pass their own."""

    connections: int = 16
    chunk_bytes: int = 16 * MIB
    deadline_seconds: float = ProvisionSettings.weights_download_timeout  # LASSIE_WEIGHTS_DOWNLOAD_TIMEOUT
    max_bytes: int = 256 * 1024 * MIB
    max_members: int = 100_000
    retries: int = 3
    use_pget: bool = True

    def tar_limits(self) -> TarLimits:
        return TarLimits(max_members=self.max_members, max_bytes=self.max_bytes)

    def deadline(self) -> Deadline:
        return Deadline(self.deadline_seconds, WEIGHTS_DOWNLOAD_TIMEOUT_ENV, "fetching a weights folder")


def version_of(response: httpx2.Response) -> tuple[str | None, str | None]:
    """What names one version of the file: its strong ETag and its Last-Modified date (either may be missing)."""
    etag = response.headers.get("ETag")
    return (etag if etag and not etag.startswith("W/") else None), response.headers.get("Last-Modified")


class _Body(io.RawIOBase):
    """The tar's bytes from the pieces a source yields, with the checks all share (size, deadline, progress)."""

    def __init__(self, url: str, total: int | None, pieces: Generator[bytes, None, None], options: FetchOptions,
                 limits: DownloadLimits) -> None:
        super().__init__()
        self.url, self.pieces, self.options, self.limits = url, pieces, options, limits
        self.received = 0
        self._current = memoryview(b"")
        self._progress = ProgressLog(total=total, desc=redact_url(url), unit="B")
        if total is not None and total > options.max_bytes:
            raise DownloadError(f"{redact_url(url)} is {human_bytes(total)}, more than the "
                                f"{human_bytes(options.max_bytes)} a weights folder may be")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        self.limits.deadline.check(self.url, self.received)
        if not self._current:
            self._current = memoryview(next(self.pieces, b""))
        count = min(len(buffer), len(self._current))
        buffer[:count] = self._current[:count]
        self._current = self._current[count:]
        self.received += count
        if self.received > self.options.max_bytes:
            raise DownloadError(f"{redact_url(self.url)} sent more than {human_bytes(self.options.max_bytes)}")
        self._progress.update(count)
        return count

    def close(self) -> None:
        self.pieces.close()
        self._progress.close()
        super().close()


def parallel_ranges(client: httpx2.Client, url: str, source: str, first: httpx2.Response, total: int,
                    options: FetchOptions, limits: DownloadLimits) -> Generator[bytearray, None, None]:
    """The tar in chunks over several connections, in order, `first` (the first range's response) first. The others
    are asked for at `source` (where the first request ended up) with `If-Range` (the ETag, else Last-Modified), so a
    changed file comes back whole (200), not as a part of another. At most `window` chunks are in flight or waiting,
    so memory (window x chunk_bytes) stays bounded however far the network runs ahead of the extraction."""
    ours = version_of(first)

    def read_part(response: httpx2.Response, start: int, end: int) -> bytearray:
        """Exactly the range asked for, of our version. The whole file (an If-Range request's answer) or a part
        naming another version means the file changed; a part naming none was held to ours by If-Range."""
        asked, answered = f"bytes {start}-{end - 1}/{total}", response.headers.get("Content-Range") or ""
        (etag, modified), (our_etag, our_modified) = version_of(response), ours
        other = etag != our_etag if etag and our_etag else bool(modified and our_modified and modified != our_modified)
        data = bytearray()
        with closing(response):
            if response.status_code == 200 or other:
                raise FileChanged(f"{redact_url(url)} changed while it was being downloaded")
            if response.status_code != 206 or answered.strip() != asked:
                raise DownloadError(f"{redact_url(url)} answered a range request for {asked} with HTTP "
                                    f"{response.status_code} {answered or '(no Content-Range)'}")
            for piece in body_pieces(response, url, limits, received=start):
                data += piece
                if len(data) > end - start:
                    raise DownloadError(f"{redact_url(url)} sent more than bytes {start}-{end - 1}")
        if len(data) != end - start:
            raise DownloadError(f"the download of {redact_url(url)} was cut short (bytes {start}-{end - 1}: "
                                f"{len(data)} of {end - start} received)")
        return data

    def fetch(start: int, end: int) -> bytearray:
        """One chunk; a failure other than a changed file asks again, `options.retries` times in all."""
        headers = {"Range": f"bytes={start}-{end - 1}", "If-Range": ours[0] or ours[1]}
        problem = ""
        for _ in range(options.retries):
            try:
                return read_part(request(client, source, limits=limits, headers=headers)[0], start, end)
            except FileChanged:
                raise
            except (DownloadError, FetchError) as error:
                problem = str(error)
        raise DownloadError(f"{problem} (bytes {start}-{end - 1}, tried {options.retries} times)")

    chunk, window = options.chunk_bytes, options.connections + max(options.connections // 2, 2)
    starts = iter(range(chunk, total, chunk))
    pool = ThreadPoolExecutor(options.connections, thread_name_prefix="lassie-download")
    queue = deque([pool.submit(read_part, first, 0, min(chunk, total))])
    try:
        while queue:
            queue.extend(pool.submit(fetch, start, min(start + chunk, total))
                         for start in islice(starts, window - len(queue)))
            yield queue.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def first_part_total(response: httpx2.Response, options: FetchOptions) -> int | None:
    """The file's total size when `response` is exactly the first range asked for, else None."""
    match = CONTENT_RANGE.fullmatch((response.headers.get("Content-Range") or "").strip())
    if response.status_code != 206 or match is None:
        return None
    start, end, total = map(int, match.groups())
    return total if start == 0 and end == min(options.chunk_bytes, total) - 1 else None


@contextmanager
def tar_stream(url: str, options: FetchOptions = FetchOptions(), deadline: Deadline | None = None) -> Iterator[_Body]:
    """The tar's bytes: parallel ranges when a first ranged request is answered with exactly that range and a version
    to hold the others to, else one stream. The HTTP client's errors, opening or reading, become DownloadErrors."""
    limits = DownloadLimits(rule=AddressRule(allow_all=True), deadline=deadline or options.deadline())  # operator's
    ranged = options.connections > 1
    try:
        with new_client(options.connections) as client:
            first, source = request(client, url, limits=limits,
                                    headers={"Range": f"bytes=0-{options.chunk_bytes - 1}"} if ranged else None)
            total, version = first_part_total(first, options), version_of(first)
            if first.status_code == 206 and (total is None or not any(version)):
                first.close()  # a part that cannot be checked, or of unknown total: ask for the whole instead
                first, source = request(client, url, limits=limits)
                total = None
            if total is None:
                total, pieces = declared_length(first), body_pieces(first, url, limits)  # h11 fails a body cut short
                how = "one stream" + (" (the server does not answer range requests)" if ranged else "")
            else:
                pieces = parallel_ranges(client, url, source, first, total, options, limits)
                how = f"{options.connections} parallel ranges"
            with closing(first), closing(_Body(url, total, pieces, options, limits)) as body:
                log.info("fetching %s%s through %s", redact_url(url), f" ({human_bytes(total)})" if total else "", how)
                yield body
    except FetchError as error:
        raise DownloadError(str(error)) from None


def fetch_with_pget(url: str, destination: Path, options: FetchOptions) -> None:
    """`pget -x URL DEST` (Replicate's parallel downloader), its output logged without terminal codes or URL query."""
    log.info("fetching %s with pget", redact_url(url))
    said: deque[str] = deque(maxlen=20)
    with subprocess.Popen(["pget", "-x", url, str(destination)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as process:
        watchdog = threading.Timer(options.deadline_seconds, process.kill)
        watchdog.start()
        try:
            for line in process.stdout or ():
                shown = TERMINAL_CODES.sub("", line).replace(url, redact_url(url)).strip()
                if shown:
                    log.info("pget: %s", shown)
                    said.append(shown)
        finally:
            watchdog.cancel()
    if process.returncode < 0:
        raise DownloadError(f"pget did not finish {redact_url(url)} in the {options.deadline_seconds:.0f} s "
                            f"allowed for fetching a weights folder ({WEIGHTS_DOWNLOAD_TIMEOUT_ENV})")
    if process.returncode != 0:
        raise DownloadError(f"pget could not download {redact_url(url)} (exit {process.returncode}): "
                            + " / ".join(said))
    try:
        check_tree(destination, options.tar_limits())  # pget's own extraction checks no link targets
    except TarRefused as refusal:
        raise DownloadError(f"{redact_url(url)}, as pget unpacked it, {refusal}") from None


def unpack_streamed(url: str, unpacked: Path, options: FetchOptions) -> None:
    """The tar unpacked as it arrives, within one deadline; a file that changed between ranges starts over once."""
    deadline = options.deadline()
    for attempt in (1, 2):
        try:
            with tar_stream(url, options, deadline) as stream:
                unpack(io.BufferedReader(stream, 4 * MIB), unpacked, options.tar_limits())
            return
        except TarRefused as refusal:
            raise DownloadError(f"{redact_url(url)} {refusal}") from None
        except FileChanged as change:
            shutil.rmtree(unpacked, ignore_errors=True)
            if attempt == 2:
                raise DownloadError(f"{change}, and again after starting over; it must stay the same "
                                    "while setup fetches it") from None
            log.warning("%s; starting over", change)


def fetch_folder(url: str, target: Path, problems: Callable[[Path], list[str]],
                 options: FetchOptions = FetchOptions()) -> None:
    """Puts the tar's files (at its root, or under one top-level folder as in Replicate's tars) at `target`, or
    leaves `target` as it was. They wait at `<staging>/<target's name>` beside `target` until `problems` finds
    nothing wrong there; a previous, incomplete `target` is moved aside first, never mixed with them."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{target.name}-", dir=target.parent,
                                     ignore_cleanup_errors=True) as staging_name:
        staging = Path(staging_name)
        unpacked, folder = staging / ".unpacked", staging / target.name
        if options.use_pget and shutil.which("pget"):
            fetch_with_pget(url, unpacked, options)
        else:
            unpack_streamed(url, unpacked, options)
        entries = list(unpacked.iterdir())
        only = len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink()
        (entries[0] if only else unpacked).rename(folder)
        if found := problems(folder):
            raise DownloadError(f"{redact_url(url)} {'; '.join(found)}")
        if target.exists():
            target.rename(staging / ".replaced")
        folder.rename(target)
    log.info("%s: in place after %.1f s", target, time.perf_counter() - started)
