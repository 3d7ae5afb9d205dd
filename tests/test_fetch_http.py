"""The safe downloader: the address rule, redirects, limits and tokens.

Everything runs against a loopback server; loopback is exactly what the rule refuses, so the
refusal tests also prove that no request reached the server.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fake_services import FakeServices, forbid_non_loopback
from helpers import make_lora
from lassie.fetch.addresses import address_refusal, allowed_addresses, parse_ip_literal
from lassie.fetch.http import (
    MIB,
    AddressRule,
    Credential,
    DownloadLimits,
    FetchError,
    ProgressLog,
    download_file,
    fetch_json,
    redact_url,
)
from lassie.settings import Settings

SECRET = "civ-token-5ec7e7-do-not-log"
ALLOW_ALL = DownloadLimits(rule=AddressRule(allow_all=True))


@pytest.fixture
def services() -> Iterator[FakeServices]:
    with FakeServices() as running:
        yield running


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_non_loopback(monkeypatch)


# --- the address rule, without any connection ---------------------------------------------------

@pytest.mark.parametrize(("address", "reason"), [
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("::1", "loopback"),
    ("fc00::1", "private"),
    ("fd12:3456:789a::1", "private"),
    ("fe80::1", "link-local"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.7", "private"),
    ("::ffff:169.254.169.254", "link-local"),
    ("2002:7f00:1::1", "loopback"),  # 6to4 around 127.0.0.1
    ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 around 169.254.169.254
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("100.64.0.1", "not publicly routable"),  # carrier-grade NAT
    ("240.0.0.1", "reserved"),
])
def test_internal_addresses_are_refused(address: str, reason: str) -> None:
    refusal = address_refusal(ipaddress.ip_address(address))
    assert refusal is not None and refusal.startswith(reason)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111",
                                     "2a00:1450:4001:80b::200e"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(("host", "address"), [
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("0x7F.0.0.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("3232235777", "192.168.1.1"),
    ("[::1]", "::1"),
    ("::ffff:7f00:1", "::ffff:127.0.0.1"),
])
def test_odd_spellings_of_addresses_are_read_as_addresses(host: str, address: str) -> None:
    parsed = parse_ip_literal(host)
    assert parsed == ipaddress.ip_address(address)
    assert address_refusal(parsed) is not None


@pytest.mark.parametrize("host", ["example.com", "localhost", "0x7g", "1.2.3.4.5", "huggingface.co"])
def test_host_names_are_not_addresses(host: str) -> None:
    assert parse_ip_literal(host) is None


def rule_for(allow_private_urls: str) -> AddressRule:
    return AddressRule.from_settings(Settings.from_env({"LASSIE_ALLOW_PRIVATE_URLS": allow_private_urls}).lora)


def test_operator_exceptions() -> None:
    loopback, private = ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.2.3.4")
    assert rule_for("1").refusal(loopback) is None
    rule = rule_for("10.0.0.0/8, fd00::1")
    assert rule.refusal(private) is None
    assert rule.refusal(ipaddress.ip_address("fd00::1")) is None
    assert rule.refusal(loopback) == "loopback"
    assert rule_for("0").refusal(private) == "private"
    with pytest.raises(ValueError, match="LASSIE_ALLOW_PRIVATE_URLS"):
        rule_for("everything")


# --- the rule through the downloader ------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "2130706433", "0x7f000001", "127.1"])
def test_loopback_targets_are_refused_before_any_request(services: FakeServices, tmp_path: Path, host: str) -> None:
    services.serve("/lora.safetensors", make_lora())
    with pytest.raises(FetchError) as caught:
        download_file(f"http://{host}:{services.port}/lora.safetensors", tmp_path / "out")
    message = str(caught.value)
    assert message.startswith("refusing to fetch from")
    assert "loopback" in message and "LASSIE_ALLOW_PRIVATE_URLS" in message
    assert services.seen == []
    assert not (tmp_path / "out").exists()


def fake_resolver(monkeypatch: pytest.MonkeyPatch, *answers: list[str]) -> list[str]:
    """Each lookup returns the next list of addresses (the last one repeats); returns the names looked up.
    An address literal is no lookup (as with a real resolver): it stands for itself and is not recorded."""
    looked_up: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[tuple]:
        if parse_ip_literal(host) is not None:
            return real_getaddrinfo(host, port, *args, **kwargs)
        looked_up.append(host)
        addresses = answers[min(len(looked_up), len(answers)) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


def test_a_name_with_any_internal_answer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_resolver(monkeypatch, ["93.184.216.34", "127.0.0.1"])
    with pytest.raises(FetchError, match=r"refusing to fetch from two-faced.example \(which is 127.0.0.1\)"):
        allowed_addresses("two-faced.example", 443, AddressRule())


def test_the_connection_goes_to_the_address_that_was_checked(services: FakeServices, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the name resolves to an allowed address once, then to an internal one.
    The download must use the first answer and never ask again."""
    payload = make_lora(2)
    services.serve("/lora.safetensors", payload)
    looked_up = fake_resolver(monkeypatch, ["127.0.0.1"], ["10.0.0.1"])
    limits = DownloadLimits(rule=AddressRule(allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),)))
    download_file(f"http://rebinding.example:{services.port}/lora.safetensors", tmp_path / "out", limits=limits)
    assert looked_up == ["rebinding.example"]
    assert (tmp_path / "out").read_bytes() == payload


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x.safetensors", "gopher://x/1"])
def test_non_http_schemes_are_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(FetchError, match="only http\\(s\\) URLs are fetched"):
        download_file(url, tmp_path / "out")


@pytest.mark.parametrize("target", ["http://127.0.0.2:{port}/lora.safetensors", "http://[::1]:{port}/lora.safetensors",
                                    "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd"])
def test_a_redirect_that_lands_on_an_internal_address_is_refused(
        services: FakeServices, tmp_path: Path, target: str) -> None:
    """The first hop is allowed by the operator (127.0.0.1 only); where it redirects to is not."""
    limits = DownloadLimits(rule=rule_for("127.0.0.1"))
    url = services.redirect("/hop", target.format(port=services.port))
    with pytest.raises(FetchError) as caught:
        download_file(url, tmp_path / "out", limits=limits)
    assert services.count("/hop") == 1
    assert len(services.seen) == 1
    assert "refusing" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_redirects_are_followed_and_checked_at_every_hop(services: FakeServices, tmp_path: Path) -> None:
    payload = make_lora(7)
    services.serve("/final.safetensors", payload)
    services.redirect("/second", "/final.safetensors", status=307)
    url = services.redirect("/first", f"{services.base}/second", status=301)
    assert download_file(url, tmp_path / "out", limits=ALLOW_ALL) == len(payload)
    assert (tmp_path / "out").read_bytes() == payload


def test_redirect_loops_end_with_a_clear_error(services: FakeServices, tmp_path: Path) -> None:
    url = services.redirect("/loop", "/loop")
    with pytest.raises(FetchError, match="redirects more than 8 times"):
        download_file(url, tmp_path / "out", limits=ALLOW_ALL)
    assert services.count("/loop") == 9


# --- limits -------------------------------------------------------------------------------------

def test_a_declared_size_over_the_cap_is_refused_before_the_body(services: FakeServices, tmp_path: Path) -> None:
    url = services.serve("/big.safetensors", b"x" * 5000)
    limits = DownloadLimits(max_bytes=4096, rule=AddressRule(allow_all=True))
    with pytest.raises(FetchError, match=r"larger than the 4.0 KiB allowed for a LoRA \(LASSIE_MAX_LORA_BYTES\)"):
        download_file(url, tmp_path / "out", limits=limits)
    assert not (tmp_path / "out").exists()


def test_the_cap_is_enforced_while_streaming_when_no_size_is_declared(services: FakeServices, tmp_path: Path) -> None:
    url = services.serve("/big.safetensors", b"x" * (3 * 1024 * 1024), send_length=False)
    limits = DownloadLimits(max_bytes=1024 * 1024, rule=AddressRule(allow_all=True))
    with pytest.raises(FetchError, match=r"larger than the 1.0 MiB allowed"):
        download_file(url, tmp_path / "out", limits=limits)
    assert (tmp_path / "out").stat().st_size <= 1024 * 1024


def test_the_cap_comes_from_the_settings(services: FakeServices, tmp_path: Path) -> None:
    settings = Settings.from_env({"LASSIE_ALLOW_PRIVATE_URLS": "1", "LASSIE_MAX_LORA_BYTES": "100"}).lora
    url = services.serve("/lora.safetensors", make_lora())
    with pytest.raises(FetchError, match="larger than the 100 bytes allowed"):
        download_file(url, tmp_path / "out", limits=DownloadLimits.from_settings(settings))
    with pytest.raises(ValueError, match="LASSIE_MAX_LORA_BYTES"):
        Settings.from_env({"LASSIE_MAX_LORA_BYTES": "lots"})


def test_a_connection_that_closes_early_is_a_cut_short_download(services: FakeServices, tmp_path: Path) -> None:
    url = services.serve("/short.safetensors", make_lora(), declared_length=100_000)
    with pytest.raises(FetchError, match="cut short"):
        download_file(url, tmp_path / "out", limits=ALLOW_ALL)


def test_a_server_that_stops_sending_times_out(services: FakeServices, tmp_path: Path) -> None:
    url = services.serve("/slow.safetensors", make_lora(), stall=2.0)
    limits = DownloadLimits(read_timeout=0.3, rule=AddressRule(allow_all=True))
    with pytest.raises(FetchError, match="did not answer in time"):
        download_file(url, tmp_path / "out", limits=limits)


def test_a_trickling_download_is_stopped_by_the_overall_time_limit(services: FakeServices, tmp_path: Path) -> None:
    """A byte every 0.1 s never trips the 0.3 s per-read timeout; the whole-fetch limit of 1 s does."""
    url = services.serve("/trickle.safetensors?sig=secret", make_lora(), trickle=0.1)
    settings = Settings.from_env({"LASSIE_ALLOW_PRIVATE_URLS": "1", "LASSIE_LORA_DOWNLOAD_TIMEOUT": "1"}).lora
    limits = replace(DownloadLimits.from_settings(settings), read_timeout=0.3)
    with pytest.raises(FetchError) as error:
        download_file(url, tmp_path / "out", limits=limits)
    assert str(error.value).startswith(f"the download of {url.split('?')[0]}?… took longer than the 1 s "
                                       "allowed for fetching a LoRA (LASSIE_LORA_DOWNLOAD_TIMEOUT)")
    with pytest.raises(ValueError, match="LASSIE_LORA_DOWNLOAD_TIMEOUT must be a number of seconds"):
        Settings.from_env({"LASSIE_LORA_DOWNLOAD_TIMEOUT": "0"})


@pytest.mark.parametrize(("status", "expected"), [(404, "not found \\(HTTP 404\\)"), (500, "answered HTTP 500"),
                                                  (401, "answered HTTP 401")])
def test_http_errors_are_reported_with_their_status(services: FakeServices, tmp_path: Path, status: int,
                                                    expected: str) -> None:
    url = services.serve("/x.safetensors", b"nope", status=status)
    with pytest.raises(FetchError, match=expected):
        download_file(url, tmp_path / "out", limits=ALLOW_ALL)


def test_fetch_json_reads_an_api_answer_and_refuses_html(services: FakeServices) -> None:
    good = services.serve("/api/ok", json.dumps({"modelVersions": []}).encode())
    bad = services.serve("/api/html", b"<html>login</html>")
    assert fetch_json(good, limits=ALLOW_ALL) == {"modelVersions": []}
    with pytest.raises(FetchError, match="did not answer with JSON"):
        fetch_json(bad, limits=ALLOW_ALL)


def test_large_downloads_log_their_progress_by_tenths(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lassie.fetch.http")
    with ProgressLog(total=100 * MIB, desc=redact_url(f"https://example.com/big.safetensors?sig={SECRET}"),
                     unit="B") as progress:
        for _ in range(25):
            progress.update(4 * MIB)
    percents = [int(record.getMessage().rsplit("(", 1)[1].rstrip("%)")) for record in caplog.records]
    assert [percent // 10 for percent in percents] == list(range(1, 11)), "one line per tenth"
    assert "big.safetensors?…" in caplog.text and SECRET not in caplog.text


def test_progress_is_logged_while_library_progress_bars_are_off(caplog: pytest.LogCaptureFixture) -> None:
    """Setup turns library bars off (transformers' switch turns off huggingface_hub's too); the
    progress log still counts and logs."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    caplog.set_level(logging.INFO, logger="lassie.fetch.http")
    disable_progress_bars()
    try:
        with ProgressLog(total=100 * MIB, desc="https://example.com/big.safetensors", unit="B") as progress:
            for _ in range(10):
                progress.update(10 * MIB)
    finally:
        enable_progress_bars()
    assert len(caplog.records) == 10 and caplog.records[-1].getMessage().endswith("100.0 MiB (100%)")


def test_small_downloads_do_not_log_progress(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lassie.fetch.http")
    with ProgressLog(total=10 * MIB, desc="https://example.com/small.safetensors", unit="B") as progress:
        for _ in range(10):
            progress.update(MIB)
    assert caplog.records == []


def test_progress_of_anything_but_bytes_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    """huggingface_hub also counts files with its tqdm_class: those counts are no download size."""
    caplog.set_level(logging.INFO, logger="lassie.fetch.http")
    with ProgressLog(total=200 * MIB, desc="Fetching 3 files", unit="it") as progress:
        progress.update(200 * MIB)
    assert caplog.records == []


# --- tokens -------------------------------------------------------------------------------------

def test_a_token_goes_to_its_own_origin_only() -> None:
    credential = Credential("https://civitai.com", "CIVITAI_API_TOKEN", SECRET)
    assert credential.applies_to("https://civitai.com/api/download/models/1")
    assert credential.applies_to("https://CIVITAI.com:443/x")
    assert not credential.applies_to("http://civitai.com/x")
    assert not credential.applies_to("https://civitai.com:8443/x")
    assert not credential.applies_to("https://civitai.com.evil.example/x")
    assert not credential.applies_to("https://b2.civitai-cdn.example/x")
    assert not Credential("https://civitai.com", "CIVITAI_API_TOKEN").applies_to("https://civitai.com/x")
    assert SECRET not in repr(credential)


def test_a_token_is_not_sent_after_a_redirect_to_another_host(services: FakeServices, tmp_path: Path) -> None:
    payload = make_lora(3)
    services.serve("/cdn/lora.safetensors", payload)
    services.redirect("/api/download/models/1", f"http://localhost:{services.port}/cdn/lora.safetensors?sig=1")
    credential = Credential(services.base, "CIVITAI_API_TOKEN", SECRET)
    download_file(f"{services.base}/api/download/models/1", tmp_path / "out", credential=credential, limits=ALLOW_ALL)
    assert services.authorizations("/api/download/models/1") == [f"Bearer {SECRET}"]
    assert services.authorizations("/cdn/lora.safetensors") == [None]
    assert (tmp_path / "out").read_bytes() == payload


def test_a_redirect_to_an_unreadable_port_is_a_clear_error_with_a_token(services: FakeServices,
                                                                          tmp_path: Path) -> None:
    """Deciding whether the token goes on must not trip over the next hop: the hop's own check names it."""
    url = services.redirect("/api/download/models/2", f"http://{services.host}:99999/lora.safetensors")
    credential = Credential(services.base, "CIVITAI_API_TOKEN", SECRET)
    assert not credential.applies_to(f"http://{services.host}:99999/x")
    with pytest.raises(FetchError, match="is not a valid URL"):
        download_file(url, tmp_path / "out", credential=credential, limits=ALLOW_ALL)
    assert not (tmp_path / "out").exists()


def test_a_redirect_away_and_back_does_not_regain_the_token(services: FakeServices, tmp_path: Path) -> None:
    services.serve("/back.safetensors", make_lora())
    services.redirect("/away", f"{services.base}/back.safetensors")
    services.redirect("/start", f"http://localhost:{services.port}/away")
    credential = Credential(services.base, "CIVITAI_API_TOKEN", SECRET)
    download_file(f"{services.base}/start", tmp_path / "out", credential=credential, limits=ALLOW_ALL)
    assert services.authorizations("/back.safetensors") == [None]


def test_auth_failures_name_the_variable_but_never_the_token(services: FakeServices, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = services.serve("/private.safetensors", make_lora(), token="the-right-one")
    with pytest.raises(FetchError, match="needs a token \\(HTTP 401\\): set CIVITAI_API_TOKEN"):
        download_file(url, tmp_path / "out", credential=Credential(services.base, "CIVITAI_API_TOKEN"),
                      limits=ALLOW_ALL)
    with pytest.raises(FetchError) as caught:
        download_file(url, tmp_path / "out", credential=Credential(services.base, "CIVITAI_API_TOKEN", SECRET),
                      limits=ALLOW_ALL)
    assert "refused the token in CIVITAI_API_TOKEN (HTTP 403)" in str(caught.value)
    assert SECRET not in str(caught.value) and SECRET not in caplog.text


def test_query_strings_never_reach_logs_or_errors(services: FakeServices, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    services.serve("/signed.safetensors", make_lora())
    services.redirect("/moved", f"/signed.safetensors?X-Amz-Signature={SECRET}")
    download_file(f"{services.base}/moved?token={SECRET}", tmp_path / "out", limits=ALLOW_ALL)
    with pytest.raises(FetchError) as caught:
        download_file(f"{services.base}/missing.safetensors?token={SECRET}", tmp_path / "out", limits=ALLOW_ALL)
    assert "signed.safetensors?…" in caplog.text
    assert SECRET not in caplog.text and SECRET not in str(caught.value)


def test_redact_url_drops_query_and_user_info() -> None:
    assert redact_url("https://u:p@example.com:8443/a/b.safetensors?sig=x#frag") == \
        "https://example.com:8443/a/b.safetensors?…"
    assert redact_url("http://[::1]:80/x") == "http://[::1]:80/x"

