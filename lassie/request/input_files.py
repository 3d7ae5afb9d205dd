"""Which files a request's `image` and `mask` may be: only those Cog wrote for this request.

coglet (0.23) turns an http(s) URL or data URI given for a `Path` input into a fresh file in the worker's temp
directory and hands predict() a `Path`; any other string ("/etc/ssl/private/key.png") arrives as the plain string
the client sent, and opening it would read any image on the server's disk. So only a `Path` directly in that
directory is used.
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
    if not isinstance(value, PurePath) or Path(value).resolve().parent != Path(tempfile.gettempdir()).resolve():
        raise InputError(field, f"must be {ALLOWED}")
    return Path(value).resolve()
