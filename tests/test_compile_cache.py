"""The compile cache: where inductor writes, and a restart served from it.

The restart test runs the product as Cog does (import predict.py, `Predictor.setup()`) in new
processes with the real inductor backend on CPU, each with a fresh temporary directory and no
`TORCHINDUCTOR_CACHE_DIR`, as a restarted container: what it reuses can only come from the weights
directory. Reuse is read from inductor's own counters (FX-graph cache hits), never from timings.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.compiler._cache import CacheInfo

from bench_compile_cache import keep_only_artifacts, start
from conftest import REPO
from lassie.engine import compilation
from lassie.engine.hardware import DeviceInfo
from lassie.predictor import Lassie
from lassie.settings import INDUCTOR_CACHE_ENV, CompileSettings, SettingError, Settings

CPU = DeviceInfo(kind="cpu")
INDUCTOR = compilation.CompileSetting(True)
FEWEST_GRAPHS = {"LASSIE_LORA_SLOT_RANK": "0"}


@pytest.fixture
def no_cache_settings(monkeypatch) -> None:
    """Setting then deleting records the variables, so whatever the code under test sets is undone."""
    for name in (INDUCTOR_CACHE_ENV, "LASSIE_COMPILE_CACHE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_compile_cache_lives_beside_the_weights_unless_the_operator_chose(tmp_path, no_cache_settings):
    cache = compilation.configure_compile_cache(CompileSettings(), tmp_path, CPU, INDUCTOR)
    assert cache.directory == tmp_path / "compile-cache" and cache.carried is None
    assert cache.artifacts.parent == cache.directory and "inductor" in cache.artifacts.name
    assert os.environ[INDUCTOR_CACHE_ENV] == str(tmp_path / "compile-cache")
    chosen = Settings.from_env({INDUCTOR_CACHE_ENV: str(tmp_path / "operator")}).compile
    assert compilation.configure_compile_cache(chosen, tmp_path, CPU, INDUCTOR).directory == tmp_path / "operator"
    assert os.environ[INDUCTOR_CACHE_ENV] == str(tmp_path / "operator")


@pytest.mark.parametrize("variable", [INDUCTOR_CACHE_ENV, "LASSIE_COMPILE_CACHE"])
def test_an_unusable_chosen_compile_cache_fails_setup_naming_its_variable(tmp_path, no_cache_settings, variable):
    blocker = tmp_path / "file"
    blocker.write_text("")
    unusable = Settings.from_env({variable: str(blocker / "cache")}).compile
    with pytest.raises(SettingError, match=f"^{variable} must be a directory this server can write"):
        compilation.configure_compile_cache(unusable, tmp_path, CPU, INDUCTOR)


def test_a_chosen_compile_cache_that_cannot_be_written_fails_setup_even_with_compiling_off(tmp_path,
                                                                                         no_cache_settings):
    """Checked before anything else setup does (here: no weights at all), whatever LASSIE_COMPILE says."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    settings = Settings.from_env({"LASSIE_COMPILE": "0", "LASSIE_COMPILE_CACHE": str(blocker / "cache"),
                                  "LASSIE_WEIGHTS_DIR": str(tmp_path / "weights")})
    with pytest.raises(SettingError, match=r"^LASSIE_COMPILE_CACHE must be a directory this server can write"):
        Lassie(settings).setup()


def test_weights_that_cannot_be_written_compile_into_a_temporary_place_and_still_offer_their_artifacts(
        tmp_path, no_cache_settings, monkeypatch, caplog):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "compile-cache").write_text("")  # stands in for a read-only mount: nothing can be created there
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with caplog.at_level("INFO", logger="lassie"):
        cache = compilation.configure_compile_cache(CompileSettings(), weights, CPU, INDUCTOR)
    assert cache.directory == tmp_path / "tmp" / f"lassie-{getpass.getuser()}" / "compile-cache"
    assert cache.carried == weights / "compile-cache" / cache.artifacts.name
    assert os.environ[INDUCTOR_CACHE_ENV] == str(cache.directory)
    assert sum("compile cache: " in record.getMessage() and "cannot be written" in record.getMessage()
               for record in caplog.records) == 1


READ_ONLY_CHECK = """
import json, os, sys
from lassie.settings import Settings  # first, as predict.py does: before torch's compiler rewrites the environment
from lassie.engine import compilation
from lassie.engine.hardware import DeviceInfo
weights = sys.argv[1]
try:
    cache = compilation.configure_compile_cache(Settings.from_env().compile, compilation.Path(weights),
                                                DeviceInfo(kind="cpu"), compilation.CompileSetting(True))
    print(json.dumps([str(cache.directory), str(cache.carried), os.environ["TORCHINDUCTOR_CACHE_DIR"]]))
except ValueError as error:
    print(json.dumps(["error", str(error)]))
"""


def on_read_only_weights(weights: Path, env: dict[str, str]) -> list[str]:
    """`configure_compile_cache` in a private mount namespace where `weights` is mounted read-only."""
    mount = f"mount --bind {weights} {weights} && mount -o remount,ro,bind {weights} {weights}"
    environ = {name: value for name, value in os.environ.items() if name != INDUCTOR_CACHE_ENV}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f'{mount} && exec "$@"', "sh", sys.executable, "-c",
                           READ_ONLY_CHECK, str(weights)], env=environ | {"PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare for a private read-only mount")
def test_read_only_weights_compile_into_the_temporary_place_and_a_read_only_choice_fails(tmp_path):
    weights, scratch = tmp_path / "weights", tmp_path / "scratch"
    (weights / "compile-cache").mkdir(parents=True)
    scratch.mkdir()
    directory, carried, variable = on_read_only_weights(weights, {"TMPDIR": str(scratch)})
    assert directory == variable == str(scratch / f"lassie-{getpass.getuser()}" / "compile-cache")
    assert Path(carried).parent == weights / "compile-cache"  # an artifacts file carried with the weights is read
    error = on_read_only_weights(weights, {"LASSIE_COMPILE_CACHE": str(weights / "compile-cache")})
    assert error[0] == "error" and error[1].startswith("LASSIE_COMPILE_CACHE must be a directory this server can write")


def test_artifacts_are_named_by_what_must_match():
    h100 = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", capability=(9, 0), total_memory=80 * 2**30)
    names = {compilation.artifacts_name(device, setting) for device in (CPU, h100)
             for setting in (INDUCTOR, compilation.CompileSetting(True, mode="max-autotune"))}
    assert len(names) == 4
    assert all(name == Path(name).name and " " not in name for name in names)
    assert "sm90" in compilation.artifacts_name(h100, INDUCTOR)


def test_artifacts_that_cannot_be_read_or_written_never_fail_setup(tmp_path, monkeypatch, caplog):
    (tmp_path / "bad.bin").write_bytes(b"not torch's artifacts")
    unwritable = tmp_path / "missing" / "out.bin"
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", CacheInfo()))
    with caplog.at_level("INFO", logger="lassie"):
        compilation.CompileCache(tmp_path, tmp_path / "bad.bin").load()
        compilation.CompileCache(tmp_path, unwritable).save()
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING" and record.name.startswith("lassie")]
    assert len(warnings) == 2 and "bad.bin could not be read" in warnings[0] and "saving" in warnings[1]
    assert not unwritable.exists()


@pytest.mark.parametrize("at_start", [None, "/srv/operator-cache"])
def test_the_process_environment_counts_inductor_s_variable_as_it_was_at_start(monkeypatch, at_start):
    monkeypatch.setattr("lassie.settings._AT_START", {INDUCTOR_CACHE_ENV: at_start})
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, "/tmp/torchinductor_root")  # what torch's import writes
    expected = None if at_start is None else Path(at_start)
    assert Settings.from_env().compile.cache_dir == expected
    assert Settings.from_env({INDUCTOR_CACHE_ENV: "/given"}).compile.cache_dir == Path("/given")  # as given


def imported_predict_reads(env: dict[str, str]) -> dict:
    """What `Settings.from_env()` reads, and what the process environment holds, after `import predict`."""
    code = ("import json, os, predict; from lassie.settings import Settings; "
            "print(json.dumps([str(Settings.from_env().compile.cache_dir), os.environ.get('TORCHINDUCTOR_CACHE_DIR')]))")
    environ = {name: value for name, value in os.environ.items() if name != INDUCTOR_CACHE_ENV} | env
    done = subprocess.run([sys.executable, "-c", code], env=environ | {"PYTHONPATH": str(REPO)}, cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_after_import_predict_only_the_operators_own_inductor_cache_variable_counts(tmp_path):
    setting, rewritten = imported_predict_reads({})
    assert setting == "None" and rewritten  # torch wrote its default, which is not the operator's choice
    assert imported_predict_reads({INDUCTOR_CACHE_ENV: str(tmp_path / "mine")})[0] == str(tmp_path / "mine")


def test_a_restart_is_served_from_the_compile_cache_beside_the_weights(tiny_weights, tmp_path):
    """Cold start, then a restart that finds only the saved artifacts file (as another machine would)."""
    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    cache = weights / "compile-cache"
    cold = start(weights, FEWEST_GRAPHS)
    assert cold["inductor_cache_dir"] == str(cache) and cold["setting"] == "None"
    assert cold["fxgraph_cache_miss"] > 0 and cold["fxgraph_cache_hit"] == 0
    assert (cache / "fxgraph").is_dir() and not cold["fxgraph_dirs_in_tmp"]  # nothing compiled into the fresh TMPDIR
    assert len(list(cache.glob("artifacts_*.bin"))) == 1

    keep_only_artifacts(cache)
    restart = start(weights, FEWEST_GRAPHS)
    assert restart["graphs"] == cold["graphs"]
    assert restart["fxgraph_cache_hit"] == cold["fxgraph_cache_miss"] and restart["fxgraph_cache_miss"] == 0
    assert any(line.startswith("compile cache: loaded") for line in restart["cache_lines"])
