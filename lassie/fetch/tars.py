"""The one policy for every tar this server unpacks, as the README's Security section states it: regular files and
folders only, relative names without `..`, uncompressed, the end-of-archive blocks present, bounded. `tarfile` only
parses headers (streaming, as the tar arrives); every file is written here, so nothing depends on the Python's
extraction filters (3.11.7 lets CVE-2025-4517 through). Messages read after the tar's name, member names sanitised."""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from lassie.fetch.http import human_bytes

END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)
READ_BYTES = 1024**2
SHOWN_NAME_CHARS = 120
MAGIC_BYTES = 6
COMPRESSIONS = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
REFUSED_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link",
                 tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}
ONLY_FILES = "only regular files and folders are unpacked"
CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
UNUSABLE_NAME_ERRORS = frozenset({errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ})


class TarRefused(ValueError):
    """A tar (or what was unpacked from one) breaks the policy; the message reads after its name."""


@dataclass(frozen=True)
class TarLimits:
    max_members: int
    max_bytes: int

    def check(self, members: int, total_bytes: int) -> None:
        if members > self.max_members:
            raise TarRefused(f"holds more than {self.max_members} members")
        if total_bytes > self.max_bytes:
            raise TarRefused(f"holds more than {human_bytes(self.max_bytes)} of files")


def sanitised(name: str) -> str:
    """A member name as messages show it: control characters as `?`, at most 120 characters."""
    printable = "".join(character if character.isprintable() else "?" for character in name)
    return printable[:SHOWN_NAME_CHARS] + "…" if len(printable) > SHOWN_NAME_CHARS else printable


def shown_name(name: str) -> str:
    return f'"{sanitised(name)}"'


def compression_of(head: bytes) -> str | None:
    return next((kind for magic, kind in COMPRESSIONS if head.startswith(magic)), None)


def member_path(member: tarfile.TarInfo) -> PurePosixPath:
    """The member's place below the folder it is unpacked into, after the policy's checks."""
    name = member.name
    if member.sparse is not None or not (member.isreg() or member.isdir()):
        kind = "a sparse file" if member.sparse is not None else f"an entry of type {member.type!r}"
        raise TarRefused(f"holds {REFUSED_KINDS.get(member.type, kind)}, {shown_name(name)}; {ONLY_FILES}")
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


class _Watched:
    """The tar's bytes as tarfile reads them (`read` is all it calls), keeping the last two reads: each is whole (a
    BufferedReader reads all it is asked for unless the stream ends), and tarfile reads at most one buffer past the
    header it looks at, so what follows the last member is there or still unread."""

    def __init__(self, source: io.BufferedReader, head: bytes) -> None:
        self.source, self.pending, self.position = source, head, 0
        self.previous = self.latest = b""

    def read(self, size: int) -> bytes:
        data = self.pending[:size] if self.pending else self.source.read(size)
        self.pending = self.pending[len(data):]
        if data:
            self.previous, self.latest = self.latest, data
            self.position += len(data)
        return data

    def bytes_from(self, offset: int, count: int) -> bytes:
        """`count` bytes at `offset` (not before the last two reads), reading on where needed."""
        known = self.previous + self.latest
        start = self.position - len(known)
        if offset < start:
            raise TarRefused("could not be checked for its end-of-archive blocks")
        found = known[offset - start:offset - start + count]
        return found + self.read(count - len(found))


def checked_members(source: io.BufferedReader, limits: TarLimits
                    ) -> Iterator[tuple[PurePosixPath, tarfile.TarInfo, BinaryIO | None]]:
    """Each member passing the policy: path, header, (a file's) data to read before the next; then the end blocks."""
    head = source.read(MAGIC_BYTES)
    if compression := compression_of(head):
        raise TarRefused(f"is {compression}-compressed; only uncompressed tars are accepted "
                         "(decompressed bytes would escape the size and time bounds)")
    watched = _Watched(source, head)
    total_bytes = 0
    try:
        with tarfile.open(fileobj=watched, mode="r|", bufsize=READ_BYTES) as tar:
            for count, member in enumerate(tar, 1):
                total_bytes += member.size
                limits.check(count, total_bytes)
                yield member_path(member), member, tar.extractfile(member) if member.isreg() else None
            end = tar.offset
    except (tarfile.TarError, EOFError) as error:
        raise TarRefused(f"is not a readable tar archive ({error})") from None
    if watched.bytes_from(end, len(END_OF_ARCHIVE)) != END_OF_ARCHIVE:
        raise TarRefused("ends without its end-of-archive blocks: it was cut short or is damaged")


def unpack(source: io.BufferedReader, destination: Path, limits: TarLimits) -> None:
    """Into the new folder `destination`: every file created here, exclusively, never through a link (none gets in)."""
    destination.mkdir(parents=True)
    for path, member, data in checked_members(source, limits):
        target = destination / path
        try:
            (target if data is None else target.parent).mkdir(parents=True, exist_ok=True)
            if data is not None:
                with os.fdopen(os.open(target, CREATE_NEW, 0o644), "wb") as sink:
                    copy_data(data, member, sink)
        except (FileExistsError, NotADirectoryError):
            where = "twice" if data is not None and target.parent.is_dir() else "below a file of the same name"
            raise TarRefused(f"holds {shown_name(member.name)} {where}") from None
        except OSError as error:
            if error.errno not in UNUSABLE_NAME_ERRORS:
                raise  # the disk's problem (full, read-only), not the tar's
            raise TarRefused(f"holds a member whose name cannot be a file name here, {shown_name(member.name)} "
                             f"({error.strerror})") from None


def copy_data(data: BinaryIO, member: tarfile.TarInfo, sink: BinaryIO) -> None:
    """A file member's bytes into `sink`; tarfile raises where the tar ends before them."""
    try:
        shutil.copyfileobj(data, sink, READ_BYTES)
    except (tarfile.TarError, EOFError):
        raise TarRefused(f"ends inside {shown_name(member.name)}: it was cut short") from None


def check_tree(root: Path, limits: TarLimits) -> None:
    """The policy for a folder another program (pget) unpacked: regular files (not hard-linked) and folders, bounded."""
    total_bytes = 0
    for count, path in enumerate(root.rglob("*"), 1):
        info = path.lstat()
        regular = stat.S_ISREG(info.st_mode)
        kind = ("a symbolic link" if stat.S_ISLNK(info.st_mode) else "a hard link" if regular and info.st_nlink > 1
                else None if regular or stat.S_ISDIR(info.st_mode) else "a device, FIFO or socket")
        if kind is not None:
            raise TarRefused(f"holds {kind}, {shown_name(path.relative_to(root).as_posix())}; {ONLY_FILES}")
        total_bytes += info.st_size if regular else 0
        limits.check(count, total_bytes)
