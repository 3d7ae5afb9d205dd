"""manifest.json: what each fetched file of the weights directory is and where it came from, so that setup and
scripts/download_weights.py ask no source again whose recorded files are all on disk at their size, and know the
Lassie LoRA installed from LASSIE_LORA_URL by its address. A `ProvisionReport` says what one run fetched and kept."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lassie.fetch.http import human_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileRecord:
    source: str
    revision: str | None
    size: int
    sha256: str


@dataclass
class Manifest:
    """What each file is and where it came from; saved after each source, so finished sources survive a kill."""

    path: Path
    files: dict[str, FileRecord] = field(default_factory=dict)
    complete_sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        if not path.is_file():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            files = {name: FileRecord(**record) for name, record in data["files"].items()}
            return cls(path, files, dict(data["sources"]))
        except (ValueError, KeyError, TypeError) as error:
            log.warning("ignoring unreadable manifest %s (%s): every file will be checked again", path, error)
            return cls(path)

    def save(self) -> None:
        data = {"format": 1, "sources": dict(sorted(self.complete_sources.items())),
                "files": {name: asdict(record) for name, record in sorted(self.files.items())}}
        partial = self.path.with_name(self.path.name + ".tmp")
        partial.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(partial, self.path)

    def name_of(self, path: Path) -> str:
        return path.relative_to(self.path.parent).as_posix()

    def record_source(self, source: str, revision: str, files: dict[str, FileRecord], complete: bool) -> None:
        """Replaces what is recorded of `source` by `files`; `complete` marks it done at `revision`."""
        self.files = {name: record for name, record in self.files.items() if record.source != source} | files
        self.complete_sources.pop(source, None)
        if complete:
            self.complete_sources[source] = revision
        self.save()


def has_size(path: Path, size: int | None) -> bool:
    return path.is_file() and path.stat().st_size == size


@dataclass
class ProvisionReport:
    fetched: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    bytes_fetched: int = 0

    def add_fetched(self, name: str, size: int) -> None:
        self.fetched.append(name)
        self.bytes_fetched += size

    def summary(self) -> str:
        return (f"fetched {len(self.fetched)} files ({human_bytes(self.bytes_fetched)}), "
                f"{len(self.kept)} already in place")
