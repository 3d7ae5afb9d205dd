"""The LoRA file checks: only sound safetensors pass, and Replicate tars give up exactly one."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from helpers import make_lora, make_tar
from lassie.fetch.files import extract_single_safetensors, validate_safetensors
from lassie.request.errors import InputError

# --- safetensors validation ---------------------------------------------------------------------

def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def header_file(header: dict, data: bytes = b"", pad_to: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    if pad_to is not None:
        raw = raw.ljust(pad_to)
    return len(raw).to_bytes(8, "little") + raw + data


def torch_like_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": [1.0, 2.0]}))
    return buffer.getvalue()


SPACED_HEADER = b' {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'


def test_a_real_safetensors_file_is_accepted(tmp_path: Path) -> None:
    summary = validate_safetensors(write(tmp_path / "ok.safetensors", make_lora()), "test LoRA")
    assert summary.tensor_count == 4
    assert summary.metadata == {"format": "pt"}


def test_header_lengths_that_look_like_text_are_still_read_as_lengths(tmp_path: Path) -> None:
    """123 is '{' and 60 is '<' as a first byte: sniffing must not mistake them for JSON or HTML."""
    tensor = np.arange(4, dtype=np.float32).tobytes()
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    for length in (123, 60):
        path = write(tmp_path / f"h{length}.safetensors", header_file(header, tensor, pad_to=length))
        assert validate_safetensors(path, "test LoRA").tensor_count == 1


@pytest.mark.parametrize(("payload", "problem"), [
    (b"", "empty or truncated (0 bytes)"),
    (b"\x01\x02", "empty or truncated"),
    (pickle.dumps({"lora_down": [0.5] * 20}, protocol=4), "Python pickle"),
    (pickle.dumps({"lora_down": [0.5] * 20}, protocol=2), "Python pickle"),
    (torch_like_zip(), "zip archive"),
    (b"<!DOCTYPE html><html><body>Sign in to download</body></html>", "HTML"),
    (b"\n  <html><head></head></html>", "HTML"),
    (b'{"error": "Unauthorized", "message": "token required"}', "JSON document"),
    (b"\x1f\x8b\x08\x00" + bytes(40), "gzip"),
    (bytes(range(256)) * 4, "does not start with a safetensors header"),
    (b"\xff" * 7 + b"\x7f{" + b"x" * 40, "header length is impossible"),
    (header_file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})[:-5], "truncated"),
    (header_file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)), "truncated"),
    (header_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12)), "unexpected bytes"),
    (header_file({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), "unknown dtype"),
    (header_file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)), "does not fit"),
    (header_file({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)), "invalid shape"),
    (header_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8)), "invalid data offsets"),
    (header_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)), "overlaps"),
    (header_file({"__metadata__": {"format": "pt"}}), "holds no tensors"),
    (header_file({"__metadata__": {"n": 1}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
     "__metadata__"),
    (b"\x05\x00\x00\x00\x00\x00\x00\x00{\xff\xfe\x00}", "not JSON"),
    (header_file([1, 2]), "does not start"),  # a JSON list header: its first byte is '['
    # accepted by the safetensors library itself, refused here:
    (len(SPACED_HEADER).to_bytes(8, "little") + SPACED_HEADER + b"\0", "does not start"),
    (header_file({}), "holds no tensors"),
    (header_file({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"), "dtype F4"),
])
def test_anything_but_a_sound_safetensors_file_is_refused(tmp_path: Path, payload: bytes, problem: str) -> None:
    with pytest.raises(InputError) as caught:
        validate_safetensors(write(tmp_path / "bad", payload), "the LoRA from example.com")
    message = str(caught.value)
    assert message.startswith("extra_lora: the LoRA from example.com is not a usable .safetensors file: ")
    assert problem in message


def test_validation_agrees_with_the_safetensors_library(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    arrays = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": np.ones((2, 8), dtype=np.float16),
              "lora_unet_double_blocks_0_img_attn_qkv.alpha": np.array(2.0, dtype=np.float32),
              "empty": np.zeros((0, 3), dtype=np.int64)}
    path = write(tmp_path / "kohya.safetensors", save(arrays))
    assert validate_safetensors(path, "x").tensor_count == 3
    assert set(load_file(path)) == set(arrays)


# --- Replicate tars -----------------------------------------------------------------------------

def test_the_one_safetensors_member_is_extracted(tmp_path: Path) -> None:
    payload = make_lora(4)
    archive = write(tmp_path / "w.tar", make_tar({"output/captions/1.txt": b"a dog", "output/lora.safetensors": payload,
                                                  "._lora.safetensors": b"mac junk"}))
    extract_single_safetensors(archive, tmp_path / "out", max_bytes=10**6, origin="Replicate model a/b")
    assert (tmp_path / "out").read_bytes() == payload


def test_member_names_never_choose_where_data_is_written(tmp_path: Path) -> None:
    archive_dir = tmp_path / "deep" / "er"
    archive_dir.mkdir(parents=True)
    archive = write(archive_dir / "w.tar", make_tar({"../../escape.safetensors": make_lora()}))
    with pytest.raises(InputError, match=r'x holds a member whose name leaves its folder, "\.\./\.\./escape\.safetensors"'):
        extract_single_safetensors(archive, archive_dir / "out", max_bytes=10**6, origin="x")
    assert not (tmp_path / "escape.safetensors").exists()
    assert sorted(path.name for path in archive_dir.iterdir()) == ["w.tar"]


@pytest.mark.parametrize(("members", "links", "problem"), [
    ({"captions.txt": b"a dog"}, None, "holds no .safetensors file (it holds: captions.txt)"),
    ({}, {"lora.safetensors": "/etc/passwd"},
     'holds a symbolic link, "lora.safetensors"; only regular files and folders are unpacked'),
    ({"a.safetensors": make_lora(1), "b/c.safetensors": make_lora(2)}, None,
     "holds several .safetensors files (a.safetensors, b/c.safetensors); expected one"),
])
def test_tars_without_exactly_one_safetensors_are_refused(tmp_path: Path, members: dict, links: dict | None,
                                                          problem: str) -> None:
    archive = write(tmp_path / "w.tar", make_tar(members, links))
    with pytest.raises(InputError) as caught:
        extract_single_safetensors(archive, tmp_path / "out", max_bytes=10**6, origin="Replicate model a/b")
    assert f"Replicate model a/b {problem}" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_an_oversized_member_is_refused_without_extracting(tmp_path: Path) -> None:
    archive = write(tmp_path / "w.tar", make_tar({"lora.safetensors": bytes(5000)}))
    with pytest.raises(InputError, match=r"x holds more than 4\.0 KiB of files"):
        extract_single_safetensors(archive, tmp_path / "out", max_bytes=4096, origin="x")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("payload", [b"this is not a tar at all" * 40,
                                     make_tar({"lora.safetensors": make_lora()})[:700]])
def test_broken_archives_are_refused(tmp_path: Path, payload: bytes) -> None:
    with pytest.raises(InputError, match=r'not a readable tar archive|ends inside "lora\.safetensors": it was cut short'):
        extract_single_safetensors(write(tmp_path / "w.tar", payload), tmp_path / "out", max_bytes=10**6, origin="x")
