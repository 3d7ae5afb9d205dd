"""Fetching a folder of weights as one tar, at full speed, so that a half-fetched folder never looks complete.

Replicate serves its FLUX weights as tars from a public host that answers HTTP range requests.
Where `pget` (Replicate's parallel downloader) is on PATH it fetches and extracts; otherwise the
tar comes through parallel range requests when the server allows them (one request tells: 206
Partial Content, with an ETag or Last-Modified to hold every later range to), reassembled in order
and extracted while it arrives, else as one stream. Either way it is unpacked into a staging
folder beside its target and renamed into place only once complete and checked.

The addresses are the operator's (cog.yaml's `environment:` or the container's), trusted like
LASSIE_LORA_URL: any host, loopback and private mirrors included. They come through the project's
one HTTP client (`lassie.fetch.http`). Sizes, members and time (LASSIE_WEIGHTS_DOWNLOAD_TIMEOUT per
folder) are bounded, and progress is logged (one line per tenth, no terminal control codes).
"""

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
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
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
GIB = 1024**3
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
STAGING_PREFIX = ".fetching-"


class DownloadError(RuntimeError):
    """A folder could not be fetched; the message names the URL (without its query) and why."""


@dataclass(frozen=True)
class FetchOptions:
    """The bounds and the parallelism of one folder's fetch; tests and the benchmark pass their own."""

    connections: int = 16
    chunk_bytes: int = 16 * MIB
    read_timeout: float = 60.0
    deadline_seconds: float = ProvisionSettings.weights_download_timeout  # LASSIE_WEIGHTS_DOWNLOAD_TIMEOUT
    max_bytes: int = 256 * GIB
    max_members: int = 100_000
    retries: int = 3
    use_pget: bool = True

    @property
    def window(self) -> int:
        """Chunks fetched ahead of the extraction: memory held is window x chunk_bytes at most."""
        return self.connections + max(self.connections // 2, 2)


# --- one tar as a byte stream -------------------------------------------------------------------


class FileChanged(DownloadError):
    """The file at the URL changed between two of its range requests: what arrived is no one version."""


@dataclass(frozen=True)
class Version:
    """What names one version of the file: its strong ETag, else its Last-Modified date. Each range
    request sends it as `If-Range`, so a changed file comes back whole (200) rather than as a part
    of another version, and each 206 must carry the same."""

    etag: str | None
    last_modified: str | None

    @classmethod
    def of(cls, response: httpx2.Response) -> Version:
        etag = response.headers.get("ETag")
        return cls(etag if etag and not etag.startswith("W/") else None, response.headers.get("Last-Modified"))

    @property
    def if_range(self) -> str | None:
        return self.etag or self.last_modified

    def contradicted_by(self, other: Version) -> bool:
        """A part names another version (a part that names none was held to ours by If-Range)."""
        if self.etag and other.etag:
            return other.etag != self.etag
        return bool(self.last_modified and other.last_modified and other.last_modified != self.last_modified)


def ranged_get(client: httpx2.Client, url: str, limits: DownloadLimits, byte_range: tuple[int, int] | None = None,
               if_range: str | None = None) -> tuple[httpx2.Response, str]:
    """A 2xx response to a GET (a byte range of it when `byte_range` is given) and its final URL."""
    headers = {}
    if byte_range is not None:
        headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
        if if_range is not None:
            headers["If-Range"] = if_range
    return request(client, url, limits=limits, headers=headers)


class _Body(io.RawIOBase):
    """The bytes of a tar in order, with the checks every source shares: size cap, deadline, progress.
    A source hands on its pieces in order (`_next_piece`); `readinto` copies them out."""

    def __init__(self, url: str, total: int | None, options: FetchOptions, limits: DownloadLimits) -> None:
        super().__init__()
        self.url, self.total, self.options, self.limits = url, total, options, limits
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
            self._current = memoryview(self._next_piece() or b"")
        count = min(len(buffer), len(self._current))
        buffer[:count] = self._current[:count]
        self._current = self._current[count:]
        self.received += count
        if self.received > self.options.max_bytes:
            raise DownloadError(f"{redact_url(self.url)} sent more than {human_bytes(self.options.max_bytes)}")
        self._progress.update(count)
        return count

    def _next_piece(self) -> bytes | bytearray | None:
        """The next bytes of the tar, None at its end."""
        raise NotImplementedError

    def cut_short(self, detail: str) -> DownloadError:
        return DownloadError(f"the download of {redact_url(self.url)} was cut short ({detail})")

    def close(self) -> None:
        self._progress.close()
        super().close()


class OneStream(_Body):
    """The whole tar in one response: a server without range requests (or without a version to
    check ranges against)."""

    def __init__(self, url: str, response: httpx2.Response, options: FetchOptions, limits: DownloadLimits) -> None:
        super().__init__(url, declared_length(response), options, limits)
        self.response = response
        self._pieces = body_pieces(response, url, limits.deadline)

    def _next_piece(self) -> bytes | None:
        piece = next(self._pieces, None)
        if piece is None and self.total is not None and self.received < self.total:
            raise self.cut_short(f"{self.received} of {self.total} bytes")
        return piece

    def close(self) -> None:
        self.response.close()
        super().close()


class ParallelRanges(_Body):
    """The tar in chunks fetched over several connections at once, handed on strictly in order.

    At most `options.window` chunks are in flight or waiting, so memory stays bounded however
    far the network runs ahead of the extraction. Every chunk is asked for with `If-Range` and
    must come back as exactly the range asked for, of the same version (else `FileChanged`); a
    chunk that fails otherwise is asked for again (`options.retries` times) before the fetch gives up.
    """

    def __init__(self, url: str, source: str, first: httpx2.Response, total: int, version: Version,
                 options: FetchOptions, limits: DownloadLimits, client: httpx2.Client) -> None:
        super().__init__(url, total, options, limits)
        self.source, self.version, self.client = source, version, client
        self._pool = ThreadPoolExecutor(options.connections, thread_name_prefix="lassie-download")
        self._queue: deque[Future[bytearray]] = deque()
        first_end = min(options.chunk_bytes, total)
        self._queue.append(self._pool.submit(self._read_exactly, first, 0, first_end))
        self._next_start = first_end
        self._top_up()

    def _top_up(self) -> None:
        while len(self._queue) < self.options.window and self._next_start < self.total:
            start, end = self._next_start, min(self._next_start + self.options.chunk_bytes, self.total)
            self._queue.append(self._pool.submit(self._fetch, start, end))
            self._next_start = end

    def _fetch(self, start: int, end: int) -> bytearray:
        problem = ""
        for _ in range(self.options.retries):
            try:
                response, _ = ranged_get(self.client, self.source, self.limits, (start, end), self.version.if_range)
                self._check_part(response, start, end)
                return self._read_exactly(response, start, end)
            except FileChanged:
                raise
            except (DownloadError, FetchError) as error:
                problem = str(error)
        raise DownloadError(f"{problem} (bytes {start}-{end - 1}, tried {self.options.retries} times)")

    def _check_part(self, response: httpx2.Response, start: int, end: int) -> None:
        """The range asked for, of the version the first part came from; a changed file is
        answered whole (200) by an If-Range request, or names another version."""
        if response.status_code == 200 or self.version.contradicted_by(Version.of(response)):
            response.close()
            raise FileChanged(f"{redact_url(self.url)} changed while it was being downloaded")
        asked = f"bytes {start}-{end - 1}/{self.total}"
        answered = response.headers.get("Content-Range") or ""
        if response.status_code != 206 or answered.strip() != asked:
            response.close()
            raise DownloadError(f"{redact_url(self.url)} answered a range request for {asked} with HTTP "
                                f"{response.status_code} {answered or '(no Content-Range)'}")

    def _read_exactly(self, response: httpx2.Response, start: int, end: int) -> bytearray:
        data = bytearray()
        try:
            for piece in body_pieces(response, self.url, self.limits.deadline, received=start):
                data += piece
                if len(data) > end - start:
                    raise DownloadError(f"{redact_url(self.url)} sent more than bytes {start}-{end - 1}")
        finally:
            response.close()
        if len(data) != end - start:
            raise self.cut_short(f"bytes {start}-{end - 1}: {len(data)} of {end - start} received")
        return data

    def _next_piece(self) -> bytearray | None:
        if not self._queue:
            return None
        piece = self._queue.popleft().result()
        self._top_up()
        return piece

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        super().close()


def folder_deadline(options: FetchOptions) -> Deadline:
    return Deadline(options.deadline_seconds, WEIGHTS_DOWNLOAD_TIMEOUT_ENV, "fetching a weights folder")


def _first_part(response: httpx2.Response, options: FetchOptions) -> int | None:
    """The file's total size when `response` is exactly the first range asked for, else None."""
    match = CONTENT_RANGE.fullmatch((response.headers.get("Content-Range") or "").strip())
    if response.status_code != 206 or match is None:
        return None
    total = int(match.group(3))
    if int(match.group(1)) != 0 or int(match.group(2)) != min(options.chunk_bytes, total) - 1:
        return None
    return total


def open_body(client: httpx2.Client, url: str, options: FetchOptions, limits: DownloadLimits) -> _Body:
    """Parallel ranges when one first ranged request is answered with exactly that range and a
    version (ETag or Last-Modified) to hold the other ranges to; else one stream."""
    ranged = options.connections > 1
    first, source = ranged_get(client, url, limits, (0, options.chunk_bytes) if ranged else None)
    total, version = _first_part(first, options), Version.of(first)
    if first.status_code == 206 and (total is None or version.if_range is None):
        first.close()  # a part that cannot be checked, or of unknown total: ask for the whole instead
        first, source = ranged_get(client, url, limits)
        total = None
    try:
        if total is not None:
            body: _Body = ParallelRanges(url, source, first, total, version, options, limits, client)
            how = f"{options.connections} parallel ranges"
        else:
            body = OneStream(url, first, options, limits)
            how = "one stream" + (" (the server does not answer range requests)" if ranged else "")
    except DownloadError:
        first.close()
        raise
    log.info("fetching %s%s through %s", redact_url(url), f" ({human_bytes(body.total)})" if body.total else "", how)
    return body


@contextmanager
def tar_stream(url: str, options: FetchOptions = FetchOptions(), deadline: Deadline | None = None) -> Iterator[_Body]:
    """The tar's bytes (`open_body`); the HTTP client's errors, while opening or reading, become DownloadErrors."""
    limits = DownloadLimits(read_timeout=options.read_timeout, rule=AddressRule(allow_all=True),  # the operator's
                            deadline=deadline or folder_deadline(options))
    try:
        with new_client(options.connections) as client, closing(open_body(client, url, options, limits)) as body:
            yield body
    except FetchError as error:
        raise DownloadError(str(error)) from None


# --- a folder from a tar ------------------------------------------------------------------------


def tar_limits(options: FetchOptions) -> TarLimits:
    return TarLimits(max_members=options.max_members, max_bytes=options.max_bytes)


def fetch_with_pget(pget: str, url: str, destination: Path, options: FetchOptions) -> None:
    """`pget -x URL DEST`: Replicate's downloader fetches in parallel chunks and extracts as it goes.
    Its output is passed on as log lines (without terminal control codes or the URL's query)."""
    log.info("fetching %s with pget", redact_url(url))
    said: deque[str] = deque(maxlen=20)
    with subprocess.Popen([pget, "-x", url, str(destination)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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
        check_tree(destination, tar_limits(options))  # pget's own extraction checks no link targets
    except TarRefused as refusal:
        raise DownloadError(f"{redact_url(url)}, as pget unpacked it, {refusal}") from None


def unpack_streamed(url: str, unpacked: Path, options: FetchOptions) -> None:
    """The tar at `url` unpacked into `unpacked` as it arrives, within one deadline for the folder.
    A file that changed between range requests starts over once; twice is a failure."""
    deadline = folder_deadline(options)
    for attempt in (1, 2):
        try:
            with tar_stream(url, options, deadline) as stream:
                unpack(io.BufferedReader(stream, 4 * MIB), unpacked, tar_limits(options))
            return
        except FileChanged as change:
            shutil.rmtree(unpacked, ignore_errors=True)
            if attempt == 2:
                raise DownloadError(f"{change}, and again after starting over; it must stay the same "
                                    "while setup fetches it") from None
            log.warning("%s; starting over", change)


def single_root(unpacked: Path) -> Path:
    """The folder the files sit in: the tar's root, or its one top-level folder (as in Replicate's
    `FLUX.1-dev/...` tars)."""
    entries = list(unpacked.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return unpacked


def replace_folder(new: Path, target: Path, staging: Path) -> None:
    """Renames `new` to `target` (same filesystem); a previous, incomplete `target` is moved into
    the staging folder first, so at no moment is a mixture of both at `target`."""
    if target.exists():
        target.rename(staging / "replaced")
    target.parent.mkdir(parents=True, exist_ok=True)
    new.rename(target)


def fetch_folder(url: str, target: Path, staging_root: Path, problems: Callable[[Path], list[str]],
                 options: FetchOptions = FetchOptions()) -> None:
    """Puts the contents of the tar at `url` at `target`, or leaves `target` as it was.

    The tar is unpacked in a staging folder under `staging_root` (on the target's filesystem);
    `problems(folder)` lists what is wrong with the unpacked folder (files it lacks, files that fail
    their check), and only an empty list lets it be renamed into place.
    """
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{target.name}-", dir=staging_root))
    try:
        unpacked = staging / "unpacked"
        pget = shutil.which("pget") if options.use_pget else None
        if pget is not None:
            fetch_with_pget(pget, url, unpacked, options)
        else:
            unpack_streamed(url, unpacked, options)
        folder = single_root(unpacked)
        found = problems(folder)
        if found:
            raise DownloadError(f"{redact_url(url)} {'; '.join(found)}")
        replace_folder(folder, target, staging)
    except TarRefused as refusal:
        raise DownloadError(f"{redact_url(url)} {refusal}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s: in place after %.1f s", target, time.perf_counter() - started)


def remove_leftovers(staging_root: Path) -> None:
    """Staging folders of a fetch that was killed (call with the fetch lock held)."""
    for leftover in staging_root.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
