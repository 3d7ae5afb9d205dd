"""Downloaded LoRA files: only safetensors pass (pickle .bin/.ckpt/.pt checkpoints run code when loaded), said plainly
when the library refuses one (a pickle, an HTML login page, a cut download); a LoRA tar gives up exactly one. Errors
do not name the file, so setup (the Lassie LoRA) and requests (`extra_lora`) word their own."""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from lassie.fetch.tars import MAGIC_BYTES, TarLimits, TarRefused, checked_members, compression_of, copy_data, sanitised
from lassie.request.errors import EXTRA_LORA_FIELD as FIELD
from lassie.request.errors import InputError

HEAD_BYTES = 256
# What the loaders here handle; the library also reads sub-byte F4/F6, which no FLUX LoRA uses and loaders fail on.
LOADABLE_DTYPES = frozenset("BOOL U8 I8 F8_E4M3 F8_E5M2 F8_E8M0 U16 I16 F16 BF16 U32 I32 F32 U64 I64 F64 C64".split())
# The library's refusals (worded as in safetensors 0.8.0) in the user's terms; its own words follow.
LIBRARY_REASONS = (("header too large", "its header length is impossible, so it is not a .safetensors file"),
                   ("invalid header length", "the file is truncated: it ends inside its header"),
                   ("invalid UTF-8", "its header is not JSON"),
                   ("unknown variant", "a tensor has an unknown dtype"),
                   ("expected usize", "a tensor has an invalid shape or invalid data offsets"),
                   ("expected a string", "__metadata__ is not a map of strings"),
                   ("invalid shape, data type, or offset", "a tensor's data does not fit its shape and dtype"),
                   ("invalid offset for tensor",
                    "a tensor has invalid data offsets: tensor data overlaps or leaves gaps"))
MAX_TAR_MEMBERS = 10_000


class UnusableSafetensorsError(ValueError):
    """A file is not a usable safetensors file; the message says why, without naming the file."""


@dataclass(frozen=True)
class SafetensorsSummary:
    tensor_count: int
    metadata: dict[str, str]


def validate_safetensors(path: Path, origin: str) -> SafetensorsSummary:
    """`inspect_safetensors` for a user's LoRA: refusals become an InputError naming `origin`."""
    try:
        return inspect_safetensors(path)
    except UnusableSafetensorsError as problem:
        raise InputError(FIELD, f"{origin} is not a usable .safetensors file: {problem}") from None


def inspect_safetensors(path: Path) -> SafetensorsSummary:
    """The project's one safetensors check: a cut file, an HTML page or a renamed pickle fails here, not in a loader."""
    size = path.stat().st_size
    with path.open("rb") as source:
        start = source.read(HEAD_BYTES)
    if size < 8:
        raise UnusableSafetensorsError(f"it is empty or truncated ({size} bytes)")
    if start[8:9] != b"{":
        raise UnusableSafetensorsError(_what_it_is_instead(start))
    try:
        with safe_open(path, framework="numpy") as tensors:
            dtypes = {name: tensors.get_slice(name).get_dtype() for name in tensors.keys()}
            metadata = tensors.metadata() or {}
    except SafetensorError as error:
        raise UnusableSafetensorsError(_library_refusal(path, size, error)) from None
    if not dtypes:  # what the library accepts but nothing here can load
        raise UnusableSafetensorsError("it holds no tensors")
    for name, dtype in dtypes.items():
        if dtype not in LOADABLE_DTYPES:
            raise UnusableSafetensorsError(f"tensor {name!r} has dtype {dtype}, which the loaders here do not handle")
    return SafetensorsSummary(tensor_count=len(dtypes), metadata=metadata)


def _what_it_is_instead(start: bytes) -> str:
    """A safetensors file is an 8-byte header length followed by a JSON object; what else it is."""
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


def _library_refusal(path: Path, size: int, error: SafetensorError) -> str:
    """The library's words speak of serde and offsets; lead with what they mean for the file. Where the tensor data
    does not end where the file does, which way tells a cut-off download from trailing junk."""
    detail = str(error).removeprefix("Error while deserializing header: ")
    if "not fully covered" not in detail:
        reason = next((reason for fragment, reason in LIBRARY_REASONS if fragment in detail), None)
        return f"{reason} ({detail})" if reason else detail
    with path.open("rb") as source:  # the header has passed the library's checks
        header_length = int.from_bytes(source.read(8), "little")
        header = json.loads(source.read(header_length))
    header.pop("__metadata__", None)
    needed = max((info["data_offsets"][1] for info in header.values()), default=0)
    present = size - 8 - header_length
    if needed > present:
        return f"the file is truncated (tensor data needs {needed} bytes, {present} present)"
    return f"{present - needed} unexpected bytes follow the tensor data"


def is_archive(path: Path) -> bool:
    """Whether a download is a tar, not the file; a compressed one counts, so that the tar policy refuses it by name."""
    with path.open("rb") as source:
        return compression_of(source.read(MAGIC_BYTES)) is not None or tarfile.is_tarfile(path)


def extract_single_safetensors(archive: Path, destination: Path, *, max_bytes: int, origin: str) -> None:
    """`safetensors_from_tar` for a user's LoRA: refusals become an InputError naming `origin`."""
    try:
        safetensors_from_tar(archive, destination, max_bytes=max_bytes)
    except TarRefused as problem:
        raise InputError(FIELD, f"{origin} {problem}") from None


def safetensors_from_tar(archive: Path, destination: Path, *, max_bytes: int) -> None:
    """The one rule for LoRA tars: the whole tar passes the tar policy, and its one .safetensors member is copied
    into `destination` (removed again on a refusal). Member names are only compared, never used as paths."""
    names: list[str] = []
    candidates: list[str] = []
    try:
        with archive.open("rb") as source:
            for _, member, data in checked_members(source, TarLimits(MAX_TAR_MEMBERS, max_bytes)):
                names.append(sanitised(member.name))
                basename = member.name.rsplit("/", 1)[-1]
                if data is None or not basename.lower().endswith(".safetensors") or basename.startswith("._"):
                    continue
                candidates.append(names[-1])
                if len(candidates) > 1:
                    raise TarRefused(f"holds several .safetensors files ({_listing(candidates)}); expected one")
                with destination.open("wb") as sink:
                    copy_data(data, member, sink)
        if not candidates:
            raise TarRefused(f"holds no .safetensors file (it holds: {_listing(names)})")
    except TarRefused:
        destination.unlink(missing_ok=True)
        raise


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:10]) or "nothing"
    return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def sha256_of(path: Path) -> str:
    """The project's one file hash: the cache's integrity record and the weights manifest use it."""
    with path.open("rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()
