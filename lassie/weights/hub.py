"""The weights from the Hugging Face hub. What can fail cheaply is checked before the first byte; each source is one
`snapshot_download` pinned to the commit listed first, then checked against the listing and recorded in manifest.json,
so a source whose recorded files are all on disk needs no network (and a shipped manifest pins each commit)."""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.utils import filter_repo_objects

from lassie.fetch.files import sha256_of
from lassie.fetch.http import HUB_ERRORS, ProgressLog, hub_problem, human_bytes
from lassie.settings import Settings
from lassie.weights.lassie_lora import lora_origin_problem, provision_lassie_lora
from lassie.weights.layout import RUN_AGAIN, CorruptFileError, ProvisionError, WeightsLayout, fail_on, writing_problem
from lassie.weights.manifest import FileRecord, Manifest, ProvisionReport, has_size

log = logging.getLogger(__name__)

# Pickled or foreign-framework weights: the layout loads safetensors only.
IGNORED_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data")


@dataclass(frozen=True)
class HubSource:
    """Some files of one hub repo, placed in one directory of the weights layout."""

    repo_id: str
    directory: Path
    patterns: tuple[str, ...]
    gated: bool = False


def hub_sources(layout: WeightsLayout) -> tuple[HubSource, ...]:
    """dev in diffusers layout (not its single-file checkpoints), and only what schnell does not share."""
    dev_parts = ("model_index.json", "scheduler/*", "text_encoder/*", "text_encoder_2/*", "tokenizer/*",
                 "tokenizer_2/*", "transformer/*", "vae/*")
    safety_files = ("config.json", "model.safetensors", "preprocessor_config.json")
    return (HubSource("black-forest-labs/FLUX.1-dev", layout.dev_dir, dev_parts, gated=True),
            HubSource("black-forest-labs/FLUX.1-schnell", layout.schnell_dir,
                      ("model_index.json", "scheduler/*", "transformer/*")),
            HubSource("CompVis/stable-diffusion-safety-checker", layout.compvis_dir, safety_files),
            HubSource("Falconsai/nsfw_image_detection", layout.falcon_dir, safety_files))


def gated_message(api: HfApi, repo_id: str) -> str:
    problem = "no Hugging Face token is set" if api.token is None else "the token in HF_TOKEN has no access to it"
    return (f"{repo_id} is gated and {problem}. Accept its license at {api.endpoint}/{repo_id} (logged in to "
            f"Hugging Face), create a read token at {api.endpoint}/settings/tokens and run again with "
            "HF_TOKEN=<that token> in the environment.")


@contextmanager
def explained_hub_errors(source: HubSource, api: HfApi) -> Iterator[None]:
    """A gated repo gets setup's own guidance (its license page, the token to create); any other failure the
    project's one wording of hub errors, and where it may pass, the note that a rerun resumes."""
    try:
        yield
    except HUB_ERRORS as error:
        not_found = isinstance(error, RepositoryNotFoundError)
        if not_found and source.gated:
            raise ProvisionError(gated_message(api, source.repo_id)) from None
        problem = hub_problem(error, f"{source.repo_id} on {api.endpoint}", revision=None,
                              tokens={"HF_TOKEN": api.token} if api.token else {})
        raise ProvisionError(problem if not_found else f"{problem}\n{RUN_AGAIN}") from None


def git_blob_sha1(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """The id git gives the content (the hub lists it for files outside LFS): sha1 of `blob <size>\\0` and the bytes."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def mismatch_with_hub(path: Path, name: str, remote: RepoSibling) -> tuple[str | None, str]:
    """(what is wrong with the file compared with the hub's listing, its sha256)."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"{name} has {size} bytes but the hub lists {remote.size}", ""
    sha256 = sha256_of(path)
    if remote.lfs is not None and sha256 != remote.lfs.sha256:
        return f"{name} has sha256 {sha256} but the hub lists {remote.lfs.sha256}", sha256
    if remote.lfs is None and remote.blob_id and git_blob_sha1(path) != remote.blob_id:
        return f"{name} does not match the hub's git blob {remote.blob_id}", sha256
    return None, sha256


@dataclass(frozen=True)
class HubPlan:
    """What one source still needs, listed (metadata only) before anything is downloaded."""

    source: HubSource
    commit: str
    files: list[RepoSibling]
    vouched: dict[str, FileRecord]  # recorded at this commit and still on disk (rehashed, with verify)
    bytes_to_fetch: int


def plan_hub_source(source: HubSource, api: HfApi, manifest: Manifest, verify: bool) -> HubPlan:
    """The commit and its files; a token without access to a gated repo fails here. A file on disk that is not what
    the hub lists (a wrong size; with `verify`, a wrong hash) is removed, so that the download fetches it anew."""
    with explained_hub_errors(source, api):
        if source.gated:
            api.auth_check(source.repo_id)  # one small request: is the license accepted?
        pinned = manifest.complete_sources.get(source.repo_id)  # a manifest shipped in the image pins the commit
        info = api.model_info(source.repo_id, revision=pinned, files_metadata=True)
    files = sorted(filter_repo_objects(info.siblings or [], allow_patterns=list(source.patterns),
                                       ignore_patterns=list(IGNORED_PATTERNS), key=lambda remote: remote.rfilename),
                   key=lambda remote: remote.rfilename)
    vouched, missing = {}, 0
    for remote in files:
        path = source.directory / remote.rfilename
        name = manifest.name_of(path)
        problem, sha256 = mismatch_with_hub(path, name, remote) if verify and path.is_file() else (None, "")
        if problem is None and has_size(path, remote.size):
            if (record := manifest.files.get(name)) is not None and record.revision == info.sha:
                vouched[name] = FileRecord(source.repo_id, info.sha, record.size, sha256 or record.sha256)
        elif path.is_file():
            log.info("replacing %s: %s", name, problem or "its size differs from the hub's")
            path.unlink()
        missing += 0 if path.is_file() else remote.size or 0
    return HubPlan(source, info.sha, files, vouched, missing)


def fetch_hub_source(plan: HubPlan, api: HfApi, manifest: Manifest, report: ProvisionReport) -> None:
    """One snapshot_download, then a check of what it fetched; the manifest is written afterwards."""
    source = plan.source
    log.info("%s: %d files, %s to fetch", source.repo_id, len(plan.files), human_bytes(plan.bytes_to_fetch))
    present = {remote.rfilename for remote in plan.files if (source.directory / remote.rfilename).is_file()}
    with explained_hub_errors(source, api):
        api.snapshot_download(source.repo_id, revision=plan.commit, local_dir=source.directory, tqdm_class=ProgressLog,
                              allow_patterns=list(source.patterns), ignore_patterns=list(IGNORED_PATTERNS))
    records, problems = {}, []
    for remote in plan.files:
        path = source.directory / remote.rfilename
        name = manifest.name_of(path)
        problem, sha256 = (None, "") if name in plan.vouched else mismatch_with_hub(path, name, remote)
        if problem is not None:
            path.unlink()
            problems.append(problem)
            continue
        records[name] = plan.vouched.get(name) or FileRecord(source.repo_id, plan.commit, path.stat().st_size, sha256)
        if remote.rfilename in present:
            report.kept.append(name)
        else:
            report.add_fetched(name, path.stat().st_size)
    manifest.record_source(source.repo_id, plan.commit, records, complete=not problems)
    if problems:
        raise CorruptFileError("\n".join(problems) + "; the download was corrupted and has been removed, "
                               "run again to fetch it anew")


def provision(weights_dir: Path, settings: Settings = Settings(), *, verify: bool = False,
              lassie: bool = True) -> ProvisionReport:
    """Brings `weights_dir` to the complete layout; `verify` rehashes every file against the hub's listing. Nothing is
    downloaded before every check passed, those needing no network first. `lassie` False leaves weights/lassie/ alone
    (the LoRA comes from COG_WEIGHTS or LASSIE_LORA_URL)."""
    layout = WeightsLayout(Path(weights_dir))
    origin = settings.provision.lora_url
    api = HfApi(endpoint=settings.provision.hf_endpoint.rstrip("/"),  # HF_TOKEN, else what `hf auth login` stored
                token=settings.lora.tokens.get("HF_TOKEN") or get_token())
    manifest = Manifest.load(layout.manifest)
    report = ProvisionReport()
    pending = []
    for source in hub_sources(layout):
        recorded = manifest.files_from(source.repo_id)
        if not verify and source.repo_id in manifest.complete_sources and all(
                has_size(layout.root / name, record.size) for name, record in recorded.items()):
            log.info("%s: all %d files in place", source.repo_id, len(recorded))
            report.kept.extend(recorded)
        else:
            pending.append(source)
    fail_on([lora_origin_problem(layout, origin) if lassie else None, writing_problem(layout.root),
             *(gated_message(api, source.repo_id) for source in pending if source.gated and api.token is None)])
    plans = [plan_hub_source(source, api, manifest, verify) for source in pending]
    needed, free = sum(plan.bytes_to_fetch for plan in plans), shutil.disk_usage(layout.root).free
    fail_on([f"{layout.root} has {human_bytes(free)} free but the files still to fetch need {human_bytes(needed)}: "
             "free some space or give another weights directory" if needed > free else None])
    for plan in plans:
        fetch_hub_source(plan, api, manifest, report)
    if lassie:
        provision_lassie_lora(layout, manifest, report, origin, verify, settings)
    layout.require_complete(lassie=lassie)
    return report
