"""The weights from the Hugging Face hub: FLUX.1 dev and schnell and the safety models, then the Lassie LoRA.

Everything that can fail cheaply is checked before the first byte of FLUX is fetched: where the
Lassie LoRA comes from, the token's access to the gated repo, that the directory is writable, and
that its disk has room for what is still to come (the hub lists every file's size).

Each source is one `huggingface_hub.snapshot_download` into its directory, pinned to the commit
listed first: the library skips files it already fetched (its metadata lives in each directory's
`.cache/huggingface/`), retries a dropped transfer from where it stopped and checks sizes. What it
fetched is then checked against the hub's listing (LFS sha256 or git blob id) and recorded in
manifest.json, which makes a second run free: a source whose recorded files are all still on disk
at their recorded size is not asked about again, so a provisioned box needs no network; a manifest
shipped without the weights (in the image) pins each repo to the commit it recorded.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, get_token, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.utils import filter_repo_objects

from lassie.fetch.files import sha256_of
from lassie.fetch.http import ProgressLog, human_bytes
from lassie.fetch.hub_errors import HUB_ERRORS, hub_problem
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
    return (
        HubSource("black-forest-labs/FLUX.1-dev", layout.dev_dir, dev_parts, gated=True),
        HubSource("black-forest-labs/FLUX.1-schnell", layout.schnell_dir,
                  ("model_index.json", "scheduler/*", "transformer/*")),
        HubSource("CompVis/stable-diffusion-safety-checker", layout.compvis_dir, safety_files),
        HubSource("Falconsai/nsfw_image_detection", layout.falcon_dir, safety_files),
    )


@dataclass(frozen=True)
class HubAccess:
    """Where the hub is and who we are, passed to every huggingface_hub call."""

    endpoint: str
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> HubAccess:
        """HF_TOKEN from the settings, else the token `hf auth login` stored."""
        return cls(settings.provision.hf_endpoint.rstrip("/"), settings.lora.tokens.get("HF_TOKEN") or get_token())

    def api(self) -> HfApi:
        return HfApi(endpoint=self.endpoint, token=self.token)

    def list_files(self, source: HubSource, revision: str | None) -> tuple[str, list[RepoSibling]]:
        """The commit and the wanted files, with the sizes and hashes to check them against."""
        info = self.api().model_info(source.repo_id, revision=revision, files_metadata=True)
        wanted = filter_repo_objects(info.siblings or [], allow_patterns=list(source.patterns),
                                     ignore_patterns=list(IGNORED_PATTERNS), key=lambda sibling: sibling.rfilename)
        return info.sha, sorted(wanted, key=lambda sibling: sibling.rfilename)

    def download(self, source: HubSource, commit: str) -> None:
        snapshot_download(source.repo_id, revision=commit, local_dir=source.directory,
                          allow_patterns=list(source.patterns), ignore_patterns=list(IGNORED_PATTERNS),
                          endpoint=self.endpoint, token=self.token, tqdm_class=ProgressLog)

    def gated_message(self, repo_id: str) -> str:
        page = f"{self.endpoint}/{repo_id}"
        if self.token is None:
            problem = f"{repo_id} is gated and no Hugging Face token is set."
        else:
            problem = f"{repo_id} is gated and the token in HF_TOKEN has no access to it."
        return (f"{problem} Accept its license at {page} (logged in to Hugging Face), create a read token "
                f"at {self.endpoint}/settings/tokens and run again with HF_TOKEN=<that token> in the environment.")


@contextmanager
def explained_hub_errors(source: HubSource, access: HubAccess) -> Iterator[None]:
    """A gated repo gets setup's own guidance (its license page, the token to create); any other
    failure the project's one wording of hub errors, and a rerun resumes."""
    try:
        yield
    except RepositoryNotFoundError as error:
        if source.gated:
            raise ProvisionError(access.gated_message(source.repo_id)) from None
        raise ProvisionError(hub_problem_of(source, access, error)) from None
    except HUB_ERRORS as error:
        raise ProvisionError(f"{hub_problem_of(source, access, error)}\n{RUN_AGAIN}") from None


def hub_problem_of(source: HubSource, access: HubAccess, error: BaseException) -> str:
    tokens = {"HF_TOKEN": access.token} if access.token else {}
    return hub_problem(error, f"{source.repo_id} on {access.endpoint}", revision=None,
                       has_token=bool(access.token), tokens=tokens)


def is_in_place(source: HubSource, manifest: Manifest) -> bool:
    """A source whose recorded files are all on disk is not asked about again: no network needed."""
    root = manifest.path.parent
    return source.repo_id in manifest.complete_sources and all(
        has_size(root / name, record.size) for name, record in manifest.files_from(source.repo_id).items())


def token_problem(source: HubSource, access: HubAccess) -> str | None:
    return access.gated_message(source.repo_id) if source.gated and access.token is None else None


def git_blob_sha1(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """The id git gives the file's content (what the hub lists for files outside LFS): sha1 of
    `blob <size>\\0` and the bytes, read in chunks."""
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


def plan_hub_source(source: HubSource, access: HubAccess, manifest: Manifest, verify: bool) -> HubPlan:
    """The commit to fetch from and its files; a token without access to a gated repo fails here.

    A file on disk that is not what the hub lists (a wrong size; with `verify`, a wrong hash) is
    removed, so that the download fetches it anew.
    """
    with explained_hub_errors(source, access):
        if source.gated:
            access.api().auth_check(source.repo_id)  # one small request: is the license accepted?
        # A manifest that came with the image pins each repo to the commit it recorded.
        commit, remote_files = access.list_files(source, manifest.complete_sources.get(source.repo_id))
    vouched = {}
    for remote in remote_files:
        path = source.directory / remote.rfilename
        name = manifest.name_of(path)
        record = manifest.files.get(name)
        if not path.is_file():
            continue
        problem, sha256 = mismatch_with_hub(path, name, remote) if verify else (None, "")
        if problem is None and has_size(path, remote.size) and record is not None and record.revision == commit:
            vouched[name] = FileRecord(source.repo_id, commit, record.size, sha256 or record.sha256)
        elif problem is not None or not has_size(path, remote.size):
            log.info("replacing %s: %s", name, problem or "its size differs from the hub's")
            path.unlink()
    missing = sum(remote.size or 0 for remote in remote_files if not (source.directory / remote.rfilename).is_file())
    return HubPlan(source, commit, remote_files, vouched, missing)


def fetch_hub_source(plan: HubPlan, access: HubAccess, manifest: Manifest, report: ProvisionReport) -> None:
    """One snapshot_download, then a check of what it fetched; the manifest is written afterwards."""
    source = plan.source
    log.info("%s: %d files, %s to fetch", source.repo_id, len(plan.files), human_bytes(plan.bytes_to_fetch))
    present = {remote.rfilename for remote in plan.files if (source.directory / remote.rfilename).is_file()}
    with explained_hub_errors(source, access):
        access.download(source, plan.commit)
    records, problems = {}, []
    for remote in plan.files:
        path = source.directory / remote.rfilename
        name = manifest.name_of(path)
        if name in plan.vouched:
            records[name] = plan.vouched[name]
            report.kept.append(name)
            continue
        problem, sha256 = mismatch_with_hub(path, name, remote)
        if problem is not None:
            path.unlink()
            problems.append(problem)
            continue
        records[name] = FileRecord(source.repo_id, plan.commit, path.stat().st_size, sha256)
        if remote.rfilename in present:
            report.kept.append(name)
        else:
            report.add_fetched(name, path.stat().st_size)
    manifest.record_source(source.repo_id, plan.commit, records, complete=not problems)
    if problems:
        raise CorruptFileError("\n".join(problems) + "; the download was corrupted and has been removed, "
                               "run again to fetch it anew")


def space_problem(root: Path, plans: list[HubPlan]) -> str | None:
    needed = sum(plan.bytes_to_fetch for plan in plans)
    free = shutil.disk_usage(root).free
    if needed <= free:
        return None
    return (f"{root} has {human_bytes(free)} free but the files still to fetch need {human_bytes(needed)}: "
            "free some space or give another weights directory")


def provision(weights_dir: Path, settings: Settings = Settings(), *, verify: bool = False,
              lassie: bool = True) -> ProvisionReport:
    """Brings `weights_dir` to the complete layout; `verify` rehashes every file against the hub's listing.

    Nothing is downloaded until every check passed: first those needing no network (LoRA origin,
    writable directory, a token for the gated repo), then the hub's listings (token access, sizes
    against free space). The LoRA, small, is fetched last; `lassie` False leaves weights/lassie/
    alone (the Lassie LoRA comes from COG_WEIGHTS or LASSIE_LORA_URL at setup instead).
    """
    layout = WeightsLayout(Path(weights_dir))
    origin = settings.provision.lora_url
    access = HubAccess.from_settings(settings)
    manifest = Manifest.load(layout.manifest)
    report = ProvisionReport()
    pending = []
    for source in hub_sources(layout):
        if not verify and is_in_place(source, manifest):
            log.info("%s: all %d files in place", source.repo_id, len(manifest.files_from(source.repo_id)))
            report.kept.extend(manifest.files_from(source.repo_id))
        else:
            pending.append(source)
    fail_on([lora_origin_problem(layout, origin) if lassie else None, writing_problem(layout.root),
             *(token_problem(source, access) for source in pending)])
    plans = [plan_hub_source(source, access, manifest, verify) for source in pending]
    fail_on([space_problem(layout.root, plans)])
    for plan in plans:
        fetch_hub_source(plan, access, manifest, report)
    if lassie:
        provision_lassie_lora(layout, manifest, report, origin, verify, settings)
    layout.require_complete(lassie=lassie)
    return report
