"""Where setup may write: the place asked for, else a private folder of the user's own under $TMPDIR, said once, so
that a read-only weights mount (one copy shared by several containers) still serves. A place the operator named
explicitly is a promise: if it cannot be written, setup fails naming the variable."""

from __future__ import annotations

import getpass
import logging
import os
import stat
import tempfile
from pathlib import Path

from lassie.settings import SettingError

log = logging.getLogger(__name__)
# Directories (a read-only weights mount) whose fallback one log line explained for all that setup keeps there.
_FALLBACKS_SAID: set[Path] = set()


def fallback_root() -> Path:
    """Per user, so two users on one machine never share (or fight over) a fallback."""
    return Path(tempfile.gettempdir()) / f"lassie-{getpass.getuser()}"


def trusted_fallback_root() -> Path:
    """`fallback_root()`, created private (0700) if missing; refused, naming it, unless it is ours alone: in a shared
    $TMPDIR anyone may make lassie-<user> first, or a link by that name, and read or replace what setup keeps there."""
    root = fallback_root()
    try:
        root.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass  # ours from an earlier run, or planted: judged below without following a link
    except OSError as error:
        reason = error.strerror or error
        raise OSError(f"refusing the fallback folder {root}: {root} cannot be created ({reason})") from None
    info = root.lstat()
    if not stat.S_ISDIR(info.st_mode):
        problem = "is not a directory (a link or a file another user may have planted)"
    elif info.st_uid != os.getuid():
        problem = f"belongs to another user (uid {info.st_uid})"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"may be written by other users (mode {stat.filemode(info.st_mode)})"
    else:
        return root
    raise OSError(f"refusing the fallback folder {root}: {root} {problem}")


def write_problem(directory: Path) -> str | None:
    """Why `directory` cannot hold new files (created if missing), or None."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as error:
        return error.strerror or str(error)


def writable_place(what: str, default: Path, explicit: Path | None = None, variable: str = "") -> Path:
    """`explicit` (from `variable`), failing setup if unwritable; else `default`, else its name in `fallback_root()`."""
    if explicit is not None:
        if (problem := write_problem(explicit)) is not None:
            raise SettingError(variable, f"a directory this server can write ({problem})", str(explicit))
        return explicit
    if (problem := write_problem(default)) is None:
        return default
    try:
        fallback = trusted_fallback_root() / default.name
    except OSError as refused:
        raise OSError(f"cannot write the {what} at {default} ({problem}); {refused}") from None
    if (fallback_problem := write_problem(fallback)) is not None:
        raise OSError(f"cannot write the {what} at {default} ({problem}) nor at {fallback} ({fallback_problem})")
    said = f"{what}: {default} cannot be written ({problem}); using {fallback}"
    if default.parent in _FALLBACKS_SAID:
        log.debug("%s", said)
    else:
        _FALLBACKS_SAID.add(default.parent)
        log.info("%s; whatever else setup keeps in %s falls back to %s too", said, default.parent, fallback_root())
    return fallback

