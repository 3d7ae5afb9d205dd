"""Booting as on Replicate, through the real Cog server on tiny weights, with no Hugging Face token.

The boot matrix: the Lassie LoRA from a COG_WEIGHTS tar URL, a COG_WEIGHTS .safetensors URL,
LASSIE_LORA_URL, or weights/lassie/; crossed with weights that are complete, empty with
LASSIE_WEIGHTS_URL, or a read-only mount. Each cell is one server started as a built image starts
it (`CogServer`: COG_MAX_CONCURRENCY from cog.yaml's concurrency.max, HF_TOKEN empty, any hub
request refused) and one prediction at the smallest size and steps, which must give the pixels
of the reference: the session's `cog_server`, the tiny weights with their own Lassie LoRA in
weights/lassie/, i.e. the cell (weights/lassie/, complete), booted once for the whole suite.

Where the LoRA comes from an address, weights/lassie/ is absent (a fine-tune's empty disk) or, on
the read-only mount, holds a decoy that must lose. Weights and LoRAs come from one loopback host
(`scripts/range_server.py`), each cell under its own paths so that every fetch is counted.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from cog_server import CogServer
from helpers import decode, folder_tar, tiny_lora, training_output_tar
from lassie.weights.layout import LAYOUT_FOLDERS, WeightsLayout
from range_server import RangeServer

REQUEST = {"prompt": "a photo of LSSIE", "num_inference_steps": 1, "seed": 11, "megapixels": "0.25",
           "output_format": "png"}
NO_HUB = {"HF_TOKEN": "", "HF_ENDPOINT": "http://127.0.0.1:9"}  # any hub request would fail
READ_ONLY_MOUNT = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
LORA_SOURCES = ("cog-weights-tar", "cog-weights-safetensors", "lassie-lora-url", "weights-lassie")
WEIGHTS = ("complete", "empty-with-weights-url", "read-only")
BASE_FOLDERS = tuple(folder for folder in LAYOUT_FOLDERS if folder != "lassie")
# Every cell but the reference's own (weights/lassie/, complete): the session's cog_server boots that one.
CELLS = [(source, weights) for source in LORA_SOURCES for weights in WEIGHTS
         if (source, weights) != ("weights-lassie", "complete")]


@pytest.fixture(scope="module")
def host(tiny_weights: Path) -> Iterator[RangeServer]:
    """One loopback host for every cell; each cell gets its own paths (`serve_cell`)."""
    with RangeServer() as server:
        yield server


@pytest.fixture(scope="module")
def served(tiny_weights: Path) -> dict[str, bytes]:
    """What the host serves, built once, relative to a cell's prefix: the weights as Replicate's host
    has them (dev under one top-level folder), a training output, a bare LoRA and an extra LoRA."""
    lora = WeightsLayout(tiny_weights).lassie_lora.read_bytes()
    tops = {"flux-dev": "FLUX.1-dev"}  # the others sit at the tar's root
    return {**{f"/weights/{folder}.tar": folder_tar(tiny_weights / folder, tops.get(folder))
               for folder in LAYOUT_FOLDERS},
            "/trained_model.tar": training_output_tar(lora), "/lora.safetensors": lora,
            "/extra.safetensors": tiny_lora(seed=3)}


def serve_cell(host: RangeServer, served: dict[str, bytes], cell: str) -> None:
    for path, body in served.items():
        host.serve(f"/{cell}{path}", body)


@pytest.fixture(scope="module")
def expected(cog_server: CogServer) -> np.ndarray:
    return image(cog_server.predict(REQUEST))


def namespace_refusal() -> str | None:
    """Why this kernel gives no private mount namespace to an unprivileged user, or None."""
    try:
        done = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "unshare (util-linux) is not installed"
    return None if done.returncode == 0 else f"unshare -rm refused: {done.stderr.strip()}"


def lora_env(source: str, url: str) -> dict[str, str]:
    """The environment naming the Lassie LoRA of `source` (nothing for weights/lassie/)."""
    return {"cog-weights-tar": {"COG_WEIGHTS": f"{url}/trained_model.tar"},
            # A bare .safetensors names no trigger word: the operator's LASSIE_TRIGGER_WORD gives it.
            "cog-weights-safetensors": {"COG_WEIGHTS": f"{url}/lora.safetensors", "LASSIE_TRIGGER_WORD": "LSSIE"},
            "lassie-lora-url": {"LASSIE_LORA_URL": f"{url}/trained_model.tar"},
            "weights-lassie": {}}[source]


def lora_path(source: str, cell: str) -> str | None:
    return {"cog-weights-tar": f"/{cell}/trained_model.tar", "cog-weights-safetensors": f"/{cell}/lora.safetensors",
            "lassie-lora-url": f"/{cell}/trained_model.tar", "weights-lassie": None}[source]


def weights_for(weights: str, source: str, tiny_weights: Path, directory: Path) -> None:
    """`directory` as the cell has it: a copy of the base folders (plus weights/lassie/: the LoRA
    itself, or on the read-only mount a decoy the addressed LoRA must win over), or nothing."""
    directory.mkdir()
    if weights == "empty-with-weights-url":
        return
    for folder in BASE_FOLDERS:
        shutil.copytree(tiny_weights / folder, directory / folder)
    if source == "weights-lassie":
        shutil.copytree(tiny_weights / "lassie", directory / "lassie")
    elif weights == "read-only":
        (directory / "lassie").mkdir()
        WeightsLayout(directory).lassie_lora.write_bytes(tiny_lora(seed=99))


@dataclass
class Boot:
    """What one cell's server did: the HTTP answers to its predictions, its log, its directories."""

    directory: Path
    before: list[str]
    fallback_parent: Path
    health: dict
    log: str = ""
    answers: list[tuple[int, dict]] = field(default_factory=list)


def listing(directory: Path) -> list[str]:
    return sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*"))


def boot(host: RangeServer, tiny_weights: Path, tmp_path: Path, source: str, weights: str) -> Boot:
    """Starts the cell's server, asks for the reference request (and, read-only, one with an extra
    LoRA whose cache must fall back), and stops it; nothing is asserted here, in a worker thread."""
    cell = f"{source}-{weights}"
    directory = tmp_path / "weights"
    weights_for(weights, source, tiny_weights, directory)
    (tmp_path / "tmp").mkdir()
    env = {**NO_HUB, **lora_env(source, host.url(f"/{cell}")), "LASSIE_LORA_CACHE": "",
           "LASSIE_ALLOW_PRIVATE_URLS": "127.0.0.1", "TMPDIR": str(tmp_path / "tmp"), "HF_HOME": str(tmp_path / "hf")}
    if weights == "empty-with-weights-url":
        env["LASSIE_WEIGHTS_URL"] = host.url(f"/{cell}/weights")
    wrapper = ["unshare", "-rm", "sh", "-c", READ_ONLY_MOUNT, str(directory)] if weights == "read-only" else None
    server = CogServer(directory, env=env, wrapper=wrapper, log_path=tmp_path / "server.log")
    result = Boot(directory, listing(directory), tmp_path / "tmp", server.start())
    try:
        if result.health.get("status") == "READY":
            result.answers.append(server.predict(REQUEST))
            if weights == "read-only":
                result.answers.append(server.predict({**REQUEST, "extra_lora": host.url(f"/{cell}/extra.safetensors")}))
    finally:
        server.stop()
    result.log = server.log_path.read_text()
    return result


@pytest.fixture(scope="module")
def boots(host: RangeServer, served: dict[str, bytes], tiny_weights: Path,
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, Boot]:
    """Every cell booted, two servers at a time: a boot is mostly one process importing torch, so
    the second core would idle otherwise."""
    cells = [cell for cell in CELLS if cell[1] != "read-only" or namespace_refusal() is None]
    for cell in cells:
        serve_cell(host, served, "-".join(cell))
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda cell: boot(host, tiny_weights, tmp_path_factory.mktemp("-".join(cell)), *cell), cells)
        return {"-".join(cell): result for cell, result in zip(cells, done, strict=True)}


def image(answer: tuple[int, dict]) -> np.ndarray:
    status, body = answer
    assert status == 200 and body["status"] == "succeeded", body.get("error") or body
    (uri,) = body["output"]
    return np.asarray(decode(uri).convert("RGB"))


@pytest.mark.parametrize(("source", "weights"), CELLS, ids=["-".join(cell) for cell in CELLS])
def test_every_boot_gives_the_reference_pixels(host: RangeServer, boots: dict[str, Boot], expected: np.ndarray,
                                               source: str, weights: str) -> None:
    cell = f"{source}-{weights}"
    if cell not in boots:
        pytest.skip(f"needs a private mount namespace for the read-only mount: {namespace_refusal()}")
    result = boots[cell]
    assert result.health.get("status") == "READY", f"setup failed: {result.log[-4000:]}"
    assert np.array_equal(image(result.answers[0]), expected)
    assert "trigger word: 'LSSIE'" in result.log
    if (path := lora_path(source, cell)) is not None:
        assert host.count(path) == 1
        variable = "COG_WEIGHTS" if source.startswith("cog-weights") else "LASSIE_LORA_URL"
        assert f"from {variable} ({host.url(path)}); trigger word: 'LSSIE'" in result.log
    if weights == "empty-with-weights-url":
        folders = LAYOUT_FOLDERS if source == "weights-lassie" else BASE_FOLDERS
        assert {folder: host.count(f"/{cell}/weights/{folder}.tar") for folder in LAYOUT_FOLDERS} \
            == {folder: int(folder in folders) for folder in LAYOUT_FOLDERS}
        assert WeightsLayout(result.directory).missing(lassie=source == "weights-lassie") == []
        assert "through 16 parallel ranges" in result.log
    if weights == "read-only":
        assert listing(result.directory) == result.before
        assert not np.array_equal(image(result.answers[1]), expected)
        (cache,) = result.fallback_parent.glob("lassie-*/lora-cache")  # per user: lassie-<user name>
        assert (f"extra-LoRA cache: {result.directory / 'lora-cache'} cannot be written (Read-only file system); "
                f"using {cache}; whatever else setup keeps in {result.directory} falls back to {cache.parent} too"
                ) in result.log
        assert result.log.count("cannot be written") == 1  # one line, however many places fall back
        assert len(list(cache.glob("*.safetensors"))) == 1
        if source != "weights-lassie":
            assert (cache.parent / "fetched-lora").is_dir()
