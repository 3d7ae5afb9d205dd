"""The Lassie LoRA resolved once at setup (COG_WEIGHTS, LASSIE_LORA_URL, weights/lassie/), its one
install path, the kept LoRA's check at every start, the trigger word's bounds, and where setup
writes when the weights are read-only. Unit level, with local files and a loopback host; the
boots through the Cog server are in test_boot_matrix.py."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from helpers import make_tar, tiny_lora, training_output_tar
from lassie.engine.memory import ModelConfigs
from lassie.fetch.storage import writable_place
from lassie.settings import SettingError, Settings
from lassie.weights.lassie_lora import MAX_TRIGGER_WORD_CHARS, config_trigger_word, resolve
from lassie.weights.layout import CorruptFileError, ProvisionError, WeightsLayout
from range_server import RangeServer


def lora_of(tiny_weights: Path) -> bytes:
    return WeightsLayout(tiny_weights).lassie_lora.read_bytes()


def local_tar(tmp_path: Path, members: dict[str, bytes]) -> Path:
    archive = tmp_path / "trained_model.tar"
    archive.write_bytes(make_tar(members))
    return archive


# --- resolved once, in its order ----------------------------------------------------------------


def test_cog_weights_tar_is_fetched_once_with_its_trigger_word(tiny_weights: Path, tmp_path: Path) -> None:
    lora = lora_of(tiny_weights)
    layout = WeightsLayout(tmp_path / "weights")
    with RangeServer() as server:
        url = server.serve("/trained_model.tar", training_output_tar(lora, "ZWX"))
        settings = Settings.from_env({"LASSIE_LORA_URL": "http://127.0.0.1:9/never.tar"}, cog_weights=url)
        first = resolve(layout, settings)
        again = resolve(layout, settings)
        assert server.count("/trained_model.tar") == 1
    assert first == again and first.trigger_word == "ZWX"
    assert first.path.read_bytes() == lora
    assert first.path.parent.parent == layout.root / "fetched-lora"
    assert first.origin == f"COG_WEIGHTS ({url})"


def test_cog_weights_wins_over_the_lora_in_the_weights_directory(tiny_weights: Path, tmp_path: Path) -> None:
    layout = WeightsLayout(tmp_path / "weights")
    layout.lassie_dir.mkdir(parents=True)
    layout.lassie_lora.write_bytes(tiny_lora(seed=99))
    chosen = tmp_path / "lora.safetensors"
    chosen.write_bytes(lora_of(tiny_weights))
    resolved = resolve(layout, Settings.from_env({"LASSIE_TRIGGER_WORD": "LSSIE"}, cog_weights=str(chosen)))
    assert resolved.path.read_bytes() == chosen.read_bytes() and resolved.trigger_word == "LSSIE"
    assert resolve(layout, Settings.from_env({}, cog_weights="weights")).path == layout.lassie_lora


def test_a_missing_local_cog_weights_file_fails_naming_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="COG_WEIGHTS is neither an http"):
        resolve(WeightsLayout(tmp_path), Settings.from_env({}, cog_weights=str(tmp_path / "nothing.tar")))


def test_the_memory_plan_sizes_the_resolved_lora_not_weights_lassie(tiny_weights: Path, tmp_path: Path) -> None:
    """A fine-tune's disk has no weights/lassie/: the plan must size the COG_WEIGHTS LoRA (main
    sized layout.lassie_lora and failed setup with FileNotFoundError)."""
    layout = WeightsLayout(tmp_path / "weights")
    chosen = tmp_path / "lora.safetensors"
    chosen.write_bytes(lora_of(tiny_weights))
    resolved = resolve(layout, Settings.from_env({}, cog_weights=str(chosen)))
    assert not layout.lassie_dir.exists()
    assert ModelConfigs.of_layout(layout, resolved.path).lassie_lora == resolved.path


# --- a kept LoRA that fails its check at a start ------------------------------------------------


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "bad header": b"\x00" * 8 + data[8:]}[how])


@pytest.mark.parametrize("how", ["empty", "truncated", "bad header"])
def test_a_damaged_kept_lora_is_fetched_again_once(tiny_weights: Path, tmp_path: Path, how: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    lora = lora_of(tiny_weights)
    layout = WeightsLayout(tmp_path / "weights")
    with RangeServer() as server:
        url = server.serve("/trained_model.tar", training_output_tar(lora))
        settings = Settings.from_env({}, cog_weights=url)
        kept = resolve(layout, settings).path
        damage(kept, how)
        with caplog.at_level(logging.WARNING, logger="lassie.weights.lassie_lora"):
            again = resolve(layout, settings)
        assert server.count("/trained_model.tar") == 2
    assert again.path == kept and kept.read_bytes() == lora and again.trigger_word == "LSSIE"
    assert f"the Lassie LoRA from COG_WEIGHTS kept in {kept.parent} is damaged" in caplog.text


def test_a_damaged_kept_lora_whose_refetch_is_bad_too_fails_naming_it(tiny_weights: Path, tmp_path: Path) -> None:
    layout = WeightsLayout(tmp_path / "weights")
    with RangeServer() as server:
        url = server.serve("/lora.safetensors", lora_of(tiny_weights))
        settings = Settings.from_env({"LASSIE_LORA_URL": url})
        kept = resolve(layout, settings).path
        damage(kept, "truncated")
        server.serve("/lora.safetensors", lora_of(tiny_weights)[:100])
        with pytest.raises(CorruptFileError, match=rf"the Lassie LoRA from LASSIE_LORA_URL \({url}\) is not a valid "
                                                   r"safetensors file: the file is truncated"):
            resolve(layout, settings)
        assert server.count("/lora.safetensors") == 2


# --- the trigger word ---------------------------------------------------------------------------


def test_a_trigger_word_of_the_longest_allowed_length_is_kept(tiny_weights: Path, tmp_path: Path) -> None:
    word = "T" * MAX_TRIGGER_WORD_CHARS
    archive = local_tar(tmp_path, {"lora.safetensors": lora_of(tiny_weights), "trigger_word.txt": word.encode()})
    assert resolve(WeightsLayout(tmp_path / "weights"), Settings.from_env({}, cog_weights=str(archive))).trigger_word \
        == word


@pytest.mark.parametrize(("member", "text", "said"), [
    ("trigger_word.txt", "T" * (MAX_TRIGGER_WORD_CHARS + 1), "has 201 characters"),
    ("trigger_word.txt", "T" * 1024**2, "has 1048576 characters"),
    ("trigger_word.txt", "TOK\x1b[31m", r"holds the unprintable character '\\x1b'"),
    ("trigger_word.txt", "TO\nK", r"holds the unprintable character '\\n'"),
    ("config.yaml", f"config:\n  process:\n    - trigger_word: {'T' * 300}\n", "has 300 characters"),
])
def test_a_trigger_word_from_a_tar_that_is_too_long_or_unprintable_is_refused_naming_it(
        tiny_weights: Path, tmp_path: Path, member: str, text: str, said: str) -> None:
    archive = local_tar(tmp_path, {"out/lora.safetensors": lora_of(tiny_weights), f"out/{member}": text.encode()})
    layout = WeightsLayout(tmp_path / "weights")
    with pytest.raises(ProvisionError, match=rf"^the trigger word in {member} of COG_WEIGHTS \({archive}\) {said}"):
        resolve(layout, Settings.from_env({}, cog_weights=str(archive)))
    assert not list((layout.root / "fetched-lora").glob("*/lora.safetensors"))  # nothing kept half-way


def test_a_trigger_word_from_the_environment_or_weights_lassie_is_bounded_too(tiny_weights: Path,
                                                                                tmp_path: Path) -> None:
    layout = WeightsLayout(tmp_path / "weights")
    layout.lassie_dir.mkdir(parents=True)
    layout.lassie_lora.write_bytes(lora_of(tiny_weights))
    with pytest.raises(ProvisionError, match=r"^the trigger word in LASSIE_TRIGGER_WORD has 201 characters"):
        resolve(layout, Settings.from_env({"LASSIE_TRIGGER_WORD": "T" * 201}))
    layout.trigger_word_file.write_text("TOK\x07\n")
    with pytest.raises(ProvisionError, match=rf"^the trigger word in {layout.trigger_word_file} holds the "
                                             r"unprintable character '\\x07'"):
        resolve(layout, Settings.from_env({}))


@pytest.mark.parametrize(("config", "word"), [
    ('config:\n  process:\n    - trigger_word: "LSSIE"\n', "LSSIE"),
    ("trigger_word: 'two words'  # the token\n", "two words"),
    ("\t- trigger_word:TOK\n", "TOK"),
    ("trigger_word:\ntrigger_word: later\n", "later"),
    ("trigger_words: no\nnot_trigger_word: no\n# trigger_word: commented\n", None),
])
def test_the_config_yaml_trigger_word(config: str, word: str | None) -> None:
    assert config_trigger_word(config) == word


def test_a_megabyte_config_yaml_of_blank_lines_is_read_at_once(tiny_weights: Path, tmp_path: Path) -> None:
    """The old `^[\\s-]*` regex under re.M took about 17 minutes on this; a line scan returns at once."""
    blank = b"\n" * (1024**2 - 64)
    archive = local_tar(tmp_path, {"out/lora.safetensors": lora_of(tiny_weights),
                                   "out/config.yaml": blank + b"name: lassie\n"})
    settings = Settings.from_env({"LASSIE_TRIGGER_WORD": "FALLBACK"}, cog_weights=str(archive))
    assert resolve(WeightsLayout(tmp_path / "weights"), settings).trigger_word == "FALLBACK"
    assert config_trigger_word((blank + b"  - trigger_word: LSSIE\n").decode()) == "LSSIE"


# --- where setup writes --------------------------------------------------------------------------


def test_an_unwritable_default_falls_back_with_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    not_a_directory = tmp_path / "weights"
    not_a_directory.write_text("a file, so nothing can be created below it")
    monkeypatch.setattr("lassie.fetch.storage.fallback_root", lambda: tmp_path / "fallback")
    with caplog.at_level(logging.INFO, logger="lassie.fetch.storage"):
        place = writable_place("extra-LoRA cache", not_a_directory / "lora-cache")
        assert writable_place("fetched Lassie LoRA", not_a_directory / "fetched-lora").parent == place.parent
    assert place == tmp_path / "fallback" / "lora-cache" and place.is_dir()
    assert stat.S_IMODE((tmp_path / "fallback").stat().st_mode) == 0o700
    assert [record.getMessage() for record in caplog.records] == [
        f"extra-LoRA cache: {not_a_directory / 'lora-cache'} cannot be written (Not a directory); using {place}; "
        f"whatever else setup keeps in {not_a_directory} falls back to {tmp_path / 'fallback'} too"]


def test_an_unwritable_explicit_place_fails_naming_the_variable(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with pytest.raises(SettingError, match="LASSIE_LORA_CACHE must be a directory this server can write"):
        writable_place("extra-LoRA cache", tmp_path / "default", not_a_directory / "cache", "LASSIE_LORA_CACHE")


def planted_by_another_user(tmp_path: Path) -> Path:
    """A folder some other user owns: made and given away where we may (root), else the root folder."""
    if os.getuid() != 0:
        return Path("/")
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o755)
    os.chown(planted, 54321, 54321)
    return planted


@pytest.mark.parametrize("plant", ["another user's", "writable by others", "a link"])
def test_a_fallback_folder_planted_in_a_shared_tmpdir_is_refused_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plant: str) -> None:
    not_a_directory = tmp_path / "weights"
    not_a_directory.write_text("")
    planted = tmp_path / "lassie-user"
    if plant == "another user's":
        planted = planted_by_another_user(tmp_path)
        said = "belongs to another user"
    elif plant == "writable by others":
        planted.mkdir()
        planted.chmod(0o777)
        said = r"may be written by other users \(mode drwxrwxrwx\)"
    else:
        (tmp_path / "elsewhere").mkdir()
        planted.symlink_to(tmp_path / "elsewhere")
        said = "is not a directory"
    monkeypatch.setattr("lassie.fetch.storage.fallback_root", lambda: planted)
    with pytest.raises(OSError, match=rf"refusing the fallback folder {planted}: {planted} {said}"):
        writable_place("extra-LoRA cache", not_a_directory / "lora-cache")
    assert not (planted / "lora-cache").exists()
