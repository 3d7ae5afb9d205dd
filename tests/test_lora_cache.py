"""The LoRA cache end to end against loopback stand-ins for Replicate, CivitAI and Hugging Face."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fake_services import CivitaiFile, FakeServices, services  # noqa: F401 (fixture)
from helpers import make_lora, make_tar
from lassie.fetch.lora_cache import LoraCache
from lassie.fetch.lora_sources import identify
from lassie.request.errors import InputError
from lassie.settings import LoraSettings, Settings
from lassie.weights.layout import WeightsLayout

VERSION = "ab" * 32
CIVITAI_SECRET = "civitai-5ecret-7f3a"
HF_SECRET = "hf_5ecret_91c2"
REPLICATE_SECRET = "r8_5ecret_44d1"




@pytest.fixture
def cache(services: FakeServices, tmp_path: Path) -> LoraCache:
    return LoraCache(services.settings(min_free_bytes=0), tmp_path / "lora-cache")


def reconfigured(cache: LoraCache, **changes: object) -> LoraCache:
    """The same cache directory under changed operator settings (as after a restart)."""
    return LoraCache(replace(cache.settings, **changes), cache.directory)


def cached_names(cache: LoraCache) -> list[str]:
    return sorted(path.name for path in cache.cached_files())


def assert_nothing_left_behind(cache: LoraCache) -> None:
    assert cache.cached_files() == []
    assert list(cache.staging_dir.iterdir()) == []


# --- every source form --------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["alice/pixar", "https://replicate.com/alice/pixar", "replicate.com/alice/pixar"])
def test_replicate_models_come_out_of_their_weights_tar(services: FakeServices, cache: LoraCache, text: str) -> None:
    lora = make_lora(1)
    services.add_replicate_model("alice", "pixar", make_tar({"captions/1.txt": b"a dog", "lora.safetensors": lora}))
    assert cache.fetch(identify(text)).read_bytes() == lora


def test_replicate_versions_use_the_versioned_weights(services: FakeServices, cache: LoraCache) -> None:
    latest, pinned = make_lora(1), make_lora(2)
    services.add_replicate_model("alice", "pixar", make_tar({"lora.safetensors": latest}))
    services.add_replicate_model("alice", "pixar", make_tar({"lora.safetensors": pinned}), version=VERSION)
    assert cache.fetch(identify(f"alice/pixar/{VERSION}")).read_bytes() == pinned
    assert cache.fetch(identify(f"https://replicate.com/alice/pixar/versions/{VERSION}")).read_bytes() == pinned
    assert cache.fetch(identify("alice/pixar")).read_bytes() == latest


def test_replicate_token_is_sent_to_replicate(services: FakeServices, cache: LoraCache) -> None:
    services.add_replicate_model("alice", "private", make_tar({"lora.safetensors": make_lora()}),
                                 token=REPLICATE_SECRET)
    with pytest.raises(InputError, match="set REPLICATE_API_TOKEN"):
        cache.fetch(identify("alice/private"))
    cache = reconfigured(cache, tokens={"REPLICATE_API_TOKEN": REPLICATE_SECRET})
    assert cache.fetch(identify("alice/private")).is_file()


@pytest.mark.parametrize("members", [{"notes.txt": b"x"},
                                     {"a.safetensors": make_lora(1), "b.safetensors": make_lora(2)}])
def test_replicate_tars_without_exactly_one_lora_are_refused(services: FakeServices, cache: LoraCache,
                                                             members: dict[str, bytes]) -> None:
    services.add_replicate_model("alice", "odd", make_tar(members))
    with pytest.raises(InputError, match=r"Replicate model alice/odd holds (no|several) .safetensors"):
        cache.fetch(identify("alice/odd"))
    assert_nothing_left_behind(cache)


@pytest.mark.parametrize("text", ["huggingface.co/bob/flux-style", "https://hf.co/bob/flux-style",
                                  "https://huggingface.co/bob/flux-style/blob/main/style.safetensors",
                                  "huggingface.co/bob/flux-style/resolve/main/style.safetensors?download=true"])
def test_hugging_face_repos_are_fetched_through_the_configured_endpoint(services: FakeServices, cache: LoraCache,
                                                                         text: str) -> None:
    lora = make_lora(5)
    services.add_hf_repo("bob/flux-style", {"style.safetensors": lora, "README.md": b"# style", "x.png": b"png"})
    assert cache.fetch(identify(text)).read_bytes() == lora
    assert services.count("/hf/bob/flux-style/resolve/main/style.safetensors") == 1


def test_a_hugging_face_repo_with_several_loras_needs_a_file_name(services: FakeServices, cache: LoraCache) -> None:
    first, second = make_lora(1), make_lora(2)
    services.add_hf_repo("bob/pack", {"v1/a.safetensors": first, "b.safetensors": second})
    with pytest.raises(InputError) as caught:
        cache.fetch(identify("huggingface.co/bob/pack"))
    assert "holds several .safetensors files (b.safetensors, v1/a.safetensors); name one" in str(caught.value)
    assert cache.fetch(identify("huggingface.co/bob/pack/v1/a.safetensors")).read_bytes() == first
    assert cache.fetch(identify("https://huggingface.co/bob/pack/blob/main/b.safetensors")).read_bytes() == second


@pytest.mark.parametrize(("text", "problem"), [
    ("huggingface.co/bob/pack/missing.safetensors", "no such file; its .safetensors files are: a.safetensors"),
    ("huggingface.co/bob/nothing-here", "not found (if it is private, set HF_TOKEN)"),
    ("huggingface.co/bob/docs", "holds no .safetensors file"),
])
def test_hugging_face_problems_are_explained(services: FakeServices, cache: LoraCache, text: str,
                                             problem: str) -> None:
    services.add_hf_repo("bob/pack", {"a.safetensors": make_lora()})
    services.add_hf_repo("bob/docs", {"README.md": b"# nothing"})
    with pytest.raises(InputError, match=r"^extra_lora: ") as caught:
        cache.fetch(identify(text))
    assert problem in str(caught.value)
    assert_nothing_left_behind(cache)


def test_announced_sizes_over_the_cap_are_refused_before_downloading(services: FakeServices, cache: LoraCache) -> None:
    cache = reconfigured(cache, max_download_bytes=500)
    services.add_hf_repo("bob/big", {"big.safetensors": make_lora()})
    civitai_model(services)
    with pytest.raises(InputError, match=r"bob/big .*: big.safetensors is 752 bytes, more than the 500 bytes allowed"):
        cache.fetch(identify("huggingface.co/bob/big"))
    with pytest.raises(InputError, match="CivitAI model 101 is 752 bytes, more than the 500 bytes allowed"):
        cache.fetch(identify("civitai.com/models/101"))
    assert services.count("/hf/bob/big/resolve/main/big.safetensors") == 0
    assert services.count("/civitai/api/download/models/12") == 0
    assert_nothing_left_behind(cache)


def test_private_hugging_face_repos_use_hf_token_and_never_show_it(services: FakeServices, cache: LoraCache,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    lora = make_lora(6)
    services.add_hf_repo("bob/private", {"lora.safetensors": lora}, token=HF_SECRET)
    with pytest.raises(InputError, match="set HF_TOKEN"):
        cache.fetch(identify("huggingface.co/bob/private"))
    cache = reconfigured(cache, tokens={"HF_TOKEN": "hf_wrong_token_0000"})
    with pytest.raises(InputError, match="HF_TOKEN has no access"):
        cache.fetch(identify("huggingface.co/bob/private"))
    cache = reconfigured(cache, tokens={"HF_TOKEN": HF_SECRET})
    assert cache.fetch(identify("huggingface.co/bob/private")).read_bytes() == lora
    assert f"Bearer {HF_SECRET}" in services.authorizations("/hf/bob/private/resolve/main/lora.safetensors")
    assert HF_SECRET not in caplog.text and "hf_wrong_token_0000" not in caplog.text


def civitai_model(services: FakeServices, token: str | None = None, kind: str = "LORA") -> dict[str, bytes]:
    """Model 101: version 12 (newest; a pickle listed first, its SafeTensor second) and version 11."""
    loras = {"v12": make_lora(12), "v11": make_lora(11)}
    services.add_civitai_model(101, {
        12: [CivitaiFile("old.pt", b"\x80\x04" + bytes(64), "PickleTensor", primary=True),
             CivitaiFile("style.safetensors", loras["v12"])],
        11: [CivitaiFile("style.safetensors", loras["v11"], primary=True)],
    }, token=token, kind=kind)
    return loras


@pytest.mark.parametrize(("text", "version"), [
    ("https://civitai.com/models/101", "v12"),
    ("https://civitai.com/models/101/pixar-style", "v12"),
    ("civitai.com/models/101/pixar-style?modelVersionId=11", "v11"),
    ("https://civitai.com/api/download/models/11", "v11"),
])
def test_civitai_pages_are_resolved_to_a_version_and_its_safetensors(services: FakeServices, cache: LoraCache,
                                                                     text: str, version: str) -> None:
    loras = civitai_model(services)
    assert cache.fetch(identify(text)).read_bytes() == loras[version]
    assert services.count("/civitai/api/download/models/101") == 0, "a model id is not a download id"


def test_civitai_version_ids_are_checked_against_the_model(services: FakeServices, cache: LoraCache) -> None:
    civitai_model(services)
    with pytest.raises(InputError, match="CivitAI model 101 version 99 not found; that model's versions are: 12, 11"):
        cache.fetch(identify("civitai.com/models/101?modelVersionId=99"))


def test_civitai_versions_without_safetensors_are_refused(services: FakeServices, cache: LoraCache) -> None:
    services.add_civitai_model(102, {20: [CivitaiFile("model.pt", b"\x80\x04" + bytes(64), "PickleTensor")]})
    with pytest.raises(InputError, match=r"has no SafeTensor file \(files: model.pt \(PickleTensor\)\)"):
        cache.fetch(identify("civitai.com/models/102"))


def test_a_civitai_file_listing_with_odd_metadata_is_still_a_clear_refusal(services: FakeServices,
                                                                             cache: LoraCache) -> None:
    """The API's answer is not ours: metadata that is not an object reads as no format, in the list too."""
    services.add_civitai_model(103, {30: [CivitaiFile("model.pt", b"\x80\x04" + bytes(64), "PickleTensor")]})
    document = {"id": 103, "name": "model 103", "type": "LORA", "modelVersions": [
        {"id": 30, "files": [{"name": "model.pt", "metadata": "PickleTensor", "downloadUrl": "https://civitai.com/x"}]}]}
    services.serve("/civitai/api/v1/models/103", json.dumps(document).encode(),
                   headers={"Content-Type": "application/json"})
    with pytest.raises(InputError, match=r"has no SafeTensor file \(files: model.pt \(None\)\)"):
        cache.fetch(identify("civitai.com/models/103"))


def test_civitai_models_that_are_not_loras_are_refused(services: FakeServices, cache: LoraCache) -> None:
    civitai_model(services, kind="Checkpoint")
    with pytest.raises(InputError, match="CivitAI model 101 is a Checkpoint, not a LoRA"):
        cache.fetch(identify("civitai.com/models/101"))


def test_civitai_tokens_are_required_sent_and_never_shown(services: FakeServices, cache: LoraCache,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    loras = civitai_model(services, token=CIVITAI_SECRET)
    with pytest.raises(InputError, match="needs a token \\(HTTP 401\\): set CIVITAI_API_TOKEN"):
        cache.fetch(identify("civitai.com/models/101"))
    cache = reconfigured(cache, tokens={"CIVITAI_API_TOKEN": "wrong-civitai-token"})
    with pytest.raises(InputError) as caught:
        cache.fetch(identify("civitai.com/models/101"))
    assert "refused the token in CIVITAI_API_TOKEN" in str(caught.value)
    cache = reconfigured(cache, tokens={"CIVITAI_API_TOKEN": CIVITAI_SECRET})
    assert cache.fetch(identify("civitai.com/models/101")).read_bytes() == loras["v12"]
    assert cache.fetch(identify("civitai.com/api/download/models/11")).read_bytes() == loras["v11"]
    assert services.authorizations("/civitai/api/download/models/11") == [f"Bearer {CIVITAI_SECRET}"]
    assert CIVITAI_SECRET not in caplog.text and "wrong-civitai-token" not in caplog.text
    assert "wrong-civitai-token" not in str(caught.value)


def test_civitai_token_stays_behind_when_the_download_redirects_to_a_cdn(
        services: FakeServices, cache: LoraCache,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cache = reconfigured(cache, tokens={"CIVITAI_API_TOKEN": CIVITAI_SECRET})
    lora = make_lora(9)
    services.serve("/cdn/file.safetensors", lora)
    services.redirect("/civitai/api/download/models/77",
                      f"http://localhost:{services.port}/cdn/file.safetensors?X-Amz-Signature=sig-{CIVITAI_SECRET}",
                      token=CIVITAI_SECRET)
    assert cache.fetch(identify("civitai.com/api/download/models/77")).read_bytes() == lora
    assert services.authorizations("/cdn/file.safetensors") == [None]
    assert CIVITAI_SECRET not in caplog.text


def test_plain_urls_with_signed_queries_are_fetched(services: FakeServices, cache: LoraCache,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    lora = make_lora(3)
    services.serve("/files/lora.safetensors", lora)
    url = f"{services.base}/files/lora.safetensors?X-Amz-Signature=s3cr3t-signature"
    assert cache.fetch(identify(url)).read_bytes() == lora
    assert "s3cr3t-signature" not in caplog.text


# --- what never gets into the cache -------------------------------------------------------------

@pytest.mark.parametrize(("route", "problem"), [
    ({"body": b"\x80\x04\x95" + bytes(200)}, "Python pickle"),
    ({"body": b"<!DOCTYPE html><html>Please log in</html>"}, "HTML"),
    ({"body": make_lora()[:-40]}, "truncated"),
    ({"body": make_lora(), "declared_length": 1500}, "cut short"),
    ({"body": (2**40).to_bytes(8, "little") + b"{" + bytes(100)}, "header length is impossible"),
    ({"body": bytes(1000)}, "does not start with a safetensors header"),
    ({"body": b"x" * 3000}, "larger than the 2.0 KiB allowed"),
    ({"body": b"x" * 3000, "send_length": False}, "larger than the 2.0 KiB allowed"),
    ({"body": b"gone", "status": 410}, "HTTP 410"),
])
def test_bad_payloads_are_refused_and_leave_nothing_behind(services: FakeServices, cache: LoraCache,
                                                           route: dict,
                                                           problem: str) -> None:
    cache = reconfigured(cache, max_download_bytes=2048)
    url = services.serve("/files/bad.safetensors", **route)
    with pytest.raises(InputError, match=r"^extra_lora: ") as caught:
        cache.fetch(identify(url))
    assert problem in str(caught.value)
    assert_nothing_left_behind(cache)
    services.serve("/files/bad.safetensors", make_lora())
    assert cache.fetch(identify(url)).read_bytes() == make_lora()


def test_refused_addresses_reach_nothing_and_cache_nothing(services: FakeServices, cache: LoraCache) -> None:
    cache = reconfigured(cache, allow_all_addresses=False)
    services.serve("/files/lora.safetensors", make_lora())
    for host in ("127.0.0.1", "localhost", "[::1]", "2130706433"):
        with pytest.raises(InputError, match="loopback address"):
            cache.fetch(identify(f"http://{host}:{services.port}/files/lora.safetensors"))
    assert services.seen == []
    assert_nothing_left_behind(cache)


# --- reuse, damage, concurrency, eviction -------------------------------------------------------

def test_the_same_lora_is_downloaded_once(services: FakeServices, cache: LoraCache) -> None:
    url = services.serve("/files/lora.safetensors", make_lora())
    first = cache.fetch(identify(url))
    assert cache.fetch(identify(url)) == first
    assert LoraCache(cache.settings, cache.directory).fetch(identify(url)) == first
    assert services.count("/files/lora.safetensors") == 1


def test_a_corrupted_cached_file_is_fetched_again(services: FakeServices, cache: LoraCache) -> None:
    lora = make_lora(2)
    url = services.serve("/files/lora.safetensors", lora)
    path = cache.fetch(identify(url))
    damaged = bytearray(lora)
    damaged[-3] ^= 0xFF  # same size, valid header: only the checksum can tell
    path.write_bytes(bytes(damaged))
    assert LoraCache(cache.settings, cache.directory).fetch(identify(url)).read_bytes() == lora
    assert services.count("/files/lora.safetensors") == 2


@pytest.mark.parametrize("damage", ["truncate", "lose_record", "garble_record"])
def test_damaged_entries_are_noticed_by_a_running_cache(services: FakeServices, cache: LoraCache, damage: str) -> None:
    lora = make_lora(4)
    url = services.serve("/files/lora.safetensors", lora)
    path = cache.fetch(identify(url))
    record = path.with_suffix(".json")
    if damage == "truncate":
        path.write_bytes(lora[: len(lora) // 2])
    elif damage == "lose_record":
        record.unlink()
    else:
        record.write_text("{not json")
    assert cache.fetch(identify(url)).read_bytes() == lora
    assert services.count("/files/lora.safetensors") == 2


def test_two_concurrent_requests_download_once(services: FakeServices, cache: LoraCache) -> None:
    url = services.serve("/files/slow.safetensors", make_lora(8), delay=0.3)
    start = threading.Barrier(2)
    results: list[Path] = []

    def fetch() -> None:
        start.wait()
        results.append(cache.fetch(identify(url)))

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(results) == 2 and results[0] == results[1]
    assert services.count("/files/slow.safetensors") == 1


def test_a_fetch_that_waits_on_another_fetch_of_the_same_lora_says_so_once(services: FakeServices, cache: LoraCache,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    url = services.serve("/files/slow.safetensors", make_lora(8), delay=1.0)
    results: list[Path] = []
    first = threading.Thread(target=lambda: results.append(cache.fetch(identify(url))))
    first.start()
    for _ in range(500):  # until the first fetch holds the lock and its download has begun
        if services.count("/files/slow.safetensors"):
            break
        time.sleep(0.01)
    with caplog.at_level(logging.INFO, logger="lassie"):
        results.append(cache.fetch(identify(url)))
    first.join(timeout=10)
    waits = [record for record in caplog.records if "waiting for another fetch" in record.getMessage()]
    assert [record.levelno for record in waits] == [logging.INFO]
    assert "waiting for another fetch of http://127.0.0.1" in waits[0].getMessage()
    assert len(results) == 2 and results[0] == results[1]
    assert services.count("/files/slow.safetensors") == 1


def test_least_recently_used_loras_are_evicted_first(services: FakeServices, tmp_path: Path) -> None:
    size = len(make_lora())
    cache = LoraCache(services.settings(cache_bytes=int(2.5 * size), min_free_bytes=0), tmp_path / "c")
    urls = {name: services.serve(f"/files/{name}.safetensors", make_lora(index)) for index, name in
            enumerate(("a", "b", "c"))}
    path_a, path_b = cache.fetch(identify(urls["a"])), cache.fetch(identify(urls["b"]))
    time.sleep(0.01)
    cache.fetch(identify(urls["a"]))
    path_c = cache.fetch(identify(urls["c"]))
    assert cached_names(cache) == sorted([path_a.name, path_c.name])
    assert not path_b.exists() and not path_b.with_suffix(".json").exists()


def test_eviction_keeps_free_disk_but_never_drops_the_lora_just_fetched(services: FakeServices,
                                                                         tmp_path: Path) -> None:
    cache = LoraCache(services.settings(min_free_bytes=10**18), tmp_path / "c")
    first = cache.fetch(identify(services.serve("/files/a.safetensors", make_lora(1))))
    second = cache.fetch(identify(services.serve("/files/b.safetensors", make_lora(2))))
    assert cache.cached_files() == [second]
    assert not first.exists()


def test_a_held_lora_is_not_evicted_until_its_hold_is_released(services: FakeServices, tmp_path: Path) -> None:
    cache = LoraCache(services.settings(min_free_bytes=10**18), tmp_path / "c")  # evicts all it may
    held = cache.hold(identify(services.serve("/files/a.safetensors", make_lora(1))))
    sharing = LoraCache(cache.settings, cache.directory)  # as another process sharing the directory
    second = sharing.fetch(identify(services.serve("/files/b.safetensors", make_lora(2))))
    assert held.path.read_bytes() == make_lora(1)
    assert sorted(cache.cached_files()) == sorted([held.path, second])
    held.release()
    held.release()
    third = cache.fetch(identify(services.serve("/files/c.safetensors", make_lora(3))))
    assert cache.cached_files() == [third]


def test_a_refused_lora_that_another_request_holds_stays_for_it(services: FakeServices, cache: LoraCache) -> None:
    lora = identify(services.serve("/files/lora.safetensors", make_lora()))
    first, second = cache.hold(lora), cache.hold(lora)
    cache.forget(first)
    assert second.path.read_bytes() == make_lora()
    cache.forget(second)
    assert cache.cached_files() == []
    assert services.count("/files/lora.safetensors") == 1


def test_the_size_budget_comes_from_the_environment(services: FakeServices, tmp_path: Path) -> None:
    settings = Settings.from_env({**services.env(), "LASSIE_LORA_CACHE_BYTES": "1",
                                  "LASSIE_LORA_CACHE_MIN_FREE_BYTES": "0"}).lora
    cache = LoraCache(settings, tmp_path / "c")
    cache.fetch(identify(services.serve("/files/a.safetensors", make_lora(1))))
    second = cache.fetch(identify(services.serve("/files/b.safetensors", make_lora(2))))
    assert cache.max_bytes == 1 and cache.cached_files() == [second]


def test_stale_staging_leftovers_are_cleared_on_start(tmp_path: Path) -> None:
    stale = tmp_path / "c" / ".partial" / "old-download"
    fresh = tmp_path / "c" / ".partial" / "running-download"
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
        (folder / "lora.safetensors").write_bytes(b"partial")
    a_day_ago = time.time() - 86400
    os.utime(stale, (a_day_ago, a_day_ago))
    LoraCache(LoraSettings(), tmp_path / "c")
    assert not stale.exists() and fresh.exists()


def test_cache_directory_defaults_beside_the_weights(tmp_path: Path) -> None:
    layout = WeightsLayout(tmp_path / "weights")
    assert LoraCache(Settings.from_env({}).lora, layout.lora_cache_dir).directory == tmp_path / "weights" / "lora-cache"
    elsewhere = Settings.from_env({"LASSIE_LORA_CACHE": str(tmp_path / "elsewhere")}).lora
    assert LoraCache(elsewhere, layout.lora_cache_dir).directory == tmp_path / "elsewhere"


def test_bad_strings_fail_before_any_request(services: FakeServices, cache: LoraCache) -> None:
    with pytest.raises(InputError, match="Accepted forms"):
        cache.fetch(identify("not a lora"))
    assert services.seen == []
