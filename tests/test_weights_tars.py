"""Weights from tar URLs and the Lassie LoRA from COG_WEIGHTS, in-process, against a loopback host.

The host (`scripts/range_server.py`) answers range requests or not, and can cut a response short
while announcing its full length, as a dropped connection does.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO
from helpers import folder_tar, training_output_tar
from lassie.settings import SettingError, Settings, cog_weights_value
from lassie.weights.downloads import FetchOptions
from lassie.weights.layout import LAYOUT_FOLDERS, WeightsLayout
from lassie.weights.provision import (
    FETCH_LOCK,
    ProvisionError,
    ensure_weights,
    fetch_lock,
    fetch_missing_folders,
    provision_from_tars,
)
from range_server import RangeServer

SMALL_CHUNKS = FetchOptions(connections=4, chunk_bytes=64 * 1024, use_pget=False)
TOP_FOLDERS = {"flux-dev": "FLUX.1-dev"}  # the others sit at the tar's root


@pytest.fixture(scope="module")
def tars(tiny_weights: Path) -> dict[str, bytes]:
    return {folder: folder_tar(tiny_weights / folder, TOP_FOLDERS.get(folder)) for folder in LAYOUT_FOLDERS}


@pytest.fixture(params=[True, False], ids=["ranges", "one-stream"])
def host(request: pytest.FixtureRequest, tars: dict[str, bytes]) -> Iterator[RangeServer]:
    with RangeServer(ranges=request.param) as server:
        for folder, data in tars.items():
            server.serve(f"/weights/{folder}.tar", data)
        yield server


def settings_with(**env: str) -> Settings:
    return Settings.from_env({name: value for name, value in env.items()})


def layout_with(root: Path, tiny_weights: Path, *folders: str) -> WeightsLayout:
    """A weights directory holding only `folders` (links to the tiny weights' own)."""
    root.mkdir()
    for folder in folders:
        os.symlink(tiny_weights / folder, root / folder)
    return WeightsLayout(root)


def files_of(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file() and not path.name.startswith(".")}


def test_an_empty_directory_is_filled_from_the_base_url_and_a_second_run_fetches_nothing(
        host: RangeServer, tiny_weights: Path, tmp_path: Path) -> None:
    layout = WeightsLayout(tmp_path / "weights")
    settings = settings_with(LASSIE_WEIGHTS_URL=host.url("/weights/"))
    assert fetch_missing_folders(layout, settings, options=SMALL_CHUNKS) == list(LAYOUT_FOLDERS)
    assert layout.missing() == []
    expected = {name: data for name, data in files_of(tiny_weights).items() if name.split("/")[0] in LAYOUT_FOLDERS}
    assert files_of(layout.root) == expected
    assert sorted(path.name for path in layout.root.iterdir()) == sorted([*LAYOUT_FOLDERS, ".fetching.lock"])
    dev_requests = host.count("/weights/flux-dev.tar")
    assert dev_requests > 1 if host.ranges else dev_requests == 1  # 65 kB chunks: several ranges
    assert fetch_missing_folders(layout, settings, options=SMALL_CHUNKS) == []
    assert host.count("/weights/flux-dev.tar") == dev_requests


def test_a_folder_url_overrides_the_base_and_only_missing_folders_are_fetched(
        host: RangeServer, tiny_weights: Path, tmp_path: Path, tars: dict[str, bytes]) -> None:
    layout = layout_with(tmp_path / "weights", tiny_weights, "flux-dev", "lassie")
    own = host.serve("/elsewhere/slim.tar", tars["flux-schnell"])
    settings = settings_with(LASSIE_WEIGHTS_URL=host.url("/weights"), LASSIE_FLUX_SCHNELL_URL=own)
    assert fetch_missing_folders(layout, settings, options=SMALL_CHUNKS) == ["flux-schnell", "safety"]
    assert host.count("/weights/flux-schnell.tar") == 0 and host.count("/elsewhere/slim.tar") >= 1
    assert layout.missing() == []


def test_a_tar_cut_short_leaves_no_folder_and_names_the_url(host: RangeServer, tars: dict[str, bytes],
                                                            tiny_weights: Path, tmp_path: Path) -> None:
    data = tars["flux-schnell"]
    url = host.serve("/weights/flux-schnell.tar", data, cut_after=len(data) // 3)
    layout = layout_with(tmp_path / "weights", tiny_weights, "flux-dev", "safety")
    settings = settings_with(LASSIE_FLUX_SCHNELL_URL=f"{url}?signature=secret")
    with pytest.raises(ProvisionError) as caught:
        fetch_missing_folders(layout, settings, lassie=False, options=SMALL_CHUNKS)
    message = str(caught.value)
    assert f"the download of {url}?… was cut short" in message and "secret" not in message
    assert "run again to resume" in message
    assert not layout.schnell_dir.exists()
    assert sorted(path.name for path in layout.root.iterdir()) == [".fetching.lock", "flux-dev", "safety"]


@pytest.mark.parametrize(("bounds", "said"), [
    ({"max_bytes": 1000}, r"is \d+\.\d KiB, more than the 1000 bytes a weights folder may be"),
    ({"deadline_seconds": 0.0}, r"took longer than the 0 s allowed for fetching a weights folder \(LASSIE_WEIGHTS_DOWNLOAD_TIMEOUT\)"),
])
def test_sizes_and_times_are_bounded(host: RangeServer, tiny_weights: Path, tmp_path: Path,
                                     bounds: dict[str, float], said: str) -> None:
    layout = layout_with(tmp_path / "weights", tiny_weights, "flux-dev", "flux-schnell")
    options = FetchOptions(connections=4, chunk_bytes=64 * 1024, use_pget=False, **bounds)
    with pytest.raises(ProvisionError, match=said):
        fetch_missing_folders(layout, settings_with(LASSIE_SAFETY_URL=host.url("/weights/safety.tar")), lassie=False,
                              options=options)
    assert not (layout.root / "safety").exists()


def test_a_tar_without_the_folders_files_is_refused(host: RangeServer, tars: dict[str, bytes],
                                                    tiny_weights: Path, tmp_path: Path) -> None:
    url = host.serve("/weights/wrong.tar", tars["lassie"])
    layout = layout_with(tmp_path / "weights", tiny_weights, "flux-dev", "safety")
    with pytest.raises(ProvisionError, match=r"wrong\.tar lacks flux-schnell/scheduler/scheduler_config\.json"):
        fetch_missing_folders(layout, settings_with(LASSIE_FLUX_SCHNELL_URL=url), lassie=False, options=SMALL_CHUNKS)
    assert not layout.schnell_dir.exists()


def test_a_missing_folder_without_any_url_is_named_before_any_fetch(tmp_path: Path) -> None:
    said = ("^flux-schnell, safety missing and no URL names a tar for it: set LASSIE_WEIGHTS_URL .* "
            "or LASSIE_FLUX_SCHNELL_URL, LASSIE_SAFETY_URL$")
    with pytest.raises(ProvisionError, match=said):
        fetch_missing_folders(WeightsLayout(tmp_path), settings_with(LASSIE_FLUX_DEV_URL="http://127.0.0.1:9/x.tar"),
                              lassie=False)


def test_pget_on_path_fetches_and_extracts(tars: dict[str, bytes], tiny_weights: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in `pget` with pget's command line (`pget -x URL DEST`) that records its calls."""
    calls = tmp_path / "pget-calls"
    fake = tmp_path / "bin" / "pget"
    fake.parent.mkdir()
    fake.write_text(f"""#!{sys.executable}
import sys, tarfile, urllib.request
open({str(calls)!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")
flag, url, destination = sys.argv[1:]
assert flag == "-x"
with urllib.request.urlopen(url) as response, tarfile.open(fileobj=response, mode="r|") as tar:
    tar.extractall(destination, filter="data")
""")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    layout = layout_with(tmp_path / "weights", tiny_weights, "flux-dev", "flux-schnell")
    with RangeServer() as server:
        url = server.serve("/safety.tar", tars["safety"])
        assert fetch_missing_folders(layout, settings_with(LASSIE_SAFETY_URL=url), lassie=False) == ["safety"]
        assert server.count("/safety.tar") == 1
    (line,) = calls.read_text().splitlines()
    assert line.startswith(f"-x {url} {layout.root}/.fetching-safety-")
    assert layout.missing(lassie=False) == []


def test_a_failing_pget_leaves_no_folder_and_says_what_it_said(tiny_weights: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin" / "pget"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nmkdir -p "$3/compvis" && echo half > "$3/compvis/config.json"\n'
                    'printf "\\033[31mconnection reset\\033[0m\\n"; exit 3\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    layout = layout_with(tmp_path / "weights", tiny_weights, "flux-dev", "flux-schnell")
    url = "http://127.0.0.1:9/safety.tar"
    with pytest.raises(ProvisionError, match=rf"pget could not download {url}\?… \(exit 3\): connection reset\n"):
        fetch_missing_folders(layout, settings_with(LASSIE_SAFETY_URL=f"{url}?sig=x"), lassie=False)
    assert sorted(path.name for path in layout.root.iterdir()) == [".fetching.lock", "flux-dev", "flux-schnell"]


def test_download_weights_without_a_token_takes_folders_from_tars_and_the_lora_from_its_url(
        tars: dict[str, bytes], tiny_weights: Path, tmp_path: Path) -> None:
    lora = WeightsLayout(tiny_weights).lassie_lora.read_bytes()
    with RangeServer() as server:
        for folder, data in tars.items():
            server.serve(f"/weights/{folder}.tar", data)
        trained = server.serve("/trained_model.tar", training_output_tar(lora, "ZWX"))
        settings = settings_with(LASSIE_WEIGHTS_URL=server.url("/weights"), LASSIE_LORA_URL=trained)
        assert provision_from_tars(tmp_path / "weights", settings) == ["flux-dev", "flux-schnell", "safety"]
        assert server.count("/weights/lassie.tar") == 0
    layout = WeightsLayout(tmp_path / "weights")
    assert layout.lassie_lora.read_bytes() == lora and layout.trigger_word() == "ZWX"


def test_download_weights_in_tar_mode_says_verify_does_not_apply_and_records_no_manifest(
        tars: dict[str, bytes], tmp_path: Path) -> None:
    """Its docstring and docs/architecture.md say so: a tar lists no hashes for a manifest to keep."""
    weights = tmp_path / "weights"
    with RangeServer() as server:
        for folder, data in tars.items():
            server.serve(f"/weights/{folder}.tar", data)
        env = {name: value for name, value in os.environ.items() if not name.startswith(("HF_", "LASSIE_"))}
        done = subprocess.run([sys.executable, str(REPO / "scripts" / "download_weights.py"), str(weights), "--verify"],
                              env=env | {"LASSIE_WEIGHTS_URL": server.url("/weights")},
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "note: --verify rehashes hub downloads against manifest.json; folders fetched from tars" in done.stderr
    assert "fetched flux-dev, flux-schnell, safety, lassie from tars" in done.stdout
    assert not WeightsLayout(weights).missing() and not WeightsLayout(weights).manifest.exists()


# --- the Lassie LoRA from COG_WEIGHTS ------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(None, None), ("", None), ("weights", None), (" https://x/y.tar ",
                                                                                             "https://x/y.tar")])
def test_cog_weights_values(value: str | None, expected: str | None) -> None:
    assert cog_weights_value(value) == expected


def test_with_cog_weights_the_weights_directory_needs_no_lassie_folder(tiny_weights: Path, tmp_path: Path) -> None:
    layout = layout_with(tmp_path / "weights", tiny_weights, "flux-dev", "flux-schnell", "safety")
    ensure_weights(layout, Settings.from_env({"HF_HUB_OFFLINE": "1"}, cog_weights="https://x/y.tar"))


HOLD_THE_FETCH_LOCK = """
import sys
from pathlib import Path
from lassie.weights.provision import fetch_lock
with fetch_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes it
"""


def test_a_boot_waiting_on_another_process_s_fetch_says_so_naming_the_lock_and_its_holder(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As a boot started while a stopped server's orphaned worker still downloads; a short interval
    here stands in for the 10 s one."""
    lock = tmp_path / FETCH_LOCK
    recorded = lock.with_name(lock.name + ".pid")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_FETCH_LOCK, str(lock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    seen_inside: list[str] = []

    def boot() -> None:
        with fetch_lock(lock, report_every=0.05):
            seen_inside.append(recorded.read_text())

    try:
        assert holder.stdout.readline() == "held\n"
        with caplog.at_level(logging.INFO, logger="lassie.weights.provision"):
            waiter = threading.Thread(target=boot)
            waiter.start()
            for _ in range(200):  # bounded: a few seconds at most
                if sum("another process's fetch" in record.getMessage() for record in caplog.records) >= 2:
                    break
                waiter.join(timeout=0.05)
            assert seen_inside == []  # still waiting
            # What is logged from here on may fall between the holder's letting go of its pid file and its lock.
            waits = [record.getMessage() for record in caplog.records
                     if "another process's fetch" in record.getMessage()]
            holder.stdin.close()
            holder.wait(timeout=60)
            waiter.join(timeout=60)
    finally:
        holder.kill()
    assert len(waits) >= 2
    assert all(message.startswith("waiting for another process's fetch of the weights "
                                  f"(lock {lock}, held by pid {holder.pid}); ") for message in waits), waits
    assert seen_inside == [f"{os.getpid()}\n"]  # then it held the lock itself, and recorded so
    assert not recorded.exists()


# --- the settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["LASSIE_WEIGHTS_URL", "LASSIE_FLUX_DEV_URL", "LASSIE_SAFETY_URL"])
def test_a_tar_url_that_is_no_http_url_fails_naming_its_variable(variable: str) -> None:
    with pytest.raises(SettingError, match=f"^{variable} must be an http\\(s\\) URL, got 'file:///weights'$"):
        settings_with(**{variable: "file:///weights"})


def test_a_folders_own_url_overrides_the_base() -> None:
    provision = settings_with(LASSIE_WEIGHTS_URL="https://host/base/",
                              LASSIE_FLUX_DEV_URL="https://r8/files.tar").provision
    assert [provision.tar_url(folder) for folder in LAYOUT_FOLDERS] == [
        "https://r8/files.tar", "https://host/base/flux-schnell.tar", "https://host/base/safety.tar",
        "https://host/base/lassie.tar"]
    assert settings_with().provision.fetches_tars is False and settings_with().provision.tar_url("safety") is None


def test_the_download_benchmark_runs_both_arms_through_the_product_path() -> None:
    """Speed is the script's to measure (docs/benchmarks.md); here only that it runs and reports."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_download.py"), "--megabytes", "4",
                             "--cap-mb-per-s", "0", "--rounds", "1", "--connections", "4"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "one stream:" in result.stdout and "4 parallel ranges:" in result.stdout
    assert "faster than one stream" in result.stdout


def test_setup_fails_first_on_a_lora_cache_setting_it_cannot_write(tiny_weights: Path, tmp_path: Path) -> None:
    from lassie.predictor import Lassie

    (tmp_path / "file").write_text("")
    lassie = Lassie(Settings.from_env({"LASSIE_WEIGHTS_DIR": str(tiny_weights),
                                       "LASSIE_LORA_CACHE": str(tmp_path / "file" / "cache")}))
    with pytest.raises(SettingError, match=r"^LASSIE_LORA_CACHE must be a directory this server can write"):
        lassie.setup()
    assert lassie.models is None
