"""Fetching a folder of weights as one tar, at full speed, so that a half-fetched folder never looks complete.

Replicate serves its FLUX weights as tars from a public host that answers HTTP range requests.
Where `pget` (Replicate's parallel downloader) is on PATH it fetches and extracts; otherwise the
tar comes through parallel range requests when the server allows them (one request tells: 206
Partial Content), reassembled in order and extracted while it arrives, else as one stream. Either
way it is unpacked into a staging folder beside its target and renamed into place only once
complete and checked; the staging folder is removed whatever happens.

The addresses are the operator's (cog.yaml's `environment:` or the container's), trusted like
LASSIE_LORA_URL: any host, loopback and private mirrors included. Sizes, members and time are
bounded, and progress is logged (one line per tenth, no terminal control codes).
"""

from __future__ import annotations

import http.client
import io
import logging
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lassie.fetch.http import ProgressLog, human_bytes, redact_url
from lassie.fetch.tars import TarLimits, TarRefused, check_tree, unpack

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
    deadline_seconds: float = 3 * 3600.0
    max_bytes: int = 256 * GIB
    max_members: int = 100_000
    retries: int = 3
    use_pget: bool = True

    @property
    def window(self) -> int:
        """Chunks fetched ahead of the extraction: memory held is window x chunk_bytes at most."""
        return self.connections + max(self.connections // 2, 2)


# --- one tar as a byte stream -------------------------------------------------------------------


def _open(url: str, options: FetchOptions, byte_range: tuple[int, int] | None = None) -> http.client.HTTPResponse:
    headers = {"Accept-Encoding": "identity", "User-Agent": "lassie-weights-fetcher"}
    if byte_range is not None:
        headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=options.read_timeout)
    except urllib.error.HTTPError as error:
        raise DownloadError(f"could not download {redact_url(url)}: the server answered HTTP {error.code}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(f"could not download {redact_url(url)}: {reason}") from None


class _Body(io.RawIOBase):
    """The bytes of a tar in order, with the checks every source shares: size cap, deadline, progress."""

    def __init__(self, url: str, total: int | None, options: FetchOptions) -> None:
        super().__init__()
        self.url, self.total, self.options = url, total, options
        self.received = 0
        self._deadline = time.monotonic() + options.deadline_seconds
        self._progress = ProgressLog(total=total, desc=redact_url(url), unit="B")
        if total is not None and total > options.max_bytes:
            raise DownloadError(f"{redact_url(url)} is {human_bytes(total)}, more than the "
                                f"{human_bytes(options.max_bytes)} a weights folder may be")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        if time.monotonic() > self._deadline:
            raise DownloadError(f"the download of {redact_url(self.url)} took longer than "
                                f"{self.options.deadline_seconds:.0f} s and was stopped")
        count = self._next(buffer)
        self.received += count
        if self.received > self.options.max_bytes:
            raise DownloadError(f"{redact_url(self.url)} sent more than {human_bytes(self.options.max_bytes)}")
        self._progress.update(count)
        return count

    def _next(self, buffer: memoryview) -> int:
        raise NotImplementedError

    def cut_short(self, detail: str) -> DownloadError:
        return DownloadError(f"the download of {redact_url(self.url)} was cut short ({detail})")

    def close(self) -> None:
        self._progress.close()
        super().close()


class OneStream(_Body):
    """The whole tar in one response: a server without range requests."""

    def __init__(self, url: str, response: http.client.HTTPResponse, options: FetchOptions) -> None:
        length = response.getheader("Content-Length") or ""
        super().__init__(url, int(length) if length.isdigit() else None, options)
        self.response = response

    def _next(self, buffer: memoryview) -> int:
        try:
            count = self.response.readinto(buffer)
        except (OSError, http.client.HTTPException) as error:
            raise self.cut_short(f"{self.received} bytes received: {type(error).__name__}") from None
        if count == 0 and self.total is not None and self.received < self.total:
            raise self.cut_short(f"{self.received} of {self.total} bytes")
        return count

    def close(self) -> None:
        self.response.close()
        super().close()


class ParallelRanges(_Body):
    """The tar in chunks fetched over several connections at once, handed on strictly in order.

    At most `options.window` chunks are in flight or waiting, so memory stays bounded however
    far the network runs ahead of the extraction. A chunk that fails is asked for again
    (`options.retries` times) before the fetch gives up.
    """

    def __init__(self, url: str, first: http.client.HTTPResponse, total: int, options: FetchOptions) -> None:
        super().__init__(url, total, options)
        self._pool = ThreadPoolExecutor(options.connections, thread_name_prefix="lassie-download")
        self._queue: deque[Future[bytes]] = deque()
        first_end = min(options.chunk_bytes, total)
        self._queue.append(self._pool.submit(self._read_exactly, first, 0, first_end))
        self._next_start = first_end
        self._current = memoryview(b"")
        self._top_up()

    def _top_up(self) -> None:
        while len(self._queue) < self.options.window and self._next_start < self.total:
            start, end = self._next_start, min(self._next_start + self.options.chunk_bytes, self.total)
            self._queue.append(self._pool.submit(self._fetch, start, end))
            self._next_start = end

    def _fetch(self, start: int, end: int) -> bytes:
        problem = ""
        for _ in range(self.options.retries):
            try:
                response = _open(self.url, self.options, (start, end))
                if response.status != 206:
                    response.close()
                    raise DownloadError(f"the server stopped answering range requests (HTTP {response.status})")
                return self._read_exactly(response, start, end)
            except DownloadError as error:
                problem = str(error)
        raise DownloadError(f"{problem} (bytes {start}-{end - 1}, tried {self.options.retries} times)")

    def _read_exactly(self, response: http.client.HTTPResponse, start: int, end: int) -> bytes:
        with response:
            try:
                data = response.read(end - start)
            except (OSError, http.client.HTTPException) as error:
                raise self.cut_short(f"bytes {start}-{end - 1}: {type(error).__name__}") from None
        if len(data) != end - start:
            raise self.cut_short(f"bytes {start}-{end - 1}: {len(data)} of {end - start} received")
        return data

    def _next(self, buffer: memoryview) -> int:
        if not self._current:
            if not self._queue:
                return 0
            self._current = memoryview(self._queue.popleft().result())
            self._top_up()
        count = min(len(buffer), len(self._current))
        buffer[:count] = self._current[:count]
        self._current = self._current[count:]
        return count

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        super().close()


@contextmanager
def tar_stream(url: str, options: FetchOptions = FetchOptions()) -> Iterator[_Body]:
    """The tar's bytes, through parallel ranges when one first ranged request is answered with 206."""
    first = _open(url, options, (0, options.chunk_bytes) if options.connections > 1 else None)
    match = CONTENT_RANGE.fullmatch(first.getheader("Content-Range") or "")
    if first.status == 206 and not (match and int(match.group(1)) == 0):
        first.close()  # a part of unknown total: ask for the whole instead
        first = _open(url, options)
    try:
        if first.status == 206 and match and int(match.group(1)) == 0:
            body: _Body = ParallelRanges(url, first, int(match.group(3)), options)
            how = f"{options.connections} parallel ranges"
        else:
            body = OneStream(url, first, options)
            how = "one stream (the server does not answer range requests)"
    except DownloadError:
        first.close()
        raise
    log.info("fetching %s%s through %s", redact_url(url), f" ({human_bytes(body.total)})" if body.total else "", how)
    try:
        yield body
    finally:
        body.close()


# --- a folder from a tar ------------------------------------------------------------------------


def extract(stream: io.RawIOBase, destination: Path, options: FetchOptions) -> int:
    """Unpacks a tar stream as it arrives, under the one tar policy (`lassie.fetch.tars`). Returns the member count."""
    return unpack(io.BufferedReader(stream, 4 * MIB), destination, tar_limits(options))


def tar_limits(options: FetchOptions) -> TarLimits:
    return TarLimits(max_members=options.max_members, max_bytes=options.max_bytes)


def pget_path() -> str | None:
    return shutil.which("pget")


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
        raise DownloadError(f"pget did not finish {redact_url(url)} in {options.deadline_seconds:.0f} s")
    if process.returncode != 0:
        raise DownloadError(f"pget could not download {redact_url(url)} (exit {process.returncode}): "
                            + " / ".join(said))
    try:
        check_tree(destination, tar_limits(options))  # pget's own extraction checks no link targets
    except TarRefused as refusal:
        raise DownloadError(f"{redact_url(url)}, as pget unpacked it, {refusal}") from None


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
        pget = pget_path() if options.use_pget else None
        if pget is not None:
            fetch_with_pget(pget, url, unpacked, options)
        else:
            with tar_stream(url, options) as stream:
                extract(stream, unpacked, options)
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
