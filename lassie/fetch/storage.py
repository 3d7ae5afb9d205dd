"""Where setup may write: the place asked for if it can be written, else a fallback, said once.

A weights directory mounted read-only (one copy shared by several containers) must still serve,
so what setup writes beside the weights by default (the extra-LoRA cache, a LoRA fetched from
`COG_WEIGHTS`) moves to a writable place instead, with one log line: a folder of the user's own
under $TMPDIR, refused if another user owns it or may write to it. A place the operator named
explicitly is a promise: if it cannot be written, setup fails naming the variable.
"""

from __future__ import annotations

import getpass
import logging
import os
import stat
import tempfile
from pathlib import Path

from lassie.settings import SettingError

log = logging.getLogger(__name__)


def fallback_root() -> Path:
    """Per user, so two users on one machine never share (or fight over) a fallback."""
    return Path(tempfile.gettempdir()) / f"lassie-{getpass.getuser()}"


def trust_problem(folder: Path) -> str | None:
    """Why `folder` (if it exists) cannot be trusted: in a shared $TMPDIR anyone may create
    lassie-<user> first, or a link by that name, and then read or replace what setup keeps there."""
    try:
        info = folder.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(info.st_mode):
        return f"{folder} is not a directory (a link or a file another user may have planted)"
    if info.st_uid != os.getuid():
        return f"{folder} belongs to another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{folder} may be written by other users (mode {stat.filemode(info.st_mode)})"
    return None


def trusted_fallback_root() -> Path:
    """`fallback_root()`, created private (0700) if missing; refused, naming it, if it is not ours alone."""
    root = fallback_root()
    problem = trust_problem(root)
    if problem is None:
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            problem = f"{root} cannot be created ({error.strerror or error})"
        else:
            problem = trust_problem(root)  # created by someone else between the check and mkdir
    if problem is not None:
        raise OSError(f"refusing the fallback folder {root}: {problem}")
    return root


def write_problem(directory: Path) -> str | None:
    """Why `directory` cannot hold new files (created if missing), or None."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as error:
        return error.strerror or str(error)


def writable_place(what: str, default: Path, explicit: Path | None = None, variable: str = "") -> Path:
    """`explicit` (from `variable`) if set, failing setup when it cannot be written; else
    `default`, or, when that cannot be written, the same name under `fallback_root()`."""
    if explicit is not None:
        problem = write_problem(explicit)
        if problem is not None:
            raise SettingError(variable, f"a directory this server can write ({problem})", str(explicit))
        return explicit
    problem = write_problem(default)
    if problem is None:
        return default
    try:
        fallback = trusted_fallback_root() / default.name
    except OSError as refused:
        raise OSError(f"cannot write the {what} at {default} ({problem}); {refused}") from None
    fallback_problem = write_problem(fallback)
    if fallback_problem is not None:
        raise OSError(f"cannot write the {what} at {default} ({problem}) nor at {fallback} ({fallback_problem})")
    _say_fallback_once(default.parent, f"{what}: {default} cannot be written ({problem}); using {fallback}")
    return fallback


_FALLBACKS_SAID: set[Path] = set()  # the directories whose fallback the log has already explained


def _say_fallback_once(directory: Path, message: str) -> None:
    """One line per directory (a read-only weights mount): the other places setup keeps there
    (compile cache, a fetched LoRA) fall back the same way, which that line says."""
    if directory in _FALLBACKS_SAID:
        log.debug("%s", message)
        return
    _FALLBACKS_SAID.add(directory)
    log.info("%s; whatever else setup keeps in %s falls back to %s too", message, directory, fallback_root())
