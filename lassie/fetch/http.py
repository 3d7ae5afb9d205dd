"""The project's one HTTP client, on httpx2, for every fetch (weights, COG_WEIGHTS, LASSIE_LORA_URL, extra LoRAs):
redirects followed by hand, every hop checked (http(s) only, a public address for user-given URLs, a token never
leaving its origin), URLs shown redacted, a `Deadline` bounding a trickle. Failures are `FetchError`s naming the
redacted URL and why; bounds and tokens come from the caller, never the environment."""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx2
from huggingface_hub import errors
from huggingface_hub.utils import tqdm

from lassie.fetch.addresses import AddressRule, FetchError, allowed_addresses
from lassie.settings import LORA_DOWNLOAD_TIMEOUT_ENV, MAX_LORA_BYTES_ENV, LoraSettings

logger = logging.getLogger(__name__)
for _library in ("httpx2", "httpcore2"):  # their request lines show whole URLs, signed queries included
    logging.getLogger(_library).setLevel(logging.WARNING)

# What a huggingface_hub call raises when the hub, the network or the disk fails it (LocalEntryNotFoundError: OSError).
HUB_ERRORS = (errors.HfHubHTTPError, errors.HFValidationError, httpx2.HTTPError, OSError)
MIB = 1024**2
MAX_JSON_BYTES = 16 * MIB
PROGRESS_FROM_BYTES = 64 * MIB
HEADERS = {"Accept-Encoding": "identity", "User-Agent": "lassie-fetcher"}


def redact_url(url: str) -> str:
    """The URL as logs and errors show it: no user info, no query (where signed URLs and `?token=` keep secrets)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid URL>"
    netloc = f"[{host}]{port}" if ":" in host else f"{host}{port}"
    query = "?…" if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}"


def redact_secrets(text: str, tokens: Mapping[str, str]) -> str:
    """Last line of defence for texts from other libraries: every configured token (variable name -> token) blanked."""
    for name, token in tokens.items():
        if len(token) >= 4:
            text = text.replace(token, f"<{name}>")
    return text


@dataclass(frozen=True)
class Credential:
    """A service's bearer token, bound to its origin; when empty, the env name still lets a 401/403 say what to set."""

    origin: str
    env_name: str
    token: str = field(default="", repr=False)

    @classmethod
    def from_settings(cls, origin_url: str, env_name: str, settings: LoraSettings) -> Credential:
        return cls(origin=origin_url, env_name=env_name, token=settings.tokens.get(env_name, ""))

    def applies_to(self, url: str) -> bool:
        """False for a URL that cannot be read: the next hop's check refuses it by name."""
        try:
            return bool(self.token) and httpx2.URL(url).origin == httpx2.URL(self.origin).origin
        except (ValueError, httpx2.InvalidURL):
            return False


@dataclass(frozen=True)
class Deadline:
    """The whole time one fetch may take (requests, redirects, bytes and what the caller does with them), from its
    creation: a trickle never trips a per-read timeout. The default is an extra LoRA's, unbounded until settings say."""

    seconds: float = math.inf
    variable: str = LORA_DOWNLOAD_TIMEOUT_ENV
    purpose: str = "fetching a LoRA"
    started: float = field(default_factory=time.monotonic)

    def remaining(self) -> float:
        return max(self.started + self.seconds - time.monotonic(), 0.0)

    def check(self, url: str, received: int | None = None) -> None:
        if self.remaining() == 0:
            got = "" if received is None else f" ({human_bytes(received)} had arrived)"
            raise FetchError(f"the download of {redact_url(url)} took longer than the {self.seconds:g} s "
                             f"allowed for {self.purpose} ({self.variable}){got}")


@dataclass(frozen=True)
class DownloadLimits:
    """Everything that bounds one fetch, and the tokens no error of it may show; one per fetch (its deadline starts)."""

    max_bytes: int = LoraSettings.max_download_bytes
    connect_timeout: float = 15.0
    read_timeout: float = 60.0
    max_redirects: int = 8
    rule: AddressRule = field(default_factory=AddressRule)
    tokens: Mapping[str, str] = field(default_factory=dict, repr=False)  # variable name -> token
    deadline: Deadline = field(default_factory=Deadline)

    @classmethod
    def from_settings(cls, settings: LoraSettings) -> DownloadLimits:
        return cls(max_bytes=settings.max_download_bytes, rule=AddressRule.from_settings(settings),
                   tokens=settings.tokens, deadline=Deadline(float(settings.download_timeout)))

    def timeout(self) -> httpx2.Timeout:
        """Socket timeouts for the next request: the usual ones, but never past the deadline."""
        left = max(self.deadline.remaining(), 0.001)
        return httpx2.Timeout(min(self.read_timeout, left), connect=min(self.connect_timeout, left))


def human_bytes(count: float) -> str:
    if count < 1024:
        return f"{count:.0f} bytes"
    exponent = min(int(math.log(count, 1024)), 3)
    return f"{count / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


def new_client(connections: int = 1) -> httpx2.Client:
    """Follows nothing by itself, reads nothing from the environment (proxy, .netrc): every hop and header is ours."""
    return httpx2.Client(follow_redirects=False, trust_env=False, headers=HEADERS,
                         limits=httpx2.Limits(max_connections=connections, max_keepalive_connections=connections))


def checked_url(url: str) -> httpx2.URL:
    """Only http(s) with a host goes on (never file://, ftp://, ...), at the first hop or any redirect."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
        parsed = httpx2.URL(url)
    except (ValueError, httpx2.InvalidURL):
        raise FetchError(f"{redact_url(url)} is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise FetchError(f"only http(s) URLs are fetched; refusing a {parts.scheme or 'schemeless'} URL")
    if not parsed.host:
        raise FetchError(f"{redact_url(url)} has no host")
    return parsed


def _send(client: httpx2.Client, url: str, headers: dict[str, str], limits: DownloadLimits) -> httpx2.Response:
    """One request, body unread; unless every address is allowed, it connects to a checked one (Host, SNI kept)."""
    target = checked_url(url)
    client.cookies.clear()  # nothing one host set travels to the next
    if limits.rule.allow_all:
        return client.send(client.build_request("GET", target, headers=headers, timeout=limits.timeout()), stream=True)
    host_header = target.netloc.decode("ascii")
    last_error: httpx2.HTTPError = httpx2.ConnectError("no address to connect to")
    for address in allowed_addresses(target.host, target.origin.port, limits.rule):
        pinned = target.copy_with(host=str(address))
        request = client.build_request("GET", pinned, headers={**headers, "Host": host_header},
                                       timeout=limits.timeout(), extensions={"sni_hostname": target.host})
        try:
            return client.send(request, stream=True)
        except httpx2.ConnectError as error:
            last_error = error
    raise last_error


def network_problem(error: BaseException, tokens: Mapping[str, str]) -> str:
    if isinstance(error, httpx2.TimeoutException | TimeoutError):
        return "the server did not answer in time"
    if isinstance(error, httpx2.RemoteProtocolError):
        return "the connection closed early"
    return redact_secrets(f"{type(error).__name__}: {error}".rstrip(": "), tokens)


def hub_problem(error: BaseException, described: str, *, revision: str | None, tokens: Mapping[str, str]) -> str:
    """huggingface_hub's failure with `described` (a repo, or a file in one) in words saying what to do, token-free."""
    if isinstance(error, errors.GatedRepoError):
        return f"{described} is gated: accept its terms on Hugging Face and set HF_TOKEN to a token of that account"
    if isinstance(error, errors.RepositoryNotFoundError):
        access = "HF_TOKEN has no access to it" if tokens.get("HF_TOKEN") else "if it is private, set HF_TOKEN"
        return f"{described} not found ({access})"
    if isinstance(error, errors.RevisionNotFoundError):
        return f"{described}: revision {revision!r} not found"
    if isinstance(error, errors.RemoteEntryNotFoundError):
        return f"{described}: file not found"
    if isinstance(error, errors.HfHubHTTPError):
        status = error.response.status_code if error.response is not None else "?"
        return f"{described}: Hugging Face answered HTTP {status}"
    if isinstance(error, errors.HFValidationError):
        return f"{described}: not a valid Hugging Face repo id or revision"
    reason = redact_secrets(f"{type(error).__name__}: {error}", tokens)[:300]
    return f"{described}: could not be downloaded ({reason})"


def request(client: httpx2.Client, url: str, *, limits: DownloadLimits, credential: Credential | None = None,
            headers: Mapping[str, str] | None = None) -> tuple[httpx2.Response, str]:
    """A 2xx response, its body unread (the caller closes it), and the URL it finally came from, every redirect hop
    checked. Once a redirect leaves the credential's origin the credential is dropped for good."""
    current = url
    for _ in range(limits.max_redirects + 1):
        limits.deadline.check(current)
        sent = dict(headers or {})
        if credential is not None and credential.applies_to(current):
            sent["Authorization"] = f"Bearer {credential.token}"
        try:
            response = _send(client, current, sent, limits)
        except httpx2.HTTPError as error:
            limits.deadline.check(current)
            raise FetchError(f"could not download {redact_url(current)}: "
                             f"{network_problem(error, limits.tokens)}") from None
        if not response.has_redirect_location:
            break
        response.close()
        following = urljoin(current, response.headers["Location"])
        logger.debug("%s redirects to %s", redact_url(current), redact_url(following))
        credential = credential if credential is not None and credential.applies_to(following) else None
        current = following
    else:
        raise FetchError(f"{redact_url(url)} redirects more than {limits.max_redirects} times")
    if not response.is_success:
        response.close()
        status = response.status_code
        problem = "not found (HTTP 404)" if status == 404 else f"the server answered HTTP {status}"
        if status in (401, 403) and credential is not None:
            problem = (f"it refused the token in {credential.env_name} (HTTP {status})" if credential.token
                       else f"it needs a token (HTTP {status}): set {credential.env_name}")
        raise FetchError(f"could not download {redact_url(current)}: {problem}")
    return response, current


def body_pieces(response: httpx2.Response, url: str, limits: DownloadLimits, received: int = 0) -> Iterator[bytes]:
    """The body as the network delivers it, undecoded, one receive a piece (a trickle arrives byte by byte rather than
    blocking a large read), the deadline checked before each. `received`: bytes of the file before this body."""
    try:
        limits.deadline.check(url, received)
        for piece in response.iter_raw():
            received += len(piece)
            yield piece
            limits.deadline.check(url, received)
    except httpx2.HTTPError as error:
        limits.deadline.check(url, received)
        problem = network_problem(error, limits.tokens)
        how = f"was cut short ({problem})" if isinstance(error, httpx2.RemoteProtocolError) else f"failed: {problem}"
        raise FetchError(f"the download of {redact_url(url)} {how}") from None


def declared_length(response: httpx2.Response) -> int | None:
    value = (response.headers.get("Content-Length") or "").strip()
    return int(value) if value.isdigit() else None


def download_file(url: str, destination: Path, *, credential: Credential | None = None,
                  limits: DownloadLimits | None = None) -> int:
    """`url` into `destination` (a temporary name the caller owns), capped by Content-Length and as it streams."""
    limits = limits or DownloadLimits()
    received = 0
    with new_client() as client, closing(request(client, url, credential=credential, limits=limits)[0]) as response:
        declared = declared_length(response)
        _check_size(declared or 0, limits.max_bytes, url)
        logger.info("downloading %s%s", redact_url(url), f" ({human_bytes(declared)})" if declared else "")
        with destination.open("wb") as sink, ProgressLog(total=declared, desc=redact_url(url), unit="B") as progress:
            for piece in body_pieces(response, url, limits):
                received += len(piece)
                _check_size(received, limits.max_bytes, url)
                sink.write(piece)
                progress.update(len(piece))
    if declared is not None and received != declared:
        raise FetchError(f"the download of {redact_url(url)} was cut short ({received} of {declared} bytes)")
    logger.info("downloaded %s (%s)", redact_url(url), human_bytes(received))
    return received


def fetch_json(url: str, *, credential: Credential | None = None, limits: DownloadLimits) -> Any:
    """A small JSON API answer (CivitAI), size-capped like any download; too small for a progress report."""
    body = bytearray()
    with new_client() as client, closing(request(client, url, credential=credential, limits=limits)[0]) as response:
        for piece in body_pieces(response, url, limits):
            body += piece
            _check_size(len(body), MAX_JSON_BYTES, url)
    try:
        return json.loads(body)
    except ValueError:
        raise FetchError(f"{redact_url(url)} did not answer with JSON") from None


def _check_size(size: int, max_bytes: int, url: str) -> None:
    if size > max_bytes:
        raise FetchError(f"{redact_url(url)} is larger than the {human_bytes(max_bytes)} allowed for a LoRA "
                         f"({MAX_LORA_BYTES_ENV}); a LoRA is usually well under 1 GiB")


class ProgressLog(tqdm):
    """A large download's progress as log lines (Cog's logs show no bars), a bar on a terminal: one per tenth (per 256
    MiB of unknown sizes), none under 64 MiB. Also huggingface_hub's `tqdm_class` for the weights: it counts on its own,
    as huggingface_hub turns a bar off (and tqdm then skips setting it up) when setup disables library bars."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if to_log := not sys.stderr.isatty():
            kwargs |= {"disable": False, "file": io.StringIO()}
        super().__init__(*args, **kwargs)
        self._label = kwargs.get("desc") or ""
        self._received = kwargs.get("initial") or 0
        self._size = kwargs.get("total") if kwargs.get("unit") == "B" else None
        quiet = kwargs.get("unit") != "B" or (self._size is not None and self._size < PROGRESS_FROM_BYTES)
        self._step = max(int(self._size) // 10, 1) if self._size else 4 * PROGRESS_FROM_BYTES
        self._next_report = self._step if to_log and not quiet else math.inf

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        self._received += n or 0
        if self._received >= self._next_report:
            self._next_report = (int(self._received) // self._step + 1) * self._step
            share = f" ({100 * int(self._received) // int(self._size)}%)" if self._size else ""
            logger.info("%s: %s%s", self._label, human_bytes(self._received), share)
        return shown
