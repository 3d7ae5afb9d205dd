"""Fetching an extra LoRA from where its `LoraSource` says it lives, into a staging folder: a plain
URL, a Replicate model's weights tar, a CivitAI version (a model page's id is mapped to its version
through the API first) or a Hugging Face repo.

The user gave the address, so every fetch goes through the address rule and the operator's bounds
(`LoraSettings`), and every failure becomes an InputError on the `extra_lora` field. What arrives is
not checked here: the cache validates it before it keeps it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.hf_api import RepoFile

from lassie.fetch.files import unpack_if_tar
from lassie.fetch.http import Credential, DownloadLimits, FetchError, download_file, fetch_json, human_bytes
from lassie.fetch.hub_errors import HUB_ERRORS, hub_problem
from lassie.fetch.lora_sources import (
    CIVITAI_HOSTS,
    CivitaiModelSource,
    CivitaiVersionSource,
    HuggingFaceSource,
    LoraSource,
    ReplicateSource,
    UrlSource,
)
from lassie.request.errors import EXTRA_LORA_FIELD as FIELD
from lassie.request.errors import InputError
from lassie.settings import MAX_LORA_BYTES_ENV, LoraSettings

CIVITAI_LORA_TYPES = frozenset({"LORA", "LoCon", "DoRA"})


def fetch_source(source: LoraSource, staging: Path, settings: LoraSettings) -> Path:
    """Downloads `source` into `staging` and returns the .safetensors there (not yet validated).
    The client's failures become the field's: the user gave the address."""
    limits = DownloadLimits.from_settings(settings)
    try:
        match source:
            case UrlSource():
                return _download_to(source.url, staging, None, limits)
            case ReplicateSource():
                return _fetch_replicate(source, staging, settings, limits)
            case CivitaiVersionSource():
                credential = Credential.from_settings(settings.civitai_url, "CIVITAI_API_TOKEN", settings)
                return _download_to(source.download_url(settings), staging, credential, limits)
            case CivitaiModelSource():
                return _fetch_civitai_model(source, staging, settings, limits)
            case HuggingFaceSource():
                return _fetch_huggingface(source, staging, settings, limits)
    except FetchError as error:
        raise InputError(FIELD, str(error)) from None
    raise TypeError(f"unknown LoRA source {source!r}")


def _download_to(url: str, staging: Path, credential: Credential | None, limits: DownloadLimits) -> Path:
    target = staging / "lora.safetensors"
    download_file(url, target, credential=credential, limits=limits)
    return target


def _fetch_replicate(source: ReplicateSource, staging: Path, settings: LoraSettings,
                     limits: DownloadLimits) -> Path:
    """Replicate serves trained weights as a tar around one .safetensors (plus captions)."""
    credential = Credential.from_settings(settings.replicate_url, "REPLICATE_API_TOKEN", settings)
    archive = staging / "weights.tar"
    url = source.weights_url(settings)
    download_file(url, archive, credential=credential, limits=limits)
    unpacked = unpack_if_tar(archive, staging / "lora.safetensors", max_bytes=limits.max_bytes,
                             origin=source.describe())
    limits.deadline.check(url)  # the LoRA's deadline covers unpacking its tar too
    return unpacked


def _fetch_civitai_model(source: CivitaiModelSource, staging: Path, settings: LoraSettings,
                         limits: DownloadLimits) -> Path:
    """A page's model id is not a download id: the API maps it to a version and that version's
    SafeTensor file (mapping the model id straight onto the download endpoint 404s)."""
    credential = Credential.from_settings(settings.civitai_url, "CIVITAI_API_TOKEN", settings)
    model = fetch_json(f"{settings.civitai_url}/api/v1/models/{source.model_id}", credential=credential,
                       limits=limits)
    version = _civitai_version(model, source)
    chosen = _civitai_safetensors_file(version, source)
    size_kb = chosen.get("sizeKB")
    if isinstance(size_kb, int | float):
        _refuse_oversized(source.describe(), size_kb * 1024, limits)
    return _download_to(_on_configured_civitai(chosen["downloadUrl"], settings), staging, credential, limits)


def _refuse_oversized(described: str, size: float, limits: DownloadLimits) -> None:
    """Checks sizes the services announce, before any byte of the file is fetched."""
    if size > limits.max_bytes:
        raise InputError(FIELD, f"{described} is {human_bytes(size)}, more than the "
                                f"{human_bytes(limits.max_bytes)} allowed for a LoRA ({MAX_LORA_BYTES_ENV})")


def _civitai_version(model: Any, source: CivitaiModelSource) -> dict[str, Any]:
    if not isinstance(model, dict) or not isinstance(model.get("modelVersions"), list):
        raise InputError(FIELD, f"CivitAI answered with an unexpected document for {source.describe()}")
    kind = model.get("type")
    if kind is not None and kind not in CIVITAI_LORA_TYPES:
        raise InputError(FIELD, f"{source.describe()} is a {kind}, not a LoRA")
    versions = [version for version in model["modelVersions"] if isinstance(version, dict)]
    if source.version_id is None:
        if not versions:
            raise InputError(FIELD, f"{source.describe()} has no published versions")
        return versions[0]
    for version in versions:
        if version.get("id") == source.version_id:
            return version
    known = ", ".join(str(version.get("id")) for version in versions) or "none"
    raise InputError(FIELD, f"{source.describe()} not found; that model's versions are: {known}")


def _civitai_safetensors_file(version: dict[str, Any], source: CivitaiModelSource) -> dict[str, Any]:
    files = [item for item in version.get("files") or [] if isinstance(item, dict)]
    candidates = [item for item in files if _is_civitai_safetensors(item) and isinstance(item.get("downloadUrl"), str)]
    if not candidates:
        listed = ", ".join(f"{item.get('name')} ({(item.get('metadata') or {}).get('format')})" for item in files)
        raise InputError(FIELD, f"{source.describe()} (version {version.get('id')}) has no SafeTensor file "
                                f"(files: {listed or 'none'}); only .safetensors LoRAs are loaded")
    return sorted(candidates, key=lambda item: (not item.get("primary"), item.get("type") != "Model"))[0]


def _is_civitai_safetensors(item: dict[str, Any]) -> bool:
    metadata = item.get("metadata") if isinstance(item.get("metadata"), dict) else {}
    return metadata.get("format") == "SafeTensor" or str(item.get("name", "")).lower().endswith(".safetensors")


def _on_configured_civitai(url: str, settings: LoraSettings) -> str:
    """The API names civitai.com in its download links; a configured mirror serves them instead."""
    parts = urlsplit(url)
    if (parts.hostname or "").lower() not in CIVITAI_HOSTS:
        return url
    query = f"?{parts.query}" if parts.query else ""
    return f"{settings.civitai_url}{parts.path}{query}"


def _fetch_huggingface(source: HuggingFaceSource, staging: Path, settings: LoraSettings,
                       limits: DownloadLimits) -> Path:
    token: str | bool = settings.tokens.get("HF_TOKEN") or False
    try:
        api = HfApi(endpoint=settings.hf_endpoint, token=token)
        tree = api.list_repo_tree(source.repo_id, revision=source.revision, recursive=True)
        chosen = _choose_hf_file(source, [item for item in tree if isinstance(item, RepoFile)])
        described = f"{source.describe()}: {chosen.path}"
        _refuse_oversized(described, chosen.size, limits)
        local = Path(hf_hub_download(source.repo_id, chosen.path, revision=source.revision,
                                     endpoint=settings.hf_endpoint, token=token, cache_dir=staging / "hub"))
    except HUB_ERRORS as error:  # in words that say what to do, and never with a token
        raise InputError(FIELD, hub_problem(error, source.describe(), revision=source.revision,
                                            has_token=bool(token), tokens=limits.tokens)) from None
    _refuse_oversized(described, local.stat().st_size, limits)
    return local.resolve()


def _choose_hf_file(source: HuggingFaceSource, files: list[RepoFile]) -> RepoFile:
    candidates = sorted((item for item in files if item.path.lower().endswith(".safetensors")),
                        key=lambda item: item.path)
    names = ", ".join(item.path for item in candidates) or "none"
    if source.filename is not None:
        for item in files:
            if item.path == source.filename:
                return item
        raise InputError(FIELD, f"{source.describe()}: no such file; its .safetensors files are: {names}")
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise InputError(FIELD, f"{source.describe()} holds no .safetensors file")
    raise InputError(FIELD, f"{source.describe()} holds several .safetensors files ({names}); name one, e.g. "
                            f"huggingface.co/{source.repo_id}/{candidates[0].path}")

