"""Operator settings: read once, one yes/no vocabulary, a bad value names its variable and what it accepts."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from lassie.settings import GIB, SettingError, Settings


def test_nothing_set_gives_the_documented_defaults():
    settings = Settings.from_env({})
    assert settings.weights_dir == Path("weights") and settings.go_fast_mode == "auto"
    assert (settings.compile.requested, settings.compile.mode, settings.compile.backend) == (None, "default", "inductor")
    assert settings.compile.cache_dir is None and settings.slot_ranks is None
    lora = settings.lora
    assert (lora.cache_bytes, lora.min_free_bytes, lora.max_download_bytes) == (20 * GIB, 5 * GIB, 2 * GIB)
    assert (lora.allow_all_addresses, lora.allowed_networks, dict(lora.tokens)) == (False, (), {})
    assert (lora.replicate_url, lora.civitai_url, lora.hf_endpoint) == (
        "https://replicate.com", "https://civitai.com", "https://huggingface.co")
    assert settings.provision.offline is False and settings.provision.lora_url is None
    speed = settings.speed  # the fewest warm-up graphs and code paths
    assert (speed.merge_lassie, speed.adapters_when_needed, speed.prompt_cache, speed.attention_backend) == (
        False, False, False, "native")


def test_the_speed_switches_are_read_once_here():
    speed = Settings.from_env({"LASSIE_MERGE_LASSIE": "1", "LASSIE_ADAPTERS_WHEN_NEEDED": "yes",
                               "LASSIE_PROMPT_CACHE": "on", "LASSIE_ATTENTION_BACKEND": " AUTO "}).speed
    assert (speed.merge_lassie, speed.adapters_when_needed, speed.prompt_cache, speed.attention_backend) == (
        True, True, True, "auto")
    with pytest.raises(SettingError, match="LASSIE_MERGE_LASSIE must be one of"):
        Settings.from_env({"LASSIE_MERGE_LASSIE": "sometimes"})
    with pytest.raises(SettingError, match="LASSIE_ATTENTION_BACKEND must be auto or a diffusers attention backend"):
        Settings.from_env({"LASSIE_ATTENTION_BACKEND": "flash attn"})


@pytest.mark.parametrize("word, expected", [("1", True), ("TRUE", True), (" yes ", True), ("on", True),
                                            ("0", False), ("false", False), ("No", False), ("off", False)])
def test_every_switch_speaks_the_same_yes_no_words(word, expected):
    settings = Settings.from_env({"HF_HUB_OFFLINE": word, "LASSIE_COMPILE": word, "LASSIE_ALLOW_PRIVATE_URLS": word})
    assert settings.provision.offline is expected
    assert settings.compile.requested is expected
    assert settings.lora.allow_all_addresses is expected


@pytest.mark.parametrize("variable, value, accepted", [
    ("LASSIE_GO_FAST_MODE", "bogus", "one of auto, fp8, fp8-weight-only, unquantized"),
    ("LASSIE_COMPILE", "maybe", "one of 1, true, yes, on, 0, false, no, off, default, max-autotune"),
    ("HF_HUB_OFFLINE", "2", "one of 1, true, yes, on, 0, false, no, off"),
    ("LASSIE_LORA_SLOT_RANK", "-8", "0 (no slot), a rank, or comma-separated ranks such as 32,128"),
    ("LASSIE_LORA_SLOT_RANK", "0,32", "0 (no slot), a rank, or comma-separated ranks such as 32,128"),
    ("LASSIE_LORA_CACHE_BYTES", "20G", "a number of bytes of at least 0"),
    ("LASSIE_MAX_LORA_BYTES", "0", "a number of bytes of at least 1"),
    ("LASSIE_ALLOW_PRIVATE_URLS", "10.0.0.0/33", "1 or a comma-separated list of addresses/networks"),
    ("LASSIE_REPLICATE_URL", "ftp://mirror", "an http(s) address such as https://replicate.com"),
    ("HF_ENDPOINT", "huggingface.co", "an http(s) address such as https://huggingface.co"),
])
def test_a_bad_value_names_the_variable_what_it_accepts_and_what_it_got(variable, value, accepted):
    with pytest.raises(SettingError) as error:
        Settings.from_env({variable: value})
    assert str(error.value).startswith(f"{variable} must be {accepted}")
    assert str(error.value).endswith(f"got {value!r}") and error.value.variable == variable


def test_values_are_parsed_into_what_their_users_need():
    settings = Settings.from_env({
        "LASSIE_WEIGHTS_DIR": "/srv/weights", "LASSIE_COMPILE": "max-autotune", "LASSIE_COMPILE_BACKEND": "aot_eager",
        "LASSIE_COMPILE_CACHE": "/srv/cache", "LASSIE_LORA_SLOT_RANK": "128,16", "LASSIE_ALLOW_PRIVATE_URLS": "10.0.0.5, fd00::/8",
        "LASSIE_CIVITAI_URL": "http://127.0.0.1:9000/", "HF_TOKEN": " hf_secret ", "CIVITAI_API_TOKEN": ""})
    assert settings.weights_dir == Path("/srv/weights")
    assert (settings.compile.requested, settings.compile.mode, settings.compile.backend) == (True, "max-autotune",
                                                                                              "aot_eager")
    assert settings.compile.cache_dir == Path("/srv/cache") and settings.slot_ranks == (16, 128)
    assert settings.lora.allowed_networks == (ipaddress.ip_network("10.0.0.5"), ipaddress.ip_network("fd00::/8"))
    assert settings.lora.civitai_url == "http://127.0.0.1:9000"  # no trailing slash: paths are appended
    assert dict(settings.lora.tokens) == {"HF_TOKEN": "hf_secret"}  # an empty token is no token


def test_torch_s_own_inductor_cache_variable_wins_over_lassie_s():
    both = {"TORCHINDUCTOR_CACHE_DIR": "/a", "LASSIE_COMPILE_CACHE": "/b"}
    assert Settings.from_env(both).compile.cache_dir == Path("/a")


def test_tokens_never_show_in_the_settings_repr():
    assert "hf_secret" not in repr(Settings.from_env({"HF_TOKEN": "hf_secret"}))
