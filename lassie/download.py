"""Fetching untrusted files safely, and proving a file is a plain safetensors before anyone loads it.

`extra_lora` makes the server fetch any URL a user types, so every hop (the first one and each
redirect) must land on a public address, and the connection goes to exactly the address that was
checked (a second DNS answer cannot swap in 127.0.0.1). Tokens belong to one service origin and
never follow a redirect elsewhere; URLs are shown without their query strings, because signed URLs
carry secrets there. Only safetensors is ever accepted: pickle-based checkpoints run code on load.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import json
import logging
import math
import os
import re
import socket
import ssl
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import SplitResult, urljoin, urlsplit

from lassie.errors import InputError

FIELD = "extra_lora"
logger = logging.getLogger(__name__)

ALLOW_PRIVATE_ENV = "LASSIE_ALLOW_PRIVATE_URLS"
MAX_BYTES_ENV = "LASSIE_MAX_LORA_BYTES"
TOKEN_ENVS = ("HF_TOKEN", "CIVITAI_API_TOKEN", "REPLICATE_API_TOKEN")

GIB = 1024**3
MIB = 1024**2
DEFAULT_MAX_BYTES = 2 * GIB
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
    `1` allows every address (tests, private mirrors); a comma-separated list of addresses or
    networks (`10.0.0.5,fd00::/8`) allows just those."""

    allow_all: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_env(cls) -> AddressRule:
        value = os.environ.get(ALLOW_PRIVATE_ENV, "").strip()
        if value.lower() in ("", "0", "false", "no"):
            return cls()
        if value.lower() in ("1", "true", "yes"):
            return cls(allow_all=True)
        try:
            networks = tuple(ipaddress.ip_network(item.strip(), strict=False) for item in value.split(","))
        except ValueError:
            raise ValueError(
                f"{ALLOW_PRIVATE_ENV} must be 1 or a comma-separated list of addresses/networks, got {value!r}"
            ) from None
        return cls(allowed_networks=networks)

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


def redact_secrets(text: str) -> str:
    """Last line of defence for texts from other libraries: blanks out every configured token."""
    for env in TOKEN_ENVS:
        token = os.environ.get(env, "")
        if len(token) >= 4:
            text = text.replace(token, f"<{env}>")
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
    def from_env(cls, origin_url: str, env_name: str) -> Credential:
        return cls(origin=origin_url, env_name=env_name, token=os.environ.get(env_name, "").strip())

    def applies_to(self, url: str) -> bool:
        return bool(self.token) and _origin(urlsplit(url)) == _origin(urlsplit(self.origin))


def _origin(parts: SplitResult) -> tuple[str, str, int]:
    default_port = 443 if parts.scheme == "https" else 80
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default_port


# --- limits -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DownloadLimits:
    """Everything that bounds one fetch; tests and callers pass tighter ones."""

    max_bytes: int = DEFAULT_MAX_BYTES
    connect_timeout: float = 15.0
    read_timeout: float = 60.0
    max_redirects: int = 8
    rule: AddressRule = AddressRule()

    @classmethod
    def from_env(cls) -> DownloadLimits:
        return cls(max_bytes=max_lora_bytes(), rule=AddressRule.from_env())


def max_lora_bytes() -> int:
    value = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_BYTES
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"{MAX_BYTES_ENV} must be a positive number of bytes, got {value!r}")
    return int(value)


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
        sock.settimeout(limits.connect_timeout)
        try:
            sock.connect((str(address), port))
        except OSError as error:
            sock.close()
            last_error = error
            continue
        sock.settimeout(limits.read_timeout)
        return sock
    raise last_error


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Talks HTTP to `host` (Host header) over a socket to an address that was already checked."""

    def __init__(self, host: str, port: int, addresses: list[IPAddress], limits: DownloadLimits) -> None:
        super().__init__(host, port, timeout=limits.connect_timeout)
        self.checked_addresses = addresses
        self.limits = limits

    def connect(self) -> None:
        self.sock = _connect(self.checked_addresses, self.port, self.limits)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """TLS is verified against the host name while the TCP connection goes to the checked address."""

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
        raise InputError(FIELD, f"could not download {redact_url(url)}: {_network_reason(error)}") from None


def _network_reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "the server did not answer in time"
    return redact_secrets(f"{type(error).__name__}: {error}".rstrip(": "))


@contextmanager
def open_url(
    url: str, *, credential: Credential | None = None, limits: DownloadLimits | None = None
) -> Iterator[tuple[http.client.HTTPResponse, str]]:
    """A successful response and the URL it finally came from, after checking every redirect hop.

    Once a redirect leaves the credential's origin the credential is dropped for good.
    """
    limits = limits or DownloadLimits.from_env()
    current = url
    for _ in range(limits.max_redirects + 1):
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
    limits = limits or DownloadLimits.from_env()
    with open_url(url, credential=credential, limits=limits) as (response, final_url):
        declared = _declared_length(response)
        _check_size(declared or 0, limits.max_bytes, url)
        logger.info("extra_lora: downloading %s%s", redact_url(url), f" ({human_bytes(declared)})" if declared else "")
        with destination.open("wb") as sink:
            received = _stream(response, sink, declared, limits.max_bytes, final_url)
    if declared is not None and received != declared:
        raise InputError(FIELD, f"the download of {redact_url(url)} was cut short ({received} of {declared} bytes)")
    logger.info("extra_lora: downloaded %s (%s)", redact_url(url), human_bytes(received))
    return received


def fetch_json(url: str, *, credential: Credential | None = None, limits: DownloadLimits | None = None) -> Any:
    """A small JSON API answer (CivitAI), size-capped like any download."""
    body = io.BytesIO()
    with open_url(url, credential=credential, limits=limits) as (response, _):
        _stream(response, body, _declared_length(response), MAX_JSON_BYTES, url)
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
            f"({MAX_BYTES_ENV}); a LoRA is usually well under 1 GiB",
        )


def _stream(response: http.client.HTTPResponse, sink: BinaryIO, declared: int | None, max_bytes: int,
            url: str) -> int:
    progress = _ProgressLog(url, declared)
    received = 0
    while chunk := _read_chunk(response, url):
        received += len(chunk)
        _check_size(received, max_bytes, url)
        sink.write(chunk)
        progress.update(received)
    return received


def _read_chunk(response: http.client.HTTPResponse, url: str) -> bytes:
    try:
        return response.read(CHUNK_BYTES)
    except http.client.IncompleteRead:
        problem = "was cut short (the connection closed early)"
    except (OSError, http.client.HTTPException) as error:
        problem = f"failed: {_network_reason(error)}"
    raise InputError(FIELD, f"the download of {redact_url(url)} {problem}")


class _ProgressLog:
    """Large downloads take minutes: log every tenth (or every 256 MiB when the size is unknown)."""

    def __init__(self, url: str, total: int | None) -> None:
        self.url = redact_url(url)
        self.total = total
        self.step = max(total // 10, 1) if total else 4 * PROGRESS_FROM_BYTES
        self.next_report = self.step

    def update(self, received: int) -> None:
        if received < self.next_report or (self.total is not None and self.total < PROGRESS_FROM_BYTES):
            return
        self.next_report = (received // self.step + 1) * self.step
        share = f" ({100 * received // self.total}%)" if self.total else ""
        logger.info("extra_lora: %s of %s%s", human_bytes(received), self.url, share)


# --- safetensors, checked without loading ------------------------------------------------------

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}
MAX_HEADER_BYTES = 100 * MIB


@dataclass(frozen=True)
class SafetensorsSummary:
    tensor_count: int
    data_bytes: int
    metadata: dict[str, str]


def validate_safetensors(path: Path, origin: str) -> SafetensorsSummary:
    """Checks the header and every tensor's extent against the file, so that a truncated file,
    an HTML error page or a renamed pickle fails here with a clear message instead of in a loader."""
    size = path.stat().st_size
    with path.open("rb") as source:
        start = source.read(256)
        header_length = int.from_bytes(start[:8], "little")
        problem = _format_problem(start, size, header_length)
        if problem is not None:
            raise InputError(FIELD, f"{origin} is not a usable .safetensors file: {problem}")
        source.seek(8)
        header = _parse_header(source.read(header_length), origin)
    return _check_tensors(header, size - 8 - header_length, origin)


def _format_problem(start: bytes, size: int, header_length: int) -> str | None:
    """A safetensors file is an 8-byte header length followed by a JSON object."""
    if size < 8:
        return f"it is empty or truncated ({size} bytes)"
    if start[8:9] != b"{":
        return _what_it_is_instead(start)
    if header_length < 2 or header_length > MAX_HEADER_BYTES:
        return "its header length is impossible, so it is not a .safetensors file"
    if 8 + header_length > size:
        return f"the file is truncated ({size} bytes, but its header alone needs {8 + header_length})"
    return None


def _what_it_is_instead(start: bytes) -> str:
    stripped = start.lstrip()
    if start.startswith(b"PK\x03\x04"):
        return ("it is a zip archive, i.e. a PyTorch .pt/.bin/.ckpt checkpoint; those are pickle-based and can "
                "run code when loaded, so only .safetensors files are accepted")
    if start[:1] == b"\x80" and start[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it is a Python pickle (a .bin/.ckpt/.pt checkpoint), which can run code when loaded"
    if stripped[:1] == b"<":
        return "it is an HTML/XML page (an error or login page?), not a model file"
    if stripped[:1] in (b"{", b"["):
        return "it is a JSON document (an API error?), not a model file"
    if start[:2] == b"\x1f\x8b":
        return "it is a gzip archive, not a .safetensors file"
    return "it does not start with a safetensors header (damaged, or another format)"


def _parse_header(raw: bytes, origin: str) -> dict[str, Any]:
    """The header starts with '{' (checked before), so whatever parses is a JSON object."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InputError(FIELD, f"{origin} is not a usable .safetensors file: its header is not JSON") from None


def _check_tensors(header: dict[str, Any], data_bytes: int, origin: str) -> SafetensorsSummary:
    metadata = header.pop("__metadata__", None) or {}
    problems = [] if _is_string_map(metadata) else ["__metadata__ is not a map of strings"]
    extents = []
    for name, info in header.items():
        extent, problem = _tensor_extent(name, info)
        if problem:
            problems.append(problem)
        else:
            extents.append(extent)
    if not header:
        problems.append("it holds no tensors")
    problems += _layout_problems(sorted(extents), data_bytes)
    if problems:
        listed = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InputError(FIELD, f"{origin} is not a usable .safetensors file: {listed}")
    return SafetensorsSummary(tensor_count=len(header), data_bytes=data_bytes, metadata=metadata)


def _is_string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _tensor_extent(name: str, info: Any) -> tuple[tuple[int, int], str | None]:
    if not isinstance(info, dict):
        return (0, 0), f"tensor {name!r} has no description"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        return (0, 0), f"tensor {name!r} has unknown dtype {dtype!r}"
    if not _int_list(shape) or any(dim < 0 for dim in shape):
        return (0, 0), f"tensor {name!r} has an invalid shape"
    if not _int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        return (0, 0), f"tensor {name!r} has invalid data offsets"
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
        return (0, 0), f"tensor {name!r} does not fit its shape and dtype"
    return (offsets[0], offsets[1]), None


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, int) and not isinstance(item, bool) for item in value)


def _layout_problems(extents: list[tuple[int, int]], data_bytes: int) -> list[str]:
    """Tensors must tile the data area exactly: a gap, an overlap or a short file means damage."""
    position = 0
    for begin, end in extents:
        if begin != position:
            return ["tensor data overlaps or leaves gaps"]
        position = end
    if position > data_bytes:
        return [f"the file is truncated (tensor data needs {position} bytes, {data_bytes} present)"]
    if position < data_bytes:
        return [f"{data_bytes - position} unexpected bytes follow the tensor data"]
    return []


# --- Replicate `_weights` archives ------------------------------------------------------------

MAX_TAR_MEMBERS = 10_000


def extract_single_safetensors(archive: Path, destination: Path, *, max_bytes: int, origin: str) -> None:
    """Copies the one .safetensors member of a tar into `destination`.

    Member names are only compared, never used as paths, so `../` or absolute names cannot write
    anywhere; links and devices are ignored.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            member = _single_safetensors_member(tar, origin)
            if member.size > max_bytes:
                raise InputError(FIELD, f"the .safetensors in {origin} is larger than {human_bytes(max_bytes)} "
                                        f"({MAX_BYTES_ENV})")
            _copy_member(tar, member, destination)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise InputError(FIELD, f"{origin} is not a readable tar archive ({type(error).__name__})") from None


def _single_safetensors_member(tar: tarfile.TarFile, origin: str) -> tarfile.TarInfo:
    names, candidates = [], []
    for count, member in enumerate(tar):
        if count >= MAX_TAR_MEMBERS:
            raise InputError(FIELD, f"{origin} holds more than {MAX_TAR_MEMBERS} files")
        names.append(member.name)
        basename = member.name.rsplit("/", 1)[-1]
        if member.isfile() and basename.lower().endswith(".safetensors") and not basename.startswith("._"):
            candidates.append(member)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise InputError(FIELD, f"{origin} holds no .safetensors file (it holds: {_listing(names)})")
    raise InputError(
        FIELD, f"{origin} holds several .safetensors files ({_listing([m.name for m in candidates])}); expected one"
    )


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:10]) or "nothing"
    return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, destination: Path) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise tarfile.TarError("member has no data")
    with source, destination.open("wb") as sink:
        remaining = member.size
        while remaining > 0:
            chunk = source.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                raise EOFError("archive ends inside the .safetensors member")
            sink.write(chunk)
            remaining -= len(chunk)
