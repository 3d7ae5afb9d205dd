"""`extra_lora` strings -> where the LoRA lives, parsed once, offline (`identify`); each source's `fetch` downloads
it into a staging folder for the cache to check. A service is recognised by the *form* of the string (people paste
every variant); its address and tokens are the operator's `LoraSettings` (mirrors, tests). The user gave the address:
every fetch obeys the address rule and the operator's bounds."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from huggingface_hub import HfApi, RepoFile, hf_hub_download

from lassie.fetch import http
from lassie.fetch.files import extract_single_safetensors, is_archive
from lassie.fetch.http import Credential, DownloadLimits, download_file, fetch_json, human_bytes, redact_url
from lassie.request.errors import EXTRA_LORA_FIELD as FIELD
from lassie.request.errors import InputError
from lassie.settings import MAX_LORA_BYTES_ENV, LoraSettings

ACCEPTED_FORMS = (
    "a Replicate model: owner/model, owner/model/<64-hex version id>, "
    "https://replicate.com/owner/model or https://replicate.com/owner/model/versions/<id>",
    "a Hugging Face repo: huggingface.co/owner/repo (holding exactly one .safetensors), "
    "huggingface.co/owner/repo/file.safetensors, or the .../blob/<revision>/... and "
    ".../resolve/<revision>/... links (hf.co works too, https:// is optional)",
    "a CivitAI model: civitai.com/models/<id>[/<name>][?modelVersionId=<version id>] or "
    "civitai.com/api/download/models/<version id>",
    "any http(s) URL ending in .safetensors (a query string is fine)",
)

REPLICATE_HOSTS = frozenset({"replicate.com", "www.replicate.com"})
HUGGINGFACE_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})
CIVITAI_HOSTS = frozenset({"civitai.com", "www.civitai.com"})
SCHEMELESS_HOSTS = REPLICATE_HOSTS | HUGGINGFACE_HOSTS | CIVITAI_HOSTS
CIVITAI_LORA_TYPES = frozenset({"LORA", "LoCon", "DoRA"})

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
KEY_DIGITS = 40

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
REPLICATE_OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,95}")
REPLICATE_VERSION = re.compile(r"[0-9a-fA-F]{64}")
REVISION = re.compile(r"[A-Za-z0-9._/-]{1,200}")
DIGITS = re.compile(r"[0-9]{1,18}")


def unsupported(reason: str) -> InputError:
    return InputError(FIELD, f"{reason}. Accepted forms: " + "; ".join(ACCEPTED_FORMS) + ".")


def short_digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class ReplicateSource:
    owner: str
    model: str
    version: str | None = None

    @property
    def cache_key(self) -> str:
        return f"replicate:{self.owner}/{self.model}" + (f"@{self.version}" if self.version else "")

    def describe(self) -> str:
        return f"Replicate model {self.owner}/{self.model}" + (f" version {self.version}" if self.version else "")

    def weights_url(self, settings: LoraSettings) -> str:
        model = f"{settings.replicate_url}/{self.owner}/{self.model}"
        return f"{model}/versions/{self.version}/_weights" if self.version else f"{model}/_weights"

    def fetch(self, staging: Path, settings: LoraSettings, limits: DownloadLimits) -> Path:
        """Replicate serves trained weights as a tar around one .safetensors (plus captions); a bare file passes on."""
        credential = Credential.from_settings(settings.replicate_url, "REPLICATE_API_TOKEN", settings)
        url, fetched, lora = self.weights_url(settings), staging / "weights.tar", staging / "lora.safetensors"
        download_file(url, fetched, credential=credential, limits=limits)
        if is_archive(fetched):
            extract_single_safetensors(fetched, lora, max_bytes=limits.max_bytes, origin=self.describe())
            fetched.unlink()
        limits.deadline.check(url)  # the LoRA's deadline covers unpacking its tar too
        return lora if lora.exists() else fetched


@dataclass(frozen=True)
class HuggingFaceSource:
    repo_id: str
    revision: str = "main"
    filename: str | None = None

    @property
    def cache_key(self) -> str:
        return f"hf:{self.repo_id}@{self.revision}" + (f"/{self.filename}" if self.filename else "")

    def describe(self) -> str:
        named = f" file {self.filename}" if self.filename else ""
        return f"Hugging Face repo {self.repo_id} (revision {self.revision}){named}"

    def fetch(self, staging: Path, settings: LoraSettings, limits: DownloadLimits) -> Path:
        token: str | bool = settings.tokens.get("HF_TOKEN") or False
        try:
            tree = HfApi(endpoint=settings.hf_endpoint, token=token).list_repo_tree(
                self.repo_id, revision=self.revision, recursive=True)
            chosen = self._choose([item for item in tree if isinstance(item, RepoFile)])
            described = f"{self.describe()}: {chosen.path}"
            _refuse_oversized(described, chosen.size, limits)
            local = Path(hf_hub_download(self.repo_id, chosen.path, revision=self.revision,
                                         endpoint=settings.hf_endpoint, token=token, cache_dir=staging / "hub"))
        except http.HUB_ERRORS as error:  # in words that say what to do, and never with a token
            raise InputError(FIELD, http.hub_problem(error, self.describe(), revision=self.revision,
                                                     tokens=limits.tokens)) from None
        _refuse_oversized(described, local.stat().st_size, limits)
        return local.resolve()

    def _choose(self, files: list[RepoFile]) -> RepoFile:
        candidates = sorted((item for item in files if item.path.lower().endswith(".safetensors")),
                            key=lambda item: item.path)
        names = ", ".join(item.path for item in candidates) or "none"
        if self.filename is not None:
            for item in files:
                if item.path == self.filename:
                    return item
            raise InputError(FIELD, f"{self.describe()}: no such file; its .safetensors files are: {names}")
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise InputError(FIELD, f"{self.describe()} holds no .safetensors file")
        raise InputError(FIELD, f"{self.describe()} holds several .safetensors files ({names}); name one, e.g. "
                                f"huggingface.co/{self.repo_id}/{candidates[0].path}")


@dataclass(frozen=True)
class CivitaiModelSource:
    model_id: int
    version_id: int | None = None

    @property
    def cache_key(self) -> str:
        return f"civitai:model/{self.model_id}" + (f"@{self.version_id}" if self.version_id is not None else "")

    def describe(self) -> str:
        return f"CivitAI model {self.model_id}" + (f" version {self.version_id}" if self.version_id is not None else "")

    def fetch(self, staging: Path, settings: LoraSettings, limits: DownloadLimits) -> Path:
        """A page's model id is not a download id: the API maps it to a version and that version's SafeTensor file
        (mapping the model id straight onto the download endpoint 404s)."""
        credential = Credential.from_settings(settings.civitai_url, "CIVITAI_API_TOKEN", settings)
        model = fetch_json(f"{settings.civitai_url}/api/v1/models/{self.model_id}", credential=credential,
                           limits=limits)
        chosen = self._safetensors_file(self._version(model))
        if isinstance(chosen.get("sizeKB"), int | float):
            _refuse_oversized(self.describe(), chosen["sizeKB"] * 1024, limits)
        url, parts = chosen["downloadUrl"], urlsplit(chosen["downloadUrl"])
        if (parts.hostname or "").lower() in CIVITAI_HOSTS:  # a configured mirror serves the API's civitai.com links
            url = f"{settings.civitai_url}{parts.path}" + (f"?{parts.query}" if parts.query else "")
        return _download_to(url, staging, credential, limits)

    def _version(self, model: Any) -> dict[str, Any]:
        if not isinstance(model, dict) or not isinstance(model.get("modelVersions"), list):
            raise InputError(FIELD, f"CivitAI answered with an unexpected document for {self.describe()}")
        if model.get("type") is not None and model["type"] not in CIVITAI_LORA_TYPES:
            raise InputError(FIELD, f"{self.describe()} is a {model['type']}, not a LoRA")
        versions = [version for version in model["modelVersions"] if isinstance(version, dict)]
        if wanted := [version for version in versions if self.version_id in (None, version.get("id"))]:
            return wanted[0]
        if self.version_id is None:
            raise InputError(FIELD, f"{self.describe()} has no published versions")
        known = ", ".join(str(version.get("id")) for version in versions) or "none"
        raise InputError(FIELD, f"{self.describe()} not found; that model's versions are: {known}")

    def _safetensors_file(self, version: dict[str, Any]) -> dict[str, Any]:
        files = [item for item in version.get("files") or [] if isinstance(item, dict)]
        candidates = [item for item in files if _is_safetensors(item) and isinstance(item.get("downloadUrl"), str)]
        if not candidates:
            listed = ", ".join(f"{item.get('name')} ({_format_of(item)})" for item in files)
            raise InputError(FIELD, f"{self.describe()} (version {version.get('id')}) has no SafeTensor file "
                                    f"(files: {listed or 'none'}); only .safetensors LoRAs are loaded")
        return sorted(candidates, key=lambda item: (not item.get("primary"), item.get("type") != "Model"))[0]


@dataclass(frozen=True)
class CivitaiVersionSource:
    version_id: int

    @property
    def cache_key(self) -> str:
        return f"civitai:version/{self.version_id}"

    def describe(self) -> str:
        return f"CivitAI model version {self.version_id}"

    def download_url(self, settings: LoraSettings) -> str:
        return f"{settings.civitai_url}/api/download/models/{self.version_id}"

    def fetch(self, staging: Path, settings: LoraSettings, limits: DownloadLimits) -> Path:
        credential = Credential.from_settings(settings.civitai_url, "CIVITAI_API_TOKEN", settings)
        return _download_to(self.download_url(settings), staging, credential, limits)


@dataclass(frozen=True)
class UrlSource:
    url: str

    @property
    def cache_key(self) -> str:
        """Hashes the whole URL (signed query included) so the key never carries a secret."""
        parts = urlsplit(self.url)
        return f"url:{parts.netloc}{parts.path}#{short_digest(self.url, 24)}"

    def describe(self) -> str:
        return redact_url(self.url)

    def fetch(self, staging: Path, settings: LoraSettings, limits: DownloadLimits) -> Path:
        return _download_to(self.url, staging, None, limits)


LoraSource = ReplicateSource | HuggingFaceSource | CivitaiModelSource | CivitaiVersionSource | UrlSource


@dataclass(frozen=True)
class ExtraLora:
    """An extra LoRA's one identity: its source, and its `key`, which names its cache files and its PEFT adapter: the
    same for the same LoRA however typed, and hex digits only, so it carries no secret and is a valid module name."""

    source: LoraSource
    key: str


def identify(text: str) -> ExtraLora:
    """What a user typed -> its `ExtraLora`, or an InputError that lists the accepted forms."""
    source = parse_extra_lora(text)
    return ExtraLora(source, short_digest(source.cache_key, KEY_DIGITS))


def parse_extra_lora(text: str) -> LoraSource:
    value = text.strip()
    if not value:
        raise unsupported("it is empty")
    if "://" in value:
        return _parse_url(value)
    host = value.split("/", 1)[0].lower()
    if host in SCHEMELESS_HOSTS:
        return _parse_url(f"https://{value}")
    if "." in host:
        raise unsupported(f"{value!r} looks like a URL without its https://")
    parts = value.split("/")
    if len(parts) in (2, 3):
        return _replicate_from_parts(*parts)
    raise unsupported(f"{value!r} is neither a Replicate model name nor a URL")


def _replicate_from_parts(owner: str, model: str, version: str | None = None) -> ReplicateSource:
    if not REPLICATE_OWNER.fullmatch(owner):
        raise unsupported(f"{owner!r} is not a valid Replicate owner")
    _require_name(model, "Replicate model name")
    if version is not None and not REPLICATE_VERSION.fullmatch(version):
        raise unsupported(f"{version!r} is not a Replicate version id (64 hexadecimal characters)")
    return ReplicateSource(owner, model, version.lower() if version else None)


def _require_name(name: str, what: str) -> None:
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise unsupported(f"{name!r} is not a valid {what}")


def _parse_url(value: str) -> LoraSource:
    try:  # urlsplit only checks the port when asked; an invalid port makes the whole URL invalid
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise unsupported("it is not a valid URL") from None
    if port == 0:
        raise unsupported("port 0 is not a valid port")
    if parts.scheme not in ("http", "https"):
        raise unsupported(f"only http(s) URLs are fetched, not {parts.scheme}://")
    if not parts.hostname:
        raise unsupported("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise unsupported("credentials inside the URL are not accepted (tokens come from the environment)")
    segments = [unquote(segment) for segment in parts.path.split("/") if segment]
    host = parts.hostname.lower()
    if host in REPLICATE_HOSTS:
        return _parse_replicate_path(segments)
    if host in HUGGINGFACE_HOSTS:
        return _parse_huggingface_path(segments)
    if host in CIVITAI_HOSTS:
        return _parse_civitai(segments, parts.query)
    _require_safetensors_name(unquote(parts.path.rsplit("/", 1)[-1]))
    return UrlSource(value)


def _parse_replicate_path(segments: list[str]) -> ReplicateSource:
    segments = segments[:-1] if segments[-1:] == ["_weights"] else segments
    if len(segments) == 2 or (len(segments) == 4 and segments[2] == "versions"):
        return _replicate_from_parts(segments[0], segments[1], *segments[3:])
    raise unsupported("a replicate.com URL must look like https://replicate.com/owner/model[/versions/<id>]")


def _parse_huggingface_path(segments: list[str]) -> HuggingFaceSource:
    if segments and segments[0] in ("datasets", "spaces"):
        raise unsupported(f"Hugging Face {segments[0]} are not LoRA repos; use a model repo")
    if len(segments) < 2:
        raise unsupported("a Hugging Face URL must name a repo: huggingface.co/owner/repo")
    _require_name(segments[0], "Hugging Face owner")
    _require_name(segments[1], "Hugging Face repo name")
    repo_id, revision, path = f"{segments[0]}/{segments[1]}", "main", segments[2:]
    if path and path[0] in ("blob", "resolve", "tree"):
        kind, revision, path = path[0], "/".join(path[1:2]), path[2:]
        if not REVISION.fullmatch(revision) or ".." in revision:
            raise unsupported(f"a Hugging Face .../{kind}/ URL must continue with a revision such as main")
        if kind == "tree" and path:
            raise unsupported("a Hugging Face tree URL must stop at the revision; name a .safetensors file instead")
        if kind != "tree" and not path:
            raise unsupported(f"a Hugging Face .../{kind}/<revision>/ URL must end with a .safetensors file")
    if any(segment in (".", "..") or "/" in segment or "\\" in segment for segment in path):
        raise unsupported("the file path inside the Hugging Face repo is not valid")
    if path:
        _require_safetensors_name(path[-1])
    return HuggingFaceSource(repo_id, revision, "/".join(path) or None)


def _parse_civitai(segments: list[str], query: str) -> CivitaiModelSource | CivitaiVersionSource:
    if len(segments) == 4 and segments[:3] == ["api", "download", "models"] and DIGITS.fullmatch(segments[3]):
        return CivitaiVersionSource(int(segments[3]))
    if not (len(segments) in (2, 3) and segments[0] == "models" and DIGITS.fullmatch(segments[1])):
        raise unsupported("a civitai.com URL must look like civitai.com/models/<id>[/<name>][?modelVersionId=<id>] "
                          "or civitai.com/api/download/models/<version id>")
    versions = parse_qs(query).get("modelVersionId")
    if versions and (len(versions) != 1 or not DIGITS.fullmatch(versions[0])):
        raise unsupported("modelVersionId in a CivitAI URL must be one number")
    return CivitaiModelSource(int(segments[1]), int(versions[0]) if versions else None)


def _require_safetensors_name(name: str) -> None:
    lowered = name.lower()
    if lowered.endswith(PICKLE_SUFFIXES):
        raise unsupported(f"{name!r} is a pickle-based checkpoint, which can run code when loaded; only .safetensors "
                          "files are loaded")
    if not lowered.endswith(".safetensors"):
        raise unsupported(f"{name!r} is not a .safetensors file")


def _download_to(url: str, staging: Path, credential: Credential | None, limits: DownloadLimits) -> Path:
    target = staging / "lora.safetensors"
    download_file(url, target, credential=credential, limits=limits)
    return target


def _refuse_oversized(described: str, size: float, limits: DownloadLimits) -> None:
    if size > limits.max_bytes:
        raise InputError(FIELD, f"{described} is {human_bytes(size)}, more than the {human_bytes(limits.max_bytes)} "
                                f"allowed for a LoRA ({MAX_LORA_BYTES_ENV})")


def _format_of(item: dict[str, Any]) -> object:
    """The file's format as CivitAI lists it; None where its metadata is not an object."""
    return metadata.get("format") if isinstance(metadata := item.get("metadata"), dict) else None


def _is_safetensors(item: dict[str, Any]) -> bool:
    return _format_of(item) == "SafeTensor" or str(item.get("name", "")).lower().endswith(".safetensors")
