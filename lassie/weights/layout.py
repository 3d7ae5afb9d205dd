"""The weights directory: where each model lives, what is missing from it and what is damaged. Real FLUX checkpoints
are sharded (`*.safetensors.index.json` plus shards) and tiny ones are not; both layouts are accepted, and nothing here
ever asks which kind of weights these are."""

from __future__ import annotations

import json
from pathlib import Path

from lassie.fetch.files import UnusableSafetensorsError, inspect_safetensors
from lassie.fetch.storage import write_problem
from lassie.settings import WEIGHTS_URL_ENV

PROVIDE_COMMAND = ".venv/bin/python scripts/download_weights.py"
TINY_WEIGHTS_DIR = ".tiny-weights"
RUN_AGAIN = "Files finished so far are kept; run again to resume."

# The top-level folders of the layout, each fetched whole when it comes from a tar.
LAYOUT_FOLDERS = ("flux-dev", "flux-schnell", "safety", "lassie")


class MissingWeightsError(RuntimeError):
    """Setup cannot go on: the message names every missing file and the command that provides them."""


class ProvisionError(RuntimeError):
    """Fetching stopped; the message says what to do (a token, a license, running again)."""


class CorruptFileError(ProvisionError):
    """A file is not what its source says it is; it has been removed so a rerun fetches it anew."""


def fail_on(problems: list[str | None]) -> None:
    """All problems found at once, so one rerun can fix them all."""
    if found := [problem for problem in problems if problem]:
        raise ProvisionError("\n".join(found))


def writing_problem(root: Path) -> str | None:
    problem = write_problem(root)
    return None if problem is None else f"cannot write to the weights directory {root}: {problem}"


# Said wherever weights are missing, so a fresh clone without a Hugging Face token is not stuck.
TINY_WEIGHTS_HINT = ("To run the server without the real weights, build tiny random ones (same layout; images are "
                     f"noise) with `.venv/bin/python scripts/make_tiny_weights.py {TINY_WEIGHTS_DIR}` and start it "
                     f"with LASSIE_WEIGHTS_DIR={TINY_WEIGHTS_DIR} (`bash scripts/demo.sh` builds them).")


def _model_files_missing(directory: Path, stem: str) -> list[Path]:
    """Files a `from_pretrained` of `directory` needs: config plus single or sharded safetensors."""
    missing = [] if (directory / "config.json").is_file() else [directory / "config.json"]
    single, index = directory / f"{stem}.safetensors", directory / f"{stem}.safetensors.index.json"
    if single.is_file():
        return missing
    if not index.is_file():
        return [*missing, single]
    try:
        shards = sorted(set(json.loads(index.read_bytes())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):  # a damaged index names no shards: as good as none
        return [*missing, index]
    return missing + [directory / shard for shard in shards if not (directory / shard).is_file()]


class WeightsLayout:
    """Where each model lives under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dev_dir = root / "flux-dev"
        self.schnell_dir = root / "flux-schnell"
        self.lassie_dir = root / "lassie"
        self.lassie_lora = self.lassie_dir / "lora.safetensors"
        self.trigger_word_file = self.lassie_dir / "trigger_word.txt"
        self.compvis_dir = root / "safety" / "compvis"
        self.falcon_dir = root / "safety" / "falcon"
        self.lora_cache_dir = root / "lora-cache"
        self.manifest = root / "manifest.json"

    def trigger_word(self) -> str:
        return self.trigger_word_file.read_text().strip() if self.trigger_word_file.is_file() else ""

    def missing(self, lassie: bool = True) -> list[str]:
        """Missing files, relative to the weights directory, for messages people can act on; `lassie` False: the
        Lassie LoRA comes from elsewhere (COG_WEIGHTS, LASSIE_LORA_URL). A tokenizer may take either of two forms."""
        dev, schnell = self.dev_dir, self.schnell_dir
        required = (dev / "model_index.json", dev / "scheduler" / "scheduler_config.json",
                    schnell / "scheduler" / "scheduler_config.json", *([self.lassie_lora] if lassie else []),
                    self.compvis_dir / "preprocessor_config.json", self.falcon_dir / "preprocessor_config.json")
        missing = [path for path in required if not path.is_file()]
        for directory in (dev / "transformer", dev / "vae", dev / "text_encoder", dev / "text_encoder_2",
                          schnell / "transformer", self.compvis_dir, self.falcon_dir):
            diffusers = directory.name in ("transformer", "vae")  # the others are transformers' models
            missing += _model_files_missing(directory, "diffusion_pytorch_model" if diffusers else "model")
        for tokenizer, names in ((dev / "tokenizer", ("tokenizer.json", "vocab.json")),
                                 (dev / "tokenizer_2", ("tokenizer.json", "spiece.model"))):
            missing += [] if any((tokenizer / name).is_file() for name in names) else [tokenizer / names[0]]
        return [path.relative_to(self.root).as_posix() for path in missing]

    def require_complete(self, lassie: bool = True) -> None:
        if missing := self.missing(lassie):
            raise MissingWeightsError(f"weights directory {self.root} is incomplete; missing: {', '.join(missing)}. "
                                      f"Provide them with `{PROVIDE_COMMAND} {self.root}` (FLUX.1-dev is gated: "
                                      f"HF_TOKEN). {TINY_WEIGHTS_HINT}")


def safetensors_problem(path: Path) -> str | None:
    """The project's one safetensors check (`inspect_safetensors`) in words, or None when the file is usable."""
    try:
        inspect_safetensors(path)
    except UnusableSafetensorsError as problem:
        return str(problem)
    except FileNotFoundError:
        return "it is missing"
    return None


def file_problems(folder: Path, name: str) -> list[str]:
    """What is wrong with a layout folder's files (hidden folders, huggingface_hub's `.cache/`, aside), cheap enough
    for every start (no hashing): each JSON file parses, each safetensors header parses and fits the file's size."""
    problems = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parent.parts) or not path.is_file():
            continue
        shown = f"{name}/{relative.as_posix()}"
        try:
            if path.suffix == ".json":
                json.loads(path.read_bytes())
            elif path.suffix == ".safetensors" and (problem := safetensors_problem(path)):
                problems.append(f"{shown} is not a usable .safetensors file: {problem}")
        except ValueError as error:
            problems.append(f"{shown} is not valid JSON ({error})")
        except OSError as error:
            problems.append(f"{shown} cannot be read ({error.strerror or error})")
    return problems


def damaged_folders(layout: WeightsLayout, lassie: bool) -> dict[str, list[str]]:
    """The layout folders in place whose files fail `file_problems` (a cut safetensors), with what is wrong."""
    wanted = [folder for folder in LAYOUT_FOLDERS if (lassie or folder != "lassie") and (layout.root / folder).is_dir()]
    return {folder: problems for folder in wanted if (problems := file_problems(layout.root / folder, folder))}


def damage_problem(layout: WeightsLayout, damaged: dict[str, list[str]]) -> str | None:
    """Setup's refusal of damaged folders it cannot fetch again (no tar URL names them, or offline)."""
    if not damaged:
        return None
    described = "\n".join(f"{layout.root / folder} is damaged: {'; '.join(problems)}"
                          for folder, problems in damaged.items())
    return (f"{described}\nSet {WEIGHTS_URL_ENV} (or the folder's own URL) to fetch it again from its tar, or remove "
            f"it and run `{PROVIDE_COMMAND} {layout.root}`.")
