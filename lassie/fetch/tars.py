"""The one policy for every tar this server unpacks: weights folders, COG_WEIGHTS, extra-LoRA tars.

A tar comes from a host, so it is read as a stream of claims to be checked, never as instructions:

- regular files and directories only: links, hard links, devices, FIFOs and sparse files are
  refused, naming the member, so no member can point anywhere;
- relative names without `..` (and without control characters), each file written by this
  module itself into a fresh folder, opened with O_NOFOLLOW and exclusive create: what is written
  does not depend on the Python's `tarfile` extraction filters (the image's 3.11.7 lets the
  PATH_MAX symlink chain of CVE-2025-4517 through `filter="data"`);
- uncompressed only: gzip, bzip2, xz and zstd are recognised by their magic bytes and refused,
  since decompressing multiplies the bytes a size cap and a deadline count;
- the end-of-archive blocks are required, so a body cut at a member boundary does not look whole;
- member count and total size bounded.

`tarfile` only parses headers here (streaming mode: the tar is read once, as it arrives). Messages
read after the tar's name ("holds a symbolic link ..."), so each caller names its tar its own way,
and member names in them are sanitised (printable, bounded length).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import tarfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from lassie.fetch.http import human_bytes

BLOCK = tarfile.BLOCKSIZE
END_OF_ARCHIVE = bytes(2 * BLOCK)
READ_BYTES = 1024**2
# tarfile reads ahead at most one READ_BYTES buffer beyond the header it looks at.
KEPT_BYTES = 2 * READ_BYTES + 2 * BLOCK
SHOWN_NAME_CHARS = 120
MAGIC_BYTES = 6
COMPRESSIONS = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
REFUSED_KINDS = ((tarfile.SYMTYPE, "a symbolic link"), (tarfile.LNKTYPE, "a hard link"),
                 (tarfile.CHRTYPE, "a character device"), (tarfile.BLKTYPE, "a block device"),
                 (tarfile.FIFOTYPE, "a FIFO"))
ONLY_FILES = "only regular files and folders are unpacked"
UNUSABLE_NAME_ERRORS = frozenset({errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ})


class TarRefused(ValueError):
    """A tar (or what was unpacked from one) breaks the policy; the message reads after its name."""


@dataclass(frozen=True)
class TarLimits:
    max_members: int
    max_bytes: int


def sanitised(name: str) -> str:
    """A member name as messages show it: control characters as `?`, at most 120 characters."""
    printable = "".join(character if character.isprintable() else "?" for character in name)
    return printable[:SHOWN_NAME_CHARS] + "…" if len(printable) > SHOWN_NAME_CHARS else printable


def shown_name(name: str) -> str:
    return f'"{sanitised(name)}"'


def compression_of(head: bytes) -> str | None:
    """The compression whose magic bytes `head` starts with, if any."""
    return next((kind for magic, kind in COMPRESSIONS if head.startswith(magic)), None)


def refuse_compressed(head: bytes) -> None:
    kind = compression_of(head)
    if kind is not None:
        raise TarRefused(f"is {kind}-compressed; only uncompressed tars are accepted "
                         "(decompressed bytes would escape the size and time bounds)")


def file_is_compressed(path: Path) -> bool:
    with path.open("rb") as source:
        return compression_of(source.read(MAGIC_BYTES)) is not None


# --- one member ---------------------------------------------------------------------------------


def member_path(member: tarfile.TarInfo) -> PurePosixPath:
    """The member's place below the folder it is unpacked into, after the policy's checks."""
    name = member.name
    kind = next((what for kind, what in REFUSED_KINDS if member.type == kind), None)
    if kind is None and not (member.isreg() or member.isdir()):
        kind = f"an entry of type {member.type!r}"
    if kind is None and member.sparse is not None:
        kind = "a sparse file"
    if kind is not None:
        raise TarRefused(f"holds {kind}, {shown_name(name)}; {ONLY_FILES}")
    if not all(character.isprintable() for character in name):
        raise TarRefused(f"holds a member whose name has control characters, {shown_name(name)}")
    if name.startswith("/"):
        raise TarRefused(f"holds a member with an absolute name, {shown_name(name)}")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise TarRefused(f"holds a member whose name leaves its folder, {shown_name(name)}")
    if not parts and member.isreg():
        raise TarRefused(f"holds a file without a name, {shown_name(name)}")
    return PurePosixPath(*parts)


class _Tally:
    """Member count and total size against the limits, as members arrive."""

    def __init__(self, limits: TarLimits) -> None:
        self.limits, self.members, self.bytes = limits, 0, 0

    def add(self, size: int) -> None:
        self.members += 1
        self.bytes += size
        if self.members > self.limits.max_members:
            raise TarRefused(f"holds more than {self.limits.max_members} members")
        if self.bytes > self.limits.max_bytes:
            raise TarRefused(f"holds more than {human_bytes(self.limits.max_bytes)} of files")


# --- a stream of members, then the end-of-archive blocks ----------------------------------------


class _Watched(io.RawIOBase):
    """The tar's bytes as tarfile reads them, remembering the last few reads, so that what follows
    the last member (the end-of-archive blocks, or nothing) can be looked at afterwards."""

    def __init__(self, source: BinaryIO, head: bytes) -> None:
        super().__init__()
        self.source, self.pending, self.position = source, head, 0
        self.recent: deque[tuple[int, bytes]] = deque()
        self.kept = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        data = self.pending[:len(buffer)] if self.pending else self.source.read(len(buffer))
        self.pending = self.pending[len(data):]
        buffer[:len(data)] = data
        if data:
            self.recent.append((self.position, data))
            self.position += len(data)
            self.kept += len(data)
            while self.kept - len(self.recent[0][1]) >= KEPT_BYTES:
                self.kept -= len(self.recent.popleft()[1])
        return len(data)

    def bytes_from(self, offset: int, count: int) -> bytes:
        """`count` bytes at `offset` (not before the remembered reads), reading on where needed."""
        known = b"".join(data for _, data in self.recent)
        start = self.recent[0][0] if self.recent else self.position
        if offset < start:
            raise TarRefused("could not be checked for its end-of-archive blocks")
        found = known[offset - start:offset - start + count]
        return found + read_up_to(self, count - len(found))


def read_up_to(source: BinaryIO, count: int) -> bytes:
    """`count` bytes, fewer only where the stream ends (a read may return less than asked)."""
    found = b""
    while len(found) < count:
        more = source.read(count - len(found))
        if not more:
            break
        found += more
    return found


def read_head(source: BinaryIO) -> bytes:
    return read_up_to(source, MAGIC_BYTES)


def checked_members(source: BinaryIO, limits: TarLimits
                    ) -> Iterator[tuple[PurePosixPath, tarfile.TarInfo, BinaryIO | None]]:
    """Each member that passes the policy: its path, header and (for a file) its data, to be read
    before the next one is asked for. After the last, the end-of-archive blocks are checked."""
    head = read_head(source)
    refuse_compressed(head)
    watched = _Watched(source, head)
    tally = _Tally(limits)
    try:
        with tarfile.open(fileobj=watched, mode="r|", bufsize=READ_BYTES) as tar:
            for member in tar:
                tally.add(member.size)
                path = member_path(member)
                yield path, member, tar.extractfile(member) if member.isreg() else None
            end = tar.offset
    except (tarfile.TarError, EOFError) as error:
        raise TarRefused(f"is not a readable tar archive ({error})") from None
    if watched.bytes_from(end, len(END_OF_ARCHIVE)) != END_OF_ARCHIVE:
        raise TarRefused("ends without its end-of-archive blocks: it was cut short or is damaged")


# --- writing a folder ---------------------------------------------------------------------------


def unpack(source: BinaryIO, destination: Path, limits: TarLimits) -> int:
    """Unpacks the tar read from `source` into the new folder `destination`; returns the member
    count. Every file is created here, exclusively and without following links."""
    destination.mkdir(parents=True)
    count = 0
    for path, member, data in checked_members(source, limits):
        count += 1
        try:
            if data is None:
                make_folders(destination, path.parts, member.name)
            else:
                make_folders(destination, path.parts[:-1], member.name)
                write_file(destination / path, data, member)
        except OSError as error:
            if error.errno not in UNUSABLE_NAME_ERRORS:
                raise  # the disk's problem (full, read-only), not the tar's
            raise TarRefused(f"holds a member whose name cannot be a file name here, {shown_name(member.name)} "
                             f"({error.strerror})") from None
    return count


def make_folders(root: Path, parts: tuple[str, ...], name: str) -> None:
    folder = root
    for part in parts:
        folder = folder / part
        try:
            folder.mkdir()
        except FileExistsError:
            if not stat.S_ISDIR(folder.lstat().st_mode):
                raise TarRefused(f"holds {shown_name(name)} below a file of the same name") from None


def write_file(target: Path, data: BinaryIO, member: tarfile.TarInfo) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(target, flags, 0o644)
    except FileExistsError:
        raise TarRefused(f"holds {shown_name(member.name)} twice") from None
    with os.fdopen(descriptor, "wb") as sink:
        copy_data(data, member, sink)


def copy_data(data: BinaryIO, member: tarfile.TarInfo, sink: BinaryIO) -> None:
    """A file member's bytes into `sink`; a tar that ends before them is refused."""
    remaining = member.size
    while remaining > 0:
        try:
            chunk = data.read(min(READ_BYTES, remaining))
        except (tarfile.TarError, EOFError):
            chunk = b""
        if not chunk:
            raise TarRefused(f"ends inside {shown_name(member.name)}: it was cut short")
        sink.write(chunk)
        remaining -= len(chunk)


# --- a tree someone else unpacked (pget) --------------------------------------------------------


def check_tree(root: Path, limits: TarLimits) -> None:
    """The policy applied after the fact to a folder another program unpacked: only regular files
    (not hard-linked) and folders, counted and sized against the limits."""
    tally = _Tally(limits)
    for folder, names, files in os.walk(root):
        for name in [*names, *files]:
            path = Path(folder, name)
            info = path.lstat()
            shown = shown_name(path.relative_to(root).as_posix())
            if stat.S_ISLNK(info.st_mode):
                raise TarRefused(f"holds a symbolic link, {shown}; {ONLY_FILES}")
            if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                raise TarRefused(f"holds a hard link, {shown}; {ONLY_FILES}")
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                raise TarRefused(f"holds a device, FIFO or socket, {shown}; {ONLY_FILES}")
            tally.add(info.st_size if stat.S_ISREG(info.st_mode) else 0)
