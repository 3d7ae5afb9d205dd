"""`extra_lora` strings -> sources: every pasted form people use, and clear refusals for the rest."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lassie.fetch.lora_sources import (
    CivitaiModelSource,
    CivitaiVersionSource,
    HuggingFaceSource,
    ReplicateSource,
    UrlSource,
    identify,
    parse_extra_lora,
)
from lassie.request.errors import InputError
from lassie.settings import Settings

VERSION = "5a8b6a7c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809123"


@pytest.mark.parametrize(("text", "expected"), [
    ("fofr/flux-pixar-cars", ReplicateSource("fofr", "flux-pixar-cars")),
    ("  fofr/flux-pixar-cars \n", ReplicateSource("fofr", "flux-pixar-cars")),
    (f"fofr/flux-pixar-cars/{VERSION}", ReplicateSource("fofr", "flux-pixar-cars", VERSION)),
    (f"fofr/flux-pixar-cars/{VERSION.upper()}", ReplicateSource("fofr", "flux-pixar-cars", VERSION)),
    ("https://replicate.com/fofr/flux-pixar-cars", ReplicateSource("fofr", "flux-pixar-cars")),
    ("replicate.com/fofr/flux_pixar.cars", ReplicateSource("fofr", "flux_pixar.cars")),
    ("https://www.replicate.com/fofr/flux-pixar-cars/", ReplicateSource("fofr", "flux-pixar-cars")),
    (f"https://replicate.com/fofr/flux-pixar-cars/versions/{VERSION}",
     ReplicateSource("fofr", "flux-pixar-cars", VERSION)),
    ("https://replicate.com/fofr/flux-pixar-cars/_weights", ReplicateSource("fofr", "flux-pixar-cars")),
    ("huggingface.co/alice/flux-lora", HuggingFaceSource("alice/flux-lora")),
    ("https://huggingface.co/alice/flux-lora", HuggingFaceSource("alice/flux-lora")),
    ("https://www.huggingface.co/alice/flux-lora", HuggingFaceSource("alice/flux-lora")),
    ("hf.co/alice/flux-lora", HuggingFaceSource("alice/flux-lora")),
    ("huggingface.co/alice/flux-lora/lora.safetensors",
     HuggingFaceSource("alice/flux-lora", "main", "lora.safetensors")),
    ("https://huggingface.co/alice/flux-lora/blob/main/lora.safetensors",
     HuggingFaceSource("alice/flux-lora", "main", "lora.safetensors")),
    ("https://huggingface.co/alice/flux-lora/resolve/v1.0/sub/dir/lora.safetensors?download=true",
     HuggingFaceSource("alice/flux-lora", "v1.0", "sub/dir/lora.safetensors")),
    ("hf.co/alice/flux-lora/resolve/refs%2Fpr%2F3/lora.safetensors",
     HuggingFaceSource("alice/flux-lora", "refs/pr/3", "lora.safetensors")),
    ("huggingface.co/alice/flux-lora/blob/0123abcd/lora.safetensors",
     HuggingFaceSource("alice/flux-lora", "0123abcd", "lora.safetensors")),
    ("https://huggingface.co/alice/flux-lora/tree/dev", HuggingFaceSource("alice/flux-lora", "dev")),
    ("https://civitai.com/models/12345", CivitaiModelSource(12345)),
    ("https://civitai.com/models/12345/pixar-style?modelVersionId=678", CivitaiModelSource(12345, 678)),
    ("civitai.com/models/12345?modelVersionId=678", CivitaiModelSource(12345, 678)),
    ("https://www.civitai.com/models/12345/pixar-style", CivitaiModelSource(12345)),
    ("https://civitai.com/api/download/models/678", CivitaiVersionSource(678)),
    ("civitai.com/api/download/models/678?type=Model&format=SafeTensor", CivitaiVersionSource(678)),
    ("https://example.com/loras/style.safetensors", UrlSource("https://example.com/loras/style.safetensors")),
    ("http://cdn.example.org/a/B.SAFETENSORS?X-Amz-Signature=abc&X-Amz-Expires=60",
     UrlSource("http://cdn.example.org/a/B.SAFETENSORS?X-Amz-Signature=abc&X-Amz-Expires=60")),
    ("https://example.com:8443/my%20lora.safetensors", UrlSource("https://example.com:8443/my%20lora.safetensors")),
])
def test_accepted_forms(text: str, expected: object) -> None:
    assert parse_extra_lora(text) == expected


@pytest.mark.parametrize(("text", "reason"), [
    ("", "empty"),
    ("   ", "empty"),
    ("justoneword", "neither a Replicate model name nor a URL"),
    ("a/b/c/d", "neither a Replicate model name nor a URL"),
    ("fofr/flux-pixar-cars/latest", "64 hexadecimal"),
    ("fofr/../etc", "not a valid Replicate model name"),
    ("fo.fr/model", "without its https://"),
    ("example.com/lora.safetensors", "without its https://"),
    ("file:///etc/passwd", "only http(s)"),
    ("ftp://example.com/lora.safetensors", "only http(s)"),
    ("https://example.com/model.ckpt", "pickle"),
    ("https://example.com/pytorch_lora_weights.bin", "pickle"),
    ("https://example.com/weights.pt?x=1", "pickle"),
    ("https://example.com/some/page", "not a .safetensors file"),
    ("https://example.com/lora.safetensors.zip", "not a .safetensors file"),
    ("https://user:secret@example.com/lora.safetensors", "credentials inside the URL"),
    ("https://example.com:99999/lora.safetensors", "not a valid URL"),
    ("https:///lora.safetensors", "no host"),
    ("https://replicate.com/fofr", "replicate.com URL must look like"),
    ("https://replicate.com/fofr/model/versions", "replicate.com URL must look like"),
    ("https://huggingface.co/alice", "must name a repo"),
    ("https://huggingface.co/datasets/alice/data", "not LoRA repos"),
    ("https://huggingface.co/spaces/alice/demo", "not LoRA repos"),
    ("https://huggingface.co/alice/flux-lora/blob/main/model.bin", "pickle"),
    ("https://huggingface.co/alice/flux-lora/resolve/main", "must end with a .safetensors file"),
    ("https://huggingface.co/alice/flux-lora/resolve/main/../../x.safetensors", "not valid"),
    ("https://huggingface.co/alice/flux-lora/resolve/main/a%2F..%2Fb.safetensors", "not valid"),
    ("https://huggingface.co/alice/flux-lora/README.md", "not a .safetensors file"),
    ("https://civitai.com/user/alice", "civitai.com URL must look like"),
    ("https://civitai.com/models/abc", "civitai.com URL must look like"),
    ("civitai.com/models/1?modelVersionId=latest", "modelVersionId"),
    ("https://civitai.com/api/download/models/", "civitai.com URL must look like"),
])
def test_refused_forms_name_the_field_and_list_what_is_accepted(text: str, reason: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_extra_lora(text)
    message = str(caught.value)
    assert caught.value.field == "extra_lora"
    assert message.startswith("extra_lora: ")
    assert reason in message
    for form in ("owner/model", "huggingface.co/owner/repo", "civitai.com/models/<id>", "ending in .safetensors"):
        assert form in message


def test_refusal_never_repeats_credentials_from_the_url() -> None:
    with pytest.raises(InputError) as caught:
        parse_extra_lora("https://user:hunter2@example.com/lora.safetensors")
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("same", [
    ("fofr/flux-pixar-cars", "https://replicate.com/fofr/flux-pixar-cars",
     "replicate.com/fofr/flux-pixar-cars/_weights"),
    ("huggingface.co/a/b/lora.safetensors", "https://huggingface.co/a/b/blob/main/lora.safetensors",
     "hf.co/a/b/resolve/main/lora.safetensors?download=true"),
    ("https://civitai.com/models/1/x?modelVersionId=2", "civitai.com/models/1?modelVersionId=2"),
    ("https://civitai.com/api/download/models/2", "civitai.com/api/download/models/2?type=Model"),
])
def test_equivalent_forms_share_one_cache_key(same: tuple[str, ...]) -> None:
    assert len({parse_extra_lora(text).cache_key for text in same}) == 1
    assert len({identify(text) for text in same}) == 1


def test_a_lora_s_one_key_is_hex_digits_a_valid_adapter_and_module_name() -> None:
    """The key names the cache files and the PEFT adapter: a module name cannot hold a dot."""
    lora = identify("https://cdn.example.com/lora.safetensors?X-Amz-Signature=topsecret")
    assert lora.source == parse_extra_lora("https://cdn.example.com/lora.safetensors?X-Amz-Signature=topsecret")
    assert len(lora.key) == 40 and set(lora.key) <= set("0123456789abcdef")
    assert identify("https://cdn.example.com/lora.safetensors?X-Amz-Signature=other").key != lora.key


def test_different_sources_have_different_cache_keys() -> None:
    texts = [
        "fofr/flux-pixar-cars", f"fofr/flux-pixar-cars/{VERSION}", "huggingface.co/a/b",
        "huggingface.co/a/b/lora.safetensors", "huggingface.co/a/b/blob/dev/lora.safetensors",
        "civitai.com/models/1", "civitai.com/models/1?modelVersionId=2", "civitai.com/api/download/models/2",
        "https://example.com/lora.safetensors", "https://example.com/lora.safetensors?v=2",
    ]
    assert len({parse_extra_lora(text).cache_key for text in texts}) == len(texts)


def test_cache_keys_read_as_documented() -> None:
    assert parse_extra_lora("hf.co/a/b/blob/dev/x.safetensors").cache_key == "hf:a/b@dev/x.safetensors"
    assert parse_extra_lora(f"fofr/m/{VERSION}").cache_key == f"replicate:fofr/m@{VERSION}"
    assert parse_extra_lora("civitai.com/api/download/models/7").cache_key == "civitai:version/7"


def test_url_key_and_description_keep_signed_query_secret() -> None:
    source = parse_extra_lora("https://cdn.example.com/lora.safetensors?X-Amz-Signature=topsecret")
    assert "topsecret" not in source.cache_key
    assert "topsecret" not in source.describe()
    assert source.describe() == "https://cdn.example.com/lora.safetensors?…"


def test_service_addresses_default_to_the_public_services() -> None:
    settings = Settings.from_env({}).lora
    assert (settings.replicate_url, settings.civitai_url, settings.hf_endpoint) == (
        "https://replicate.com", "https://civitai.com", "https://huggingface.co")


def test_pasted_service_urls_are_fetched_from_the_configured_addresses() -> None:
    addresses = Settings.from_env({"LASSIE_REPLICATE_URL": "http://mirror.internal:8080/replicate/",
                                   "LASSIE_CIVITAI_URL": "http://civitai.mirror"}).lora
    replicate = parse_extra_lora("https://replicate.com/fofr/cars")
    versioned = parse_extra_lora(f"https://replicate.com/fofr/cars/versions/{VERSION}")
    civitai = parse_extra_lora("https://civitai.com/api/download/models/9")
    assert replicate.weights_url(addresses) == "http://mirror.internal:8080/replicate/fofr/cars/_weights"
    assert versioned.weights_url(addresses) == \
        f"http://mirror.internal:8080/replicate/fofr/cars/versions/{VERSION}/_weights"
    assert civitai.download_url(addresses) == "http://civitai.mirror/api/download/models/9"


def test_a_malformed_service_address_is_an_operator_error() -> None:
    with pytest.raises(ValueError, match="LASSIE_CIVITAI_URL"):
        Settings.from_env({"LASSIE_CIVITAI_URL": "civitai.mirror"})


def test_source_parsing_and_download_modules_do_not_import_torch() -> None:
    code = "import sys, lassie.fetch.lora_sources, lassie.fetch.http; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
