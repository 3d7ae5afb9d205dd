"""The one HTTP client as weights fetching uses it: exact ranges of one version of a file,
deadlines a trickle cannot outlast, redirects to http(s) only, secrets never shown.

Hosts are loopback servers that misbehave on purpose (`scripts/range_server.py`,
`fake_services.py`); tars are built here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from fake_services import FakeServices
from helpers import make_tar
from lassie.settings import SettingError, Settings
from lassie.weights.downloads import DownloadError, FetchOptions, fetch_folder, tar_stream
from lassie.weights.layout import WeightsLayout
from lassie.weights.provision import ProvisionError, fetch_missing_folders, provision_from_tars
from range_server import RangeServer

CHUNK = 64 * 1024
RANGES = FetchOptions(connections=4, chunk_bytes=CHUNK, use_pget=False)
SECRET = "s3cret-sig-do-not-log"


def version(seed: int) -> dict[str, bytes]:
    """Two files over many chunks; another seed is another version of the same names and sizes."""
    generator = random.Random(seed)
    return {"model.safetensors": generator.randbytes(6 * CHUNK + 123), "config.json": generator.randbytes(300)}


def files_in(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.fixture
def host() -> Iterator[RangeServer]:
    with RangeServer() as server:
        yield server


def fetch(url: str, tmp_path: Path, options: FetchOptions = RANGES) -> Path:
    target = tmp_path / "folder"
    fetch_folder(url, target, lambda folder: [], options)
    return target


# --- exact ranges -------------------------------------------------------------------------------

def test_a_stable_file_arrives_in_parallel_ranges_bit_exact_each_asked_with_if_range(
        host: RangeServer, tmp_path: Path) -> None:
    url = host.serve("/x.tar", make_tar(version(1)))
    assert files_in(fetch(url, tmp_path)) == version(1)
    assert host.count("/x.tar") > 4, "fetched in parallel ranges"
    etag = f'"{hashlib.sha256(make_tar(version(1))).hexdigest()[:16]}"'
    assert host.if_ranges[0] is None and host.if_ranges[1:] == [etag] * (len(host.if_ranges) - 1)


def test_a_206_of_another_range_than_asked_for_is_refused(host: RangeServer, tmp_path: Path) -> None:
    url = host.serve("/x.tar", make_tar(version(1)), wrong_range=True)
    with pytest.raises(DownloadError, match=r"answered a range request for bytes 65536-131071/\d+ with HTTP 206 "
                                            r"bytes 131072-"):
        fetch(url, tmp_path)
    assert not (tmp_path / "folder").exists()


@pytest.mark.parametrize("server_side", ["honours If-Range", "ignores If-Range"])
def test_a_file_that_changes_between_ranges_starts_over_once_and_arrives_whole(
        host: RangeServer, tmp_path: Path, server_side: str) -> None:
    """Version 1 answers the first range, version 2 everything after: the result is version 2
    exactly, never a mixture of both (which would have a valid tar structure)."""
    url = host.serve("/x.tar", make_tar(version(1)), replaced_by=make_tar(version(2)),
                     ignores_if_range=server_side == "ignores If-Range")
    assert files_in(fetch(url, tmp_path)) == version(2)


def test_a_file_that_keeps_changing_fails_naming_the_url(host: RangeServer, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = host.serve("/x.tar", make_tar(version(1)), replaced_by=make_tar(version(2)), keeps_changing=True)
    with pytest.raises(DownloadError) as caught:
        fetch(f"{url}?sig={SECRET}", tmp_path)
    assert str(caught.value) == (f"{url}?… changed while it was being downloaded, and again after starting over; "
                                 "it must stay the same while setup fetches it")
    assert "starting over" in caplog.text and SECRET not in caplog.text
    assert not (tmp_path / "folder").exists()


def test_a_part_without_a_version_to_check_is_fetched_as_one_stream(host: RangeServer, tmp_path: Path) -> None:
    url = host.serve("/x.tar", make_tar(version(1)), validators=False)
    assert files_in(fetch(url, tmp_path)) == version(1)
    assert host.count("/x.tar") == 2, "the first range, then the whole file once"


# --- deadlines ----------------------------------------------------------------------------------

def test_a_trickling_weights_host_is_cut_at_the_variables_deadline(tmp_path: Path, tiny_weights: Path) -> None:
    """A byte every 0.5 s never trips the 60 s read timeout; LASSIE_WEIGHTS_DOWNLOAD_TIMEOUT=2 does."""
    with RangeServer(ranges=False) as host:
        url = host.serve("/safety.tar", b"x" * 40, trickle=0.5)
        root = tmp_path / "weights"
        root.mkdir()
        for folder in ("flux-dev", "flux-schnell"):
            os.symlink(tiny_weights / folder, root / folder)
        settings = Settings.from_env({"LASSIE_SAFETY_URL": url, "LASSIE_WEIGHTS_DOWNLOAD_TIMEOUT": "2"})
        with pytest.raises(ProvisionError, match=r"the download of http://127\.0\.0\.1:\d+/safety\.tar took longer "
                                                 r"than the 2 s allowed for fetching a weights folder "
                                                 r"\(LASSIE_WEIGHTS_DOWNLOAD_TIMEOUT\)"):
            fetch_missing_folders(WeightsLayout(root), settings, lassie=False)
    assert not (root / "safety").exists()


def test_a_trickling_lassie_lora_host_is_cut_at_the_same_deadline(tmp_path: Path, tiny_weights: Path) -> None:
    with RangeServer(ranges=False) as host:
        url = host.serve("/lora.safetensors", b"x" * 40, trickle=0.5)
        root = tmp_path / "weights"
        root.mkdir()
        for folder in ("flux-dev", "flux-schnell", "safety"):
            os.symlink(tiny_weights / folder, root / folder)
        settings = Settings.from_env({"LASSIE_LORA_URL": url, "LASSIE_WEIGHTS_DOWNLOAD_TIMEOUT": "2"})
        with pytest.raises(ProvisionError, match=r"downloading the Lassie LoRA \(LASSIE_LORA_URL\) failed: the download "
                                                 r"of http://127\.0\.0\.1:\d+/lora\.safetensors took longer than the "
                                                 r"2 s allowed for fetching the Lassie LoRA "
                                                 r"\(LASSIE_WEIGHTS_DOWNLOAD_TIMEOUT\)"):
            provision_from_tars(root, settings)
    assert not (root / "lassie" / "lora.safetensors").exists()


def test_the_weights_deadline_is_a_validated_variable() -> None:
    assert Settings.from_env({}).provision.weights_download_timeout == 3 * 3600
    assert Settings.from_env({"LASSIE_WEIGHTS_DOWNLOAD_TIMEOUT": "600"}).provision.weights_download_timeout == 600
    for wrong in ("0", "soon", "-5"):
        with pytest.raises(SettingError, match="LASSIE_WEIGHTS_DOWNLOAD_TIMEOUT"):
            Settings.from_env({"LASSIE_WEIGHTS_DOWNLOAD_TIMEOUT": wrong})


# --- redirects and secrets ----------------------------------------------------------------------

@pytest.mark.parametrize("options", [FetchOptions(connections=1, use_pget=False), RANGES], ids=["one", "ranges"])
def test_a_weights_redirect_to_ftp_is_refused(tmp_path: Path, options: FetchOptions) -> None:
    with FakeServices() as services:
        url = services.redirect("/weights/safety.tar", f"ftp://127.0.0.1:{services.port}/safety.tar")
        with pytest.raises(DownloadError, match=r"only http\(s\) URLs are fetched; refusing a ftp URL"):
            fetch(url, tmp_path, options)


def test_weights_urls_show_neither_password_nor_query(host: RangeServer, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good = host.serve("/x.tar", make_tar(version(1))).replace("http://", f"http://user:{SECRET}@")
    assert files_in(fetch(f"{good}?sig={SECRET}", tmp_path)) == version(1)
    with pytest.raises(DownloadError) as caught:
        with tar_stream(f"{host.base.replace('http://', f'http://user:{SECRET}@')}/missing.tar?sig={SECRET}",
                        RANGES):
            pass
    assert str(caught.value) == f"could not download {host.base}/missing.tar?…: not found (HTTP 404)"
    assert "x.tar?…" in caplog.text and SECRET not in caplog.text
