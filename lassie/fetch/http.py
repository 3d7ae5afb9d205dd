"""Fetching untrusted files safely: public addresses only, secrets kept, sizes bounded.

`extra_lora` makes the server fetch any URL a user types, so every hop (the first one and each
redirect) must land on a public address, and the connection goes to exactly the address that was
checked (a second DNS answer cannot swap in 127.0.0.1). Tokens belong to one service origin and
never follow a redirect elsewhere; URLs are shown without their query strings, because signed URLs
carry secrets there. What was fetched is checked in `lassie.fetch.files`.

Every bound, exception and token comes from the operator's `LoraSettings`; nothing here reads the
environment.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import json
import logging
import math
import re
import socket
import ssl
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import SplitResult, urljoin, urlsplit

from huggingface_hub.utils import tqdm

from lassie.request.errors import EXTRA_LORA_FIELD as FIELD
from lassie.request.errors import InputError
from lassie.settings import ALLOW_PRIVATE_ENV, LORA_DOWNLOAD_TIMEOUT_ENV, MAX_LORA_BYTES_ENV, LoraSettings

logger = logging.getLogger(__name__)


MIB = 1024**2
MAX_JSON_BYTES = 16 * MIB
CHUNK_BYTES = MIB
PROGRESS_FROM_BYTES = 64 * MIB
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
NUMERIC_IPV4 = re.compile(r"(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}", re.IGNORECASE)
ADDRESS_CLASSES = (
    ("unspecified", "is_unspecified"),
    ("loopback", "is_loopback"),
    ("link-local", "is_link_local"),
    ("multicast", "is_multicast"),
    ("reserved", "is_reserved"),
    ("private", "is_private"),
)


# --- the address rule (pure) -------------------------------------------------------------------


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a host string spells by itself, including the old `2130706433` and `0x7f000001`
    forms that resolvers still honour; None for real host names."""
    bare = host.strip("[]")
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    if NUMERIC_IPV4.fullmatch(bare):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(bare))
        except OSError:
            return None
    return None


def address_refusal(address: IPAddress) -> str | None:
    """Why a fetch must not reach `address` (e.g. "loopback"), or None for a public address.

    IPv6 forms that carry an IPv4 address (mapped, 6to4, Teredo, NAT64) are judged by that address.
    """
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        reason = address_refusal(embedded)
        if reason is not None:
            return f"{reason} (as {address})"
    for name, attribute in ADDRESS_CLASSES:
        if getattr(address, attribute):
            return name
    return None if address.is_global else "not publicly routable"


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@dataclass(frozen=True)
class AddressRule:
    """The address rule plus the operator's exceptions from `LASSIE_ALLOW_PRIVATE_URLS`:
    every address (tests, private mirrors), or just the listed addresses and networks."""

    allow_all: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, settings: LoraSettings) -> AddressRule:
        return cls(allow_all=settings.allow_all_addresses, allowed_networks=settings.allowed_networks)

    def refusal(self, address: IPAddress) -> str | None:
        if self.allow_all or any(address in network for network in self.allowed_networks):
            return None
        return address_refusal(address)


# --- secrets never shown -----------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL as logs and errors show it: no user info and no query string (signed URLs and
    `?token=` links keep their secrets there)."""
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
    """Last line of defence for texts from other libraries: blanks out every configured token
    (`tokens`: variable name -> token)."""
    for name, token in tokens.items():
        if len(token) >= 4:
            text = text.replace(token, f"<{name}>")
    return text


@dataclass(frozen=True)
class Credential:
    """A service's bearer token, bound to that service's origin (scheme, host, port).

    The token may be empty: the env name still lets a 401/403 say which variable to set.
    """

    origin: str
    env_name: str
    token: str = field(default="", repr=False)

    @classmethod
    def from_settings(cls, origin_url: str, env_name: str, settings: LoraSettings) -> Credential:
        return cls(origin=origin_url, env_name=env_name, token=settings.tokens.get(env_name, ""))

    def applies_to(self, url: str) -> bool:
        return bool(self.token) and _origin(urlsplit(url)) == _origin(urlsplit(self.origin))


def _origin(parts: SplitResult) -> tuple[str, str, int]:
    default_port = 443 if parts.scheme == "https" else 80
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default_port


# --- limits -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DownloadLimits:
    """Everything that bounds one fetch, and the tokens no error of it may show; tests and
    callers pass tighter ones.

    `time_limit` bounds the whole fetch (every request, redirect and byte of it), counted from when
    the limits are made (one `DownloadLimits` per fetch): a server that trickles a byte at a time
    never trips the per-read timeout, so without it one download could hold a request (and its Cog
    slot) for as long as it likes.
    """

    max_bytes: int = LoraSettings.max_download_bytes
    connect_timeout: float = 15.0
    read_timeout: float = 60.0
    max_redirects: int = 8
    rule: AddressRule = AddressRule()
    tokens: Mapping[str, str] = field(default_factory=dict, repr=False)  # variable name -> token
    time_limit: float = math.inf  # extra LoRAs: LASSIE_LORA_DOWNLOAD_TIMEOUT (`from_settings`)
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def from_settings(cls, settings: LoraSettings) -> DownloadLimits:
        return cls(max_bytes=settings.max_download_bytes, rule=AddressRule.from_settings(settings),
                   tokens=settings.tokens, time_limit=float(settings.download_timeout))

    def remaining(self) -> float:
        """Seconds left of `time_limit`; 0 once it has passed."""
        return max(self.started + self.time_limit - time.monotonic(), 0.0)

    def timeout(self, per_step: float) -> float:
        """A socket timeout for the next step: `per_step`, but never past the overall limit."""
        return max(min(per_step, self.remaining()), 0.001)

    def overdue(self, url: str, received: int | None = None) -> InputError:
        got = "" if received is None else f" ({human_bytes(received)} had arrived)"
        return InputError(FIELD, f"the download of {redact_url(url)} took longer than the {self.time_limit:g} s "
                                 f"allowed for fetching a LoRA ({LORA_DOWNLOAD_TIMEOUT_ENV}){got}")


def human_bytes(count: float) -> str:
    if count < 1024:
        return f"{count:.0f} bytes"
    exponent = min(int(math.log(count, 1024)), 3)
    return f"{count / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


# --- connections pinned to the checked address -------------------------------------------------


def allowed_addresses(host: str, port: int, rule: AddressRule) -> list[IPAddress]:
    """Resolves once and checks every answer: one refused answer refuses the host, so a name that
    resolves to both a public and an internal address cannot be used to reach the internal one."""
    literal = parse_ip_literal(host)
    if literal is not None:
        _refuse_if_forbidden(host, literal, rule)
        return [literal]
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise InputError(FIELD, f"could not resolve host {host!r} ({error})") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(answer[4][0].split("%")[0]) for answer in answers))
    for address in addresses:
        _refuse_if_forbidden(host, address, rule)
    return addresses


def _refuse_if_forbidden(host: str, address: IPAddress, rule: AddressRule) -> None:
    reason = rule.refusal(address)
    if reason is None:
        return
    spelled = "" if host.strip("[]") == str(address) else f" (which is {address})"
    raise InputError(
        FIELD,
        f"refusing to fetch from {host}{spelled}: it is a {reason} address, and only public internet "
        f"addresses are fetched (operators of private mirrors can set {ALLOW_PRIVATE_ENV})",
    )


def _connect(addresses: list[IPAddress], port: int, limits: DownloadLimits) -> socket.socket:
    """Connects to the checked addresses themselves: no second name lookup happens here."""
    last_error: OSError = OSError("no address to connect to")
    for address in addresses:
        sock = socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(limits.timeout(limits.connect_timeout))
        try:
            sock.connect((str(address), port))
        except OSError as error:
            sock.close()
            last_error = error
            continue
        sock.settimeout(limits.timeout(limits.read_timeout))
        return sock
    raise last_error


class _TimedResponse(http.client.HTTPResponse):
    """A response that keeps its socket, so each read's timeout can shrink as the overall time
    limit nears (`response_class` of the connections below)."""

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.socket = sock


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Talks HTTP to `host` (Host header) over a socket to an address that was already checked."""

    response_class = _TimedResponse

    def __init__(self, host: str, port: int, addresses: list[IPAddress], limits: DownloadLimits) -> None:
        super().__init__(host, port, timeout=limits.connect_timeout)
        self.checked_addresses = addresses
        self.limits = limits

    def connect(self) -> None:
        self.sock = _connect(self.checked_addresses, self.port, self.limits)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """TLS is verified against the host name while the TCP connection goes to the checked address."""

    response_class = _TimedResponse

    def __init__(self, host: str, port: int, addresses: list[IPAddress], limits: DownloadLimits) -> None:
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=limits.connect_timeout, context=self.tls)
        self.checked_addresses = addresses
        self.limits = limits

    def connect(self) -> None:
        sock = _connect(self.checked_addresses, self.port, self.limits)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)


# --- requests with hand-checked redirects ------------------------------------------------------


def _checked_url(url: str) -> tuple[SplitResult, int]:
    """The URL's parts and port; only http(s) with a host goes on (never file://, ftp://, ...)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InputError(FIELD, f"{redact_url(url)} is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise InputError(FIELD, f"only http(s) URLs are fetched; refusing a {parts.scheme or 'schemeless'} URL")
    if not parts.hostname:
        raise InputError(FIELD, f"{redact_url(url)} has no host")
    return parts, port


def _send(url: str, credential: Credential | None, limits: DownloadLimits) -> http.client.HTTPResponse:
    parts, port = _checked_url(url)
    addresses = allowed_addresses(parts.hostname or "", port, limits.rule)
    connection_class = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    connection = connection_class(parts.hostname or "", port, addresses, limits)
    headers = {"Accept-Encoding": "identity", "Connection": "close", "User-Agent": "lassie-lora-fetcher"}
    if credential is not None and credential.applies_to(url):
        headers["Authorization"] = f"Bearer {credential.token}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("GET", target, headers=headers)
        return connection.getresponse()
    except (OSError, http.client.HTTPException) as error:
        connection.close()
        if limits.remaining() == 0:
            raise limits.overdue(url) from None
        raise InputError(FIELD, f"could not download {redact_url(url)}: {_network_reason(error, limits)}") from None


def _network_reason(error: BaseException, limits: DownloadLimits) -> str:
    if isinstance(error, TimeoutError):
        return "the server did not answer in time"
    return redact_secrets(f"{type(error).__name__}: {error}".rstrip(": "), limits.tokens)


@contextmanager
def open_url(
    url: str, *, credential: Credential | None = None, limits: DownloadLimits | None = None
) -> Iterator[tuple[http.client.HTTPResponse, str]]:
    """A successful response and the URL it finally came from, after checking every redirect hop.

    Once a redirect leaves the credential's origin the credential is dropped for good.
    """
    limits = limits or DownloadLimits()
    current = url
    for _ in range(limits.max_redirects + 1):
        if limits.remaining() == 0:
            raise limits.overdue(current)
        response = _send(current, credential, limits)
        location = response.getheader("Location") if response.status in REDIRECT_STATUSES else None
        if location is None:
            break
        response.close()
        following = urljoin(current, location)
        logger.debug("extra_lora: %s redirects to %s", redact_url(current), redact_url(following))
        if credential is not None and not credential.applies_to(following):
            credential = None
        current = following
    else:
        raise InputError(FIELD, f"{redact_url(url)} redirects more than {limits.max_redirects} times")
    try:
        _raise_for_status(response, current, credential)
        yield response, current
    finally:
        response.close()


def _raise_for_status(response: http.client.HTTPResponse, url: str, credential: Credential | None) -> None:
    if 200 <= response.status < 300:
        return
    shown = redact_url(url)
    if response.status in (401, 403) and credential is not None:
        if credential.token:
            problem = f"it refused the token in {credential.env_name} (HTTP {response.status})"
        else:
            problem = f"it needs a token (HTTP {response.status}): set {credential.env_name}"
        raise InputError(FIELD, f"could not download {shown}: {problem}")
    if response.status == 404:
        raise InputError(FIELD, f"could not download {shown}: not found (HTTP 404)")
    raise InputError(FIELD, f"could not download {shown}: the server answered HTTP {response.status}")


# --- bounded bodies ----------------------------------------------------------------------------


def download_file(
    url: str, destination: Path, *, credential: Credential | None = None, limits: DownloadLimits | None = None
) -> int:
    """Streams `url` into `destination` (a temporary name the caller owns); returns the byte count.

    The size cap is checked against Content-Length first and again while streaming, since servers
    can lie or send no length at all.
    """
    limits = limits or DownloadLimits()
    with open_url(url, credential=credential, limits=limits) as (response, final_url):
        declared = _declared_length(response)
        _check_size(declared or 0, limits.max_bytes, url)
        logger.info("downloading %s%s", redact_url(url), f" ({human_bytes(declared)})" if declared else "")
        with destination.open("wb") as sink:
            received = _stream(response, sink, declared, limits.max_bytes, final_url, limits)
    if declared is not None and received != declared:
        raise InputError(FIELD, f"the download of {redact_url(url)} was cut short ({received} of {declared} bytes)")
    logger.info("downloaded %s (%s)", redact_url(url), human_bytes(received))
    return received


def fetch_json(url: str, *, credential: Credential | None = None, limits: DownloadLimits | None = None) -> Any:
    """A small JSON API answer (CivitAI), size-capped like any download."""
    limits = limits or DownloadLimits()
    body = io.BytesIO()
    with open_url(url, credential=credential, limits=limits) as (response, _):
        _stream(response, body, _declared_length(response), MAX_JSON_BYTES, url, limits)
    try:
        return json.loads(body.getvalue())
    except ValueError:
        raise InputError(FIELD, f"{redact_url(url)} did not answer with JSON") from None


def _declared_length(response: http.client.HTTPResponse) -> int | None:
    value = (response.getheader("Content-Length") or "").strip()
    return int(value) if value.isdigit() else None


def _check_size(size: int, max_bytes: int, url: str) -> None:
    if size > max_bytes:
        raise InputError(
            FIELD,
            f"{redact_url(url)} is larger than the {human_bytes(max_bytes)} allowed for a LoRA "
            f"({MAX_LORA_BYTES_ENV}); a LoRA is usually well under 1 GiB",
        )


def _stream(response: http.client.HTTPResponse, sink: BinaryIO, declared: int | None, max_bytes: int,
            url: str, limits: DownloadLimits) -> int:
    received = 0
    with ProgressLog(total=declared, desc=redact_url(url), unit="B") as progress:
        while chunk := _read_chunk(response, url, limits, received):
            received += len(chunk)
            _check_size(received, max_bytes, url)
            sink.write(chunk)
            progress.update(len(chunk))
    return received


def _read_chunk(response: _TimedResponse, url: str, limits: DownloadLimits, received: int) -> bytes:
    """What one receive brings (`read1`: a full-size `read` would wait for a whole chunk, however
    slowly it trickles in), within the time left of the overall limit."""
    if response.isclosed():
        return b""
    if limits.remaining() == 0:
        raise limits.overdue(url, received)
    try:
        response.socket.settimeout(limits.timeout(limits.read_timeout))
        return response.read1(CHUNK_BYTES)
    except TimeoutError:
        if limits.remaining() == 0:
            raise limits.overdue(url, received) from None
        problem = f"failed: {_network_reason(TimeoutError(), limits)}"
    except http.client.IncompleteRead:
        problem = "was cut short (the connection closed early)"
    except (OSError, http.client.HTTPException) as error:
        problem = f"failed: {_network_reason(error, limits)}"
    raise InputError(FIELD, f"the download of {redact_url(url)} {problem}")


class ProgressLog(tqdm):
    """Progress of a large download as log lines, since Cog's logs show no bars: one line per tenth
    (per 256 MiB when the size is unknown), none for files under 64 MiB. A bar on a terminal.

    The one progress report of the project: lassie's own downloads drive it, and huggingface_hub
    takes it as its `tqdm_class` when setup fetches the weights.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Counts on its own, from the keyword arguments: huggingface_hub turns a bar off (and tqdm
        then skips setting it up) when its bars are disabled, which setup does for library bars."""
        self.to_log = not sys.stderr.isatty()
        if self.to_log:
            kwargs |= {"disable": False, "file": io.StringIO()}
        super().__init__(*args, **kwargs)
        self._label = kwargs.get("desc") or ""
        self._size = kwargs.get("total") if kwargs.get("unit") == "B" else None
        self._received = kwargs.get("initial") or 0
        self._quiet = kwargs.get("unit") != "B" or (self._size is not None and self._size < PROGRESS_FROM_BYTES)
        self._step = max(int(self._size) // 10, 1) if self._size else 4 * PROGRESS_FROM_BYTES
        self._next_report = self._step

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        self._received += n or 0
        if self.to_log and not self._quiet and self._received >= self._next_report:
            self._next_report = (int(self._received) // self._step + 1) * self._step
            share = f" ({100 * int(self._received) // int(self._size)}%)" if self._size else ""
            logger.info("%s: %s%s", self._label, human_bytes(self._received), share)
        return shown
