"""Which files a request's `image` and `mask` may be: only those Cog wrote for this request.

coglet (0.23) turns an http(s) URL or a data URI given for a `Path` input into a fresh temporary
file in the worker's temp directory and hands predict() that file as a `Path`. Any other string,
such as "/etc/ssl/private/key.png" or "/data/other-users/photo.png", reaches predict() as the plain
string the client sent: opening it would let a request read any image on the server's disk. So a
path is used only when it is a `Path` object directly inside the temp directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePath

from lassie.request.errors import InputError

ALLOWED = "an http(s) URL or a data URI; paths on the server's disk are refused"


def request_file(value: str | os.PathLike[str] | None, field: str) -> Path | None:
    """The file Cog fetched or decoded for this request, or an InputError naming `field`."""
    if value is None:
        return None
    if not isinstance(value, PurePath):
        raise InputError(field, f"must be {ALLOWED}")
    path = Path(value).resolve()
    if path.parent != Path(tempfile.gettempdir()).resolve():
        raise InputError(field, f"must be {ALLOWED}")
    return path
