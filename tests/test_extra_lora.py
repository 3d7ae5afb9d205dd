"""extra_lora through the predictor: every source form, failures that leave no trace, no bleed."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save

import lora_formats as forms
from conftest import settings_for
from fake_services import CivitaiFile, FakeServices, services  # noqa: F401 (fixture)
from helpers import make_tar, running_adapters, tiny_lora
from lassie.fetch import lora_cache, lora_sources
from lassie.fetch.lora_cache import LoraCache
from lassie.fetch.lora_sources import identify
from lassie.predictor import Lassie
from lassie.request.errors import InputError
from lassie.request.plan import Request
from lassie.settings import LoraSettings

BASE = {"prompt": "a photo of LSSIE", "num_inference_steps": 1, "megapixels": "0.25", "seed": 5,
        "output_format": "png"}


def image_of(predictor: Lassie, **fields) -> np.ndarray:
    (path,) = predictor.predict(Request(**{**BASE, **fields}))
    return decoded(path)


def decoded(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def use_settings(predictor, monkeypatch):
    """Gives the session predictor, set up once, the LoRA settings of one test (as a restart would)."""
    def use(settings: LoraSettings) -> None:
        monkeypatch.setattr(predictor, "lora_cache", LoraCache(settings, predictor.lora_cache.directory))
    return use


@pytest.fixture
def sources(services: FakeServices, use_settings) -> dict[str, str]:
    """One LoRA per source form, served by the loopback stand-ins."""
    use_settings(services.settings())
    lora = tiny_lora(21)
    services.add_replicate_model("acme", "lassie-hat", make_tar({"output/lora.safetensors": lora}))
    services.add_replicate_model("acme", "lassie-hat", make_tar({"lora.safetensors": lora}), version="ab" * 32)
    services.add_hf_repo("acme/flux-hat", {"hat.safetensors": lora, "README.md": b"hi"})
    services.add_civitai_model(77, {701: [CivitaiFile("hat.safetensors", lora)]})
    return {
        "url": services.serve("/files/hat.safetensors?sig=abc", lora),
        "replicate": "acme/lassie-hat",
        "replicate version": f"acme/lassie-hat/{'ab' * 32}",
        "replicate url": "https://replicate.com/acme/lassie-hat",
        "hugging face": "huggingface.co/acme/flux-hat",
        "hugging face file": "https://huggingface.co/acme/flux-hat/resolve/main/hat.safetensors",
        "civitai page": "https://civitai.com/models/77/lassie-hat",
        "civitai download": "https://civitai.com/api/download/models/701",
    }


@pytest.mark.parametrize("form", ["url", "replicate", "replicate version", "replicate url", "hugging face",
                                  "hugging face file", "civitai page", "civitai download"])
def test_every_source_form_changes_the_image_and_scale_zero_does_not(predictor, sources, form):
    without = image_of(predictor)
    assert not np.array_equal(image_of(predictor, extra_lora=sources[form]), without)
    assert np.array_equal(image_of(predictor, extra_lora=sources[form], extra_lora_scale=0), without)


def test_repeating_an_extra_lora_neither_downloads_nor_reloads_it(predictor, services, caplog):
    url = services.serve("/again/lora.safetensors", tiny_lora(22))
    image_of(predictor, extra_lora=url)
    with caplog.at_level(logging.INFO, logger="lassie"):
        image_of(predictor, extra_lora=url, extra_lora_scale=0.5)
    assert services.count("/again/lora.safetensors") == 1
    assert "loaded into" not in caplog.text


def test_a_request_without_extra_lora_runs_no_extra_adapter(predictor, services):
    image_of(predictor, extra_lora=services.serve("/gone/lora.safetensors", tiny_lora(23)))
    image_of(predictor)
    transformer = predictor.models.transformers["dev"]
    assert running_adapters(transformer) == {"lassie"}  # the Lassie LoRA's own adapter, no extra


@pytest.mark.parametrize(("payload", "message"), [
    (b"\x80\x04\x95" + b"\x00" * 64, "extra_lora"),
    (tiny_lora(24)[:-100], "extra_lora"),
    (save(forms.sd15_kohya_lora()), "extra_lora"),
])
def test_bad_payloads_fail_clearly_and_leave_the_model_as_it_was(predictor, services, payload, message):
    before = {k: v.clone() for k, v in predictor.models.transformers["dev"].state_dict().items()}
    without = image_of(predictor)
    with pytest.raises(InputError, match=f"^{message}: "):
        image_of(predictor, extra_lora=services.serve("/bad/lora.safetensors", payload))
    after = predictor.models.transformers["dev"].state_dict()
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert np.array_equal(image_of(predictor), without)


def test_private_addresses_are_refused_without_the_opt_in(predictor, use_settings):
    use_settings(LoraSettings())
    for url in ("http://127.0.0.1:9/x.safetensors", "http://localhost:9/x.safetensors",
                "http://[::1]:9/x.safetensors", "http://2130706433/x.safetensors", "file:///etc/passwd"):
        with pytest.raises(InputError, match=r"^extra_lora: "):
            image_of(predictor, extra_lora=url)
    image_of(predictor)


def test_tokens_never_reach_logs_or_errors(predictor, services, use_settings, caplog):
    secrets = {"CIVITAI_API_TOKEN": "civ-s3cret-91", "HF_TOKEN": "hf_s3cret_92", "REPLICATE_API_TOKEN": "r8_s3cret_93"}
    use_settings(services.settings(tokens=secrets))
    services.add_civitai_model(78, {801: [CivitaiFile("t.safetensors", tiny_lora(25))]}, token=secrets["CIVITAI_API_TOKEN"])
    errors = []
    with caplog.at_level(logging.DEBUG):
        image_of(predictor, extra_lora="civitai.com/models/78")
        for bad in ("huggingface.co/acme/missing", "acme/missing-model", "civitai.com/models/404",
                    services.serve("/t/x.safetensors?token=hf_s3cret_92", b"nope")):
            with pytest.raises(InputError) as error:
                image_of(predictor, extra_lora=bad)
            errors.append(str(error.value))
    text = caplog.text + "\n".join(errors)
    assert all(secret not in text for secret in secrets.values())


def test_no_bleed_across_a_random_sequence_of_requests(predictor, tiny_weights, services, tmp_path, monkeypatch):
    """Each result equals a freshly set-up predictor's result for that request alone."""
    loras = {name: services.serve(f"/mix/{name}.safetensors", tiny_lora(seed, only))
             for name, seed, only in (("a", 31, ()), ("b", 32, ("attn.",)), ("c", 33, ("proj_mlp", "proj_out")))}
    loras["broken"] = services.serve("/mix/broken.safetensors", b"{not a safetensors file")
    loras["foreign"] = services.serve("/mix/foreign.safetensors", save({"x.lora_A.weight": __import__("torch").ones(2, 3)}))
    rng = random.Random(20261125)
    requests = [dict(model=rng.choice(["dev", "schnell"]), lora_scale=rng.choice([0, 0.5, 1, -1]),
                     go_fast=rng.random() < 0.3, seed=rng.randrange(3),
                     **({"extra_lora": loras[rng.choice(list(loras))], "extra_lora_scale": rng.choice([0.3, 1, 2])}
                        if rng.random() < 0.7 else {}))
                for _ in range(32)]
    assert {r.get("extra_lora") for r in requests} >= set(loras.values()) | {None}

    monkeypatch.setenv("LASSIE_LORA_CACHE", str(tmp_path / "fresh-cache"))
    fresh_results: dict[tuple, object] = {}

    def outcome(lassie: Lassie, fields: dict) -> object:
        try:
            return image_of(lassie, **fields).tobytes()
        except InputError as error:
            return f"error in {error.field}"

    for fields in requests:
        key = tuple(sorted(fields.items()))
        if key not in fresh_results:
            fresh = Lassie(settings_for(tiny_weights))
            fresh.setup()
            fresh_results[key] = outcome(fresh, fields)
        assert outcome(predictor, fields) == fresh_results[key], fields
    assert any(isinstance(result, str) for result in fresh_results.values())


@pytest.fixture
def evicting_cache(predictor, services, tmp_path, monkeypatch) -> LoraCache:
    """A cache of its own for the session predictor that evicts every LoRA it may after each fetch."""
    cache = LoraCache(services.settings(min_free_bytes=10**18), tmp_path / "evicting-cache")
    monkeypatch.setattr(predictor, "lora_cache", cache)
    return cache


def cached_keys(cache: LoraCache) -> list[str]:
    return [path.stem for path in cache.cached_files()]


def test_the_extra_lora_string_is_parsed_once_per_request(predictor, services, monkeypatch):
    """Also when its LoRA is refused on the GPU and leaves the cache: that uses the request's key."""
    parsed, parse = [], lora_sources.parse_extra_lora

    def counting(text: str):
        parsed.append(text)
        return parse(text)

    monkeypatch.setattr(lora_sources, "parse_extra_lora", counting)
    monkeypatch.setattr(lora_cache, "parse_extra_lora", counting, raising=False)
    url = services.serve("/once/sd15.safetensors", save(forms.sd15_kohya_lora()))
    with pytest.raises(InputError, match=r"^extra_lora: "):
        image_of(predictor, extra_lora=url)
    assert parsed == [url]
    assert identify(url).key not in cached_keys(predictor.lora_cache)


def test_an_extra_lora_s_adapter_is_named_by_its_cache_key(predictor, services):
    url = services.serve("/by-key/lora.safetensors", tiny_lora(26))
    image_of(predictor, extra_lora=url)
    key = identify(url).key
    assert key in cached_keys(predictor.lora_cache)
    assert predictor.variants.adapters.names() == ["lassie", key]
    assert running_adapters(predictor.models.transformers["dev"]) == {"lassie", key}


def test_a_lora_evicted_between_prepare_and_the_gpu_is_used_without_a_second_fetch(predictor, services,
                                                                                    evicting_cache):
    lora = tiny_lora(27)
    expected = image_of(predictor, extra_lora=services.serve("/held/reference.safetensors", lora))
    url = services.serve("/held/lora.safetensors", lora)
    other_url = services.serve("/held/other.safetensors", tiny_lora(28))
    first = predictor.prepare(Request(**BASE, extra_lora=url))
    other = predictor.prepare(Request(**BASE, extra_lora=other_url))  # its fetch evicts all nobody holds
    assert sorted(cached_keys(evicting_cache)) == sorted([identify(url).key, identify(other_url).key])
    (path,) = predictor.predict_prepared(first)
    assert np.array_equal(decoded(path), expected)
    assert services.count("/held/lora.safetensors") == 1
    first.release()
    other.release()


def test_a_request_releases_its_extra_lora_when_it_ends_done_or_failed(predictor, services, evicting_cache,
                                                                       monkeypatch):
    prepared, prepare = [], predictor.prepare
    monkeypatch.setattr(predictor, "prepare", lambda request: prepared.append(prepare(request)) or prepared[-1])
    done = services.serve("/released/done.safetensors", tiny_lora(29))
    image_of(predictor, extra_lora=done)
    failed = services.serve("/released/failed.safetensors", tiny_lora(30))
    with monkeypatch.context() as patch:
        patch.setattr(predictor.variants, "run", lambda variant, call: (_ for _ in ()).throw(RuntimeError("GPU fault")))
        with pytest.raises(RuntimeError, match="GPU fault"):
            image_of(predictor, extra_lora=failed)
    assert cached_keys(evicting_cache) == [identify(failed).key]  # the failed request's LoRA, unheld now
    last = services.serve("/released/last.safetensors", tiny_lora(31))
    image_of(predictor, extra_lora=last)
    assert len(prepared) == 3  # each kept alive here: only an explicit release lets eviction take its file
    assert cached_keys(evicting_cache) == [identify(last).key]
