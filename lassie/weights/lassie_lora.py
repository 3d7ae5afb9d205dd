"""The Lassie LoRA and the trigger word it brings, resolved once at setup (`resolve`) for everything after (memory plan,
adapter, logs), and installed by one path (`install`), which scripts/download_weights.py uses too. Downloads and tars
follow the extra LoRAs' rules, the operator's address trusted (it may be a private mirror)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx2
from filelock import FileLock

from lassie.fetch import files
from lassie.fetch.http import AddressRule, Deadline, DownloadLimits, FetchError, download_file, redact_url
from lassie.fetch.lora_sources import short_digest
from lassie.fetch.storage import writable_place
from lassie.fetch.tars import TarLimits, TarRefused, checked_members
from lassie.settings import LORA_URL_ENV, TRIGGER_WORD_ENV, WEIGHTS_DOWNLOAD_TIMEOUT_ENV, Settings
from lassie.weights.downloads import STAGING_PREFIX
from lassie.weights.layout import RUN_AGAIN, CorruptFileError, ProvisionError, WeightsLayout, safetensors_problem
from lassie.weights.manifest import FileRecord, Manifest, ProvisionReport, has_size

log = logging.getLogger(__name__)

LORA_MEMBER = "lora.safetensors"
TRIGGER_WORD_MEMBER = "trigger_word.txt"
CONFIG_MEMBER = "config.yaml"
MAX_TEXT_MEMBER_BYTES = 1024**2
MAX_TRIGGER_WORD_CHARS = 200


@dataclass(frozen=True)
class LassieLora:
    """The file setup loads, its trigger word, and where it came from (said in logs)."""

    path: Path
    trigger_word: str
    origin: str


def public_origin(origin: str) -> str:
    """The origin without credentials: signed URLs carry them in the query, some in user:password@."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https"):
        return str(Path(origin).expanduser().resolve())
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def origin_problem(origin: str, variable: str) -> str | None:
    """What is wrong with a LoRA address before anything is fetched: a URL without host, a missing file."""
    if Path(origin).expanduser().is_file():
        return None
    try:
        url = httpx2.URL(origin)
    except httpx2.InvalidURL:
        return f"{variable} is not a well-formed URL"
    if url.scheme in ("http", "https"):
        return None if url.host else f"{variable} has no host: {public_origin(origin)}"
    if url.scheme:
        return f"{variable} must be an http(s) URL or a local path, not a {url.scheme}: URL"
    return f"{variable} is neither an http(s) URL nor an existing file: {public_origin(origin)}"


def lora_origin_problem(layout: WeightsLayout, origin: str | None) -> str | None:
    """Why the Lassie LoRA could not be had from `origin`, found before 60 GB of FLUX are fetched for nothing."""
    if origin:
        return origin_problem(origin, LORA_URL_ENV)
    return None if layout.lassie_lora.is_file() else (
        f"{layout.lassie_lora} is missing and {LORA_URL_ENV} is not set: set it to the Replicate training output "
        "(a .tar holding lora.safetensors), a .safetensors URL, or a local path to either")


def checked_trigger_word(text: str, where: str) -> str:
    """`text` stripped, or refused naming `where` it came from: it goes into every log line and prompt hint."""
    word = text.strip()
    unprintable = next((char for char in word if not char.isprintable()), None)
    if len(word) > MAX_TRIGGER_WORD_CHARS or unprintable is not None:
        found = (f"has {len(word)} characters" if len(word) > MAX_TRIGGER_WORD_CHARS
                 else f"holds the unprintable character {unprintable!r}")
        raise ProvisionError(f"the trigger word in {where} {found}; "
                             f"at most {MAX_TRIGGER_WORD_CHARS} printable characters are allowed")
    return word


def config_trigger_word(config: str) -> str | None:
    """`trigger_word: TOK` (quoted or not, maybe a list item, maybe a comment after it), as Replicate's FLUX trainer
    (ai-toolkit) writes it in its output's config.yaml; line by line: linear in the file's size, whatever it holds."""
    for line in config.splitlines():
        key, colon, value = line.lstrip(" \t-").partition(":")
        word = value.split("#", 1)[0].strip().strip("\"'").strip()
        if colon and key.rstrip() == "trigger_word" and word:
            return word
    return None


def trigger_word_in(path: Path) -> str:
    """The trigger word a file holds, checked; "" when there is no file."""
    if not path.is_file():
        return ""
    with path.open("rb") as source:
        return checked_trigger_word(source.read(MAX_TEXT_MEMBER_BYTES).decode("utf-8", "replace"), str(path))


def unpack(fetched: Path, staged: Path, described: str, max_bytes: int) -> str | None:
    """A tar's one .safetensors (extra LoRAs' rule) or a bare one into `staged`, checked; returns the tar's trigger
    word, its first trigger_word.txt or config.yaml's `trigger_word:` (read by the tar policy, never written)."""
    texts: dict[str, str] = {}
    if not files.is_archive(fetched):
        shutil.copyfile(fetched, staged)
    else:
        try:
            files.safetensors_from_tar(fetched, staged, max_bytes=max_bytes)
        except TarRefused as problem:
            raise ProvisionError(f"expected one {LORA_MEMBER} in the LoRA archive, but it {problem}") from None
        with fetched.open("rb") as source:
            for path, _, data in checked_members(source, TarLimits(files.MAX_TAR_MEMBERS, max_bytes)):
                if data is not None and path.name in (TRIGGER_WORD_MEMBER, CONFIG_MEMBER):
                    texts.setdefault(path.name, data.read(MAX_TEXT_MEMBER_BYTES).decode("utf-8", "replace"))
    member, word = TRIGGER_WORD_MEMBER, texts.get(TRIGGER_WORD_MEMBER, "").strip()
    if not word:
        member, word = CONFIG_MEMBER, config_trigger_word(texts.get(CONFIG_MEMBER, ""))
    word = checked_trigger_word(word, f"{member} of {described}") if word else None
    if problem := safetensors_problem(staged):
        raise CorruptFileError(f"the Lassie LoRA from {described} is not a valid safetensors file: {problem}")
    return word


def install(origin: str, folder: Path, variable: str, settings: Settings) -> None:
    """The LoRA at `origin` (a URL or a local path) and its tar's trigger word into `folder`, checked whole in a staging
    folder first so a bad file never replaces a good one; the LoRA goes in last, so its presence means the install
    finished. Any host, held to LASSIE_WEIGHTS_DOWNLOAD_TIMEOUT."""
    if problem := origin_problem(origin, variable):
        raise ProvisionError(problem)
    limits = DownloadLimits(max_bytes=settings.lora.max_download_bytes, rule=AddressRule(allow_all=True),
                            deadline=Deadline(settings.provision.weights_download_timeout,
                                              WEIGHTS_DOWNLOAD_TIMEOUT_ENV, "fetching the Lassie LoRA"))
    described = f"{variable} ({public_origin(origin)})"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=folder.parent) as staging_name:
        staging = Path(staging_name)
        fetched = Path(origin).expanduser()
        if urlsplit(origin).scheme in ("http", "https"):
            fetched = staging / "fetched"
            log.info("fetching the Lassie LoRA from %s", redact_url(origin))
            try:
                download_file(origin, fetched, limits=limits)
            except FetchError as error:
                raise ProvisionError(f"downloading the Lassie LoRA ({variable}) failed: {error}\n{RUN_AGAIN}") from None
        word = unpack(fetched, staging / LORA_MEMBER, described, limits.max_bytes)
        if word:
            (staging / TRIGGER_WORD_MEMBER).write_text(word + "\n")
            os.replace(staging / TRIGGER_WORD_MEMBER, folder / TRIGGER_WORD_MEMBER)
        os.replace(staging / LORA_MEMBER, folder / LORA_MEMBER)
    log.info("the Lassie LoRA from %s is installed in %s", described, folder)


def recorded_from(layout: WeightsLayout, manifest: Manifest, origin: str, verify: bool) -> bool:
    """weights/lassie/ holds the LoRA the manifest records from `origin`, at its size (and sha256, with `verify`)."""
    record = manifest.files.get(manifest.name_of(layout.lassie_lora))
    return (record is not None and record.source == public_origin(origin) and has_size(layout.lassie_lora, record.size)
            and (not verify or files.sha256_of(layout.lassie_lora) == record.sha256))


def provision_lassie_lora(layout: WeightsLayout, manifest: Manifest, report: ProvisionReport, origin: str | None,
                          verify: bool, settings: Settings = Settings()) -> None:
    """Installs the LoRA from `origin` (see lora_origin_problem) into weights/lassie/ and records it; no origin, or
    the one recorded from it still whole, keeps the one in place. LASSIE_TRIGGER_WORD goes beside it either way."""
    name = manifest.name_of(layout.lassie_lora)
    if origin and not recorded_from(layout, manifest, origin, verify):
        install(origin, layout.lassie_dir, LORA_URL_ENV, settings)
        size = layout.lassie_lora.stat().st_size
        report.add_fetched(name, size)
        manifest.files[name] = FileRecord(public_origin(origin), None, size, files.sha256_of(layout.lassie_lora))
        manifest.save()
    else:
        report.kept.append(name)
    word = checked_trigger_word(settings.provision.trigger_word or "", TRIGGER_WORD_ENV)
    if word and word != layout.trigger_word():  # weights/lassie/ holds the LoRA by now
        layout.trigger_word_file.write_text(word + "\n")


def resolve(layout: WeightsLayout, settings: Settings) -> LassieLora:
    """The Lassie LoRA setup loads: from COG_WEIGHTS, else LASSIE_LORA_URL, else weights/lassie/; its trigger word is
    the one its tar names (or weights/lassie/trigger_word.txt), else LASSIE_TRIGGER_WORD. One given by address is kept
    in a folder named after it (in a writable place), so a restart fetches nothing; fetched again once if damaged."""
    origin = settings.provision.lassie_origin
    configured = checked_trigger_word(settings.provision.trigger_word or "", TRIGGER_WORD_ENV)
    # scripts/download_weights.py may have installed LASSIE_LORA_URL into weights/lassie/ already.
    if origin is None or (origin == settings.provision.lora_url
                          and recorded_from(layout, Manifest.load(layout.manifest), origin, verify=False)
                          and safetensors_problem(layout.lassie_lora) is None):
        return LassieLora(layout.lassie_lora, trigger_word_in(layout.trigger_word_file) or configured,
                          str(layout.lassie_dir))
    variable = "COG_WEIGHTS" if settings.provision.cog_weights else LORA_URL_ENV
    place = writable_place("fetched Lassie LoRA", layout.root / "fetched-lora")
    keep = place / short_digest(origin, 24)
    with FileLock(keep.with_name(keep.name + ".lock")):  # servers sharing the place fetch it once
        if (problem := safetensors_problem(keep / LORA_MEMBER)) is None:
            log.info("the Lassie LoRA from %s: already fetched, in %s", variable, keep)
        else:
            if (keep / LORA_MEMBER).exists():
                log.warning("the Lassie LoRA from %s kept in %s is damaged (%s); fetching it again", variable, keep,
                            problem)
            install(origin, keep, variable, settings)
    return LassieLora(keep / LORA_MEMBER, trigger_word_in(keep / TRIGGER_WORD_MEMBER) or configured,
                      f"{variable} ({public_origin(origin)})")
