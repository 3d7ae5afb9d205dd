"""A prediction's files: a fresh folder each time, named for the host and process, none left behind."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from lassie.request.outputs import PREFIX, OutputFolders, host_prefix
from lassie.request.plan import Request


@pytest.fixture
def tmpdir_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def ended_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_start_removes_the_outputs_of_this_host_s_processes_that_no_longer_run(tmpdir_here: Path):
    gone, running, mine = ended_pid(), os.getppid(), os.getpid()
    folders = {name: tmpdir_here / name for name in (
        f"{host_prefix()}{gone}-abc", f"{host_prefix()}{running}-abc", f"{host_prefix()}{mine}-abc",
        f"{PREFIX}another-host-{gone}-abc", f"{PREFIX}abc123")}  # the last: named before pids were
    for folder in folders.values():
        folder.mkdir()
        (folder / "out-0.webp").write_bytes(b"x")
    assert OutputFolders.remove_leftovers() == [folders[f"{host_prefix()}{gone}-abc"]]
    assert sorted(path.name for path in tmpdir_here.iterdir()) == sorted(set(folders) - {f"{host_prefix()}{gone}-abc"})


def test_each_prediction_gets_a_fresh_folder_and_the_last_goes_at_exit(tmpdir_here: Path):
    outputs = OutputFolders()
    first = outputs.fresh()
    second = outputs.fresh()
    assert not first.exists() and second.is_dir() and second.name.startswith(f"{host_prefix()}{os.getpid()}-")
    outputs.remove_current()
    assert list(tmpdir_here.iterdir()) == []


def test_the_predictor_writes_into_a_folder_named_for_this_process(predictor):
    (path,) = predictor.predict(Request(prompt="x", num_inference_steps=1, seed=1, megapixels="0.25"))
    assert path.parent.name.startswith(f"{host_prefix()}{os.getpid()}-")
