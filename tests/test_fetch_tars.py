"""The one tar policy (`lassie.fetch.tars`) and the folder check, for every tar the server unpacks.

Weights tars, COG_WEIGHTS and extra-LoRA Replicate tars come from loopback hosts; every tar is
built here. The policy: regular files and folders only, relative names without `..`, uncompressed,
the end-of-archive blocks present, bounded; a weights folder goes into place (and stays in use at
a start) only when its JSON parses and its safetensors headers fit their files.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import stat
import tarfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fake_services import FakeServices, services  # noqa: F401 (fixture)
from helpers import folder_tar, make_lora, make_tar, training_output_tar
from lassie.fetch.lora_cache import LoraCache
from lassie.fetch.lora_sources import identify
from lassie.fetch.tars import READ_BYTES, SHOWN_NAME_CHARS, TarLimits, TarRefused, check_tree, unpack
from lassie.predictor import Lassie
from lassie.request.errors import InputError
from lassie.settings import Settings
from lassie.weights.downloads import FetchOptions
from lassie.weights.lassie_lora import resolve
from lassie.weights.layout import WeightsLayout
from lassie.weights.provision import (
    ProvisionError,
    ensure_weights,
    fetch_missing_folders,
    provision_from_tars,
)
from range_server import RangeServer

SMALL_CHUNKS = FetchOptions(connections=4, chunk_bytes=64 * 1024, use_pget=False)
LIMITS = TarLimits(max_members=100, max_bytes=10**8)
COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {"gzip": gzip.compress, "bzip2": bz2.compress,
                                                    "xz": lzma.compress}
REFUSED_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link",
                 tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}


def tar_of(*entries: tarfile.TarInfo | tuple[str, bytes], end: bool = True) -> bytes:
    """A tar of `entries` (headers as given, or (name, data) files); `end` False drops the
    end-of-archive blocks, as a body cut at the last member boundary does."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tar.addfile(info, io.BytesIO(entry[1]))
        last_member_end = tar.offset
    return buffer.getvalue() if end else buffer.getvalue()[:last_member_end]


def entry(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def without_end(data: bytes) -> bytes:
    """`data` cut at its last member boundary: every member whole, the end-of-archive blocks gone."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for _ in tar:
            pass
        return data[:tar.offset]


def bomb_start(compress: Callable[[bytes], bytes]) -> bytes:
    """The start of a tar bomb: one member claiming 64 GiB of zeros, compressed (the body stops
    after 1 MiB, so code that decompresses it fails soon instead of running for minutes)."""
    header = tarfile.TarInfo("flux-schnell/zeros.safetensors")
    header.size = 64 * 1024**3
    return compress(header.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024**2))


class Trickle(io.RawIOBase):
    """A stream handing out at most `step` bytes per read, as a slow socket does."""

    def __init__(self, data: bytes, step: int = 1000) -> None:
        super().__init__()
        self.data, self.step = io.BytesIO(data), step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        chunk = self.data.read(min(len(buffer), self.step))
        buffer[:len(chunk)] = chunk
        return len(chunk)


def unpacked(data: bytes, tmp_path: Path, limits: TarLimits = LIMITS) -> Path:
    destination = tmp_path / "out"
    unpack(io.BufferedReader(Trickle(data), 8192), destination, limits)
    return destination


def refusal(data: bytes, tmp_path: Path, limits: TarLimits = LIMITS) -> str:
    with pytest.raises(TarRefused) as caught:
        unpacked(data, tmp_path, limits)
    return str(caught.value)


# --- the policy, on tars built here -------------------------------------------------------------


def test_files_and_folders_are_unpacked_whole_whatever_the_reads(tmp_path: Path) -> None:
    big = os.urandom(3 * 1024**2 + 7)  # several of tarfile's reads, handed out 1000 bytes at a time
    data = tar_of(entry("./", tarfile.DIRTYPE), entry("./sub", tarfile.DIRTYPE), ("./sub/big.bin", big),
                  ("top.json", b"{}"))
    out = unpacked(data, tmp_path)
    assert (out / "sub" / "big.bin").read_bytes() == big and (out / "top.json").read_bytes() == b"{}"
    assert sorted(path.relative_to(out).as_posix() for path in out.rglob("*")) == ["sub", "sub/big.bin", "top.json"]


@pytest.mark.parametrize("kind", list(REFUSED_KINDS), ids=list(REFUSED_KINDS.values()))
def test_links_devices_and_fifos_are_refused_naming_the_member(tmp_path: Path, kind: bytes) -> None:
    data = tar_of(("a/ok.txt", b"fine"), entry("a/odd", kind, link="/etc/passwd"))
    assert refusal(data, tmp_path) == f'holds {REFUSED_KINDS[kind]}, "a/odd"; only regular files and folders are unpacked'


@pytest.mark.parametrize(("name", "said"), [
    ("../escape.txt", 'holds a member whose name leaves its folder, "../escape.txt"'),
    ("a/../../escape.txt", 'holds a member whose name leaves its folder, "a/../../escape.txt"'),
    ("/etc/escape.txt", 'holds a member with an absolute name, "/etc/escape.txt"'),
])
def test_names_leaving_the_folder_are_refused(tmp_path: Path, name: str, said: str) -> None:
    assert refusal(tar_of((name, b"x")), tmp_path) == said
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out" / "escape.txt").exists()


def test_a_name_too_long_for_the_filesystem_is_refused_sanitised(tmp_path: Path) -> None:
    said = refusal(tar_of(("a/" + "n" * 300 + ".json", b"{}")), tmp_path)
    assert said.startswith('holds a member whose name cannot be a file name here, "a/nnnn')
    assert "(File name too long)" in said and len(said) < SHOWN_NAME_CHARS + 100


def test_member_names_are_shown_sanitised(tmp_path: Path) -> None:
    hostile = "model\x1b[2J\r\nERROR: all is fine\x07" + "x" * 5000
    said = refusal(tar_of(entry(hostile, tarfile.SYMTYPE, link="/")), tmp_path)
    assert said.isprintable()
    assert said.startswith('holds a symbolic link, "model?[2J??ERROR: all is fine?xxx')
    assert len(said) < SHOWN_NAME_CHARS + 100


@pytest.mark.parametrize("kind", [*COMPRESSORS, "zstd"])
def test_compressed_tars_are_refused_by_their_magic_bytes(tmp_path: Path, kind: str) -> None:
    data = bomb_start(COMPRESSORS[kind]) if kind in COMPRESSORS else b"\x28\xb5\x2f\xfd" + bytes(1000)
    assert refusal(data, tmp_path).startswith(f"is {kind}-compressed; only uncompressed tars are accepted")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("cut", ["at the last member boundary", "inside a member", "inside a header"])
def test_a_cut_tar_is_refused(tmp_path: Path, cut: str) -> None:
    data = tar_of(("a.bin", os.urandom(5000)), ("b.bin", os.urandom(700)))
    cut_data = {"at the last member boundary": without_end(data), "inside a member": data[:2000],
                "inside a header": without_end(data)[:512 * 11 + 100]}[cut]
    said = refusal(cut_data, tmp_path)
    assert said in ("ends without its end-of-archive blocks: it was cut short or is damaged",
                    'ends inside "a.bin": it was cut short', 'ends inside "b.bin": it was cut short')


def test_a_file_named_twice_is_refused(tmp_path: Path) -> None:
    assert refusal(tar_of(("a", b"first"), ("a", b"second")), tmp_path) == 'holds "a" twice'
    assert (tmp_path / "out" / "a").read_bytes() == b"first"
    assert refusal(tar_of(entry("a", tarfile.DIRTYPE), ("a", b"x")), tmp_path / "folder") == 'holds "a" twice'


def test_a_member_below_a_file_of_the_same_name_is_refused(tmp_path: Path) -> None:
    for number, below in enumerate([("a/b", b"x"), ("a/b/c", b"x"), entry("a/b", tarfile.DIRTYPE)]):
        said = refusal(tar_of(("a", b"file"), below), tmp_path / str(number))
        name = below.name if isinstance(below, tarfile.TarInfo) else below[0]
        assert said == f'holds "{name}" below a file of the same name'


def test_a_member_name_with_control_characters_is_refused_shown_sanitised(tmp_path: Path) -> None:
    said = refusal(tar_of(("lora\x1b[31m\r\nERROR\x7f\u202e.safetensors", b"x")), tmp_path)
    assert said == 'holds a member whose name has control characters, "lora?[31m??ERROR??.safetensors"'
    assert said.isprintable() and list((tmp_path / "out").iterdir()) == []


def test_a_file_without_a_name_is_refused(tmp_path: Path) -> None:
    for number, name in enumerate(["", ".", "./", "././/."]):
        assert refusal(tar_of((name, b"x")), tmp_path / str(number)) == f'holds a file without a name, "{name}"'


# tarfile reads READ_BYTES at a time after the MAGIC_BYTES (6) sniffed for compression, so its reads end 6 bytes
# into a block: end-of-archive blocks starting at READ_BYTES cross a read boundary, one block earlier they need bytes
# tarfile has not read yet, later ones lie just past a read. The source's own reads are shorter than a block, as a
# slow socket's are: the BufferedReader must still hand tarfile whole reads.
END_OFFSETS = [READ_BYTES + blocks * tarfile.BLOCKSIZE for blocks in range(-3, 4)] + [
    2 * READ_BYTES - tarfile.BLOCKSIZE, 2 * READ_BYTES]
READERS: dict[str, Callable[[bytes], io.BufferedReader]] = {
    "whole reads": lambda data: io.BufferedReader(io.BytesIO(data), 4 * 1024**2),
    "333-byte reads": lambda data: io.BufferedReader(Trickle(data, step=333)),
}


def tar_ending_at(end: int) -> tuple[bytes, bytes]:
    """A tar of a small file and a big one whose data (padding included) ends at `end`, where its end blocks start."""
    big = os.urandom(end - 3 * tarfile.BLOCKSIZE - 7)
    data = tar_of(("small.txt", b"hi"), ("big.bin", big))
    assert len(without_end(data)) == end
    return data, big


@pytest.mark.parametrize("reads", list(READERS))
def test_end_blocks_are_found_wherever_they_fall_against_the_reads(tmp_path: Path, reads: str) -> None:
    for end in END_OFFSETS:
        data, big = tar_ending_at(end)
        unpack(READERS[reads](data), tmp_path / str(end), LIMITS)
        assert (tmp_path / str(end) / "big.bin").read_bytes() == big
        assert (tmp_path / str(end) / "small.txt").read_bytes() == b"hi"


@pytest.mark.parametrize("reads", list(READERS))
def test_end_blocks_cut_or_replaced_by_junk_are_refused_wherever_they_fall(tmp_path: Path, reads: str) -> None:
    junk = b"not a tar header, junk after the last member\n" * 40
    for end in END_OFFSETS:
        cut = without_end(tar_ending_at(end)[0])
        for number, ending in enumerate([b"", bytes(tarfile.BLOCKSIZE), junk, bytes(tarfile.BLOCKSIZE) + junk]):
            with pytest.raises(TarRefused) as caught:
                unpack(READERS[reads](cut + ending), tmp_path / f"{end}-{number}", LIMITS)
            assert str(caught.value) == "ends without its end-of-archive blocks: it was cut short or is damaged"


@pytest.mark.parametrize(("limits", "said"), [
    (TarLimits(max_members=2, max_bytes=10**6), "holds more than 2 members"),
    (TarLimits(max_members=100, max_bytes=1000), "holds more than 1000 bytes of files"),
])
def test_member_count_and_total_size_are_bounded(tmp_path: Path, limits: TarLimits, said: str) -> None:
    data = tar_of(("a", bytes(600)), ("b", bytes(600)), ("c", b""))
    assert refusal(data, tmp_path, limits) == said


def test_a_tree_someone_else_unpacked_holds_only_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "ok").write_bytes(b"x")
    check_tree(tmp_path / "tree", LIMITS)
    os.link(tmp_path / "tree" / "sub" / "ok", tmp_path / "outside")
    with pytest.raises(TarRefused, match=r'^holds a hard link, "sub/ok"'):
        check_tree(tmp_path / "tree", LIMITS)
    (tmp_path / "outside").unlink()
    (tmp_path / "tree" / "sub" / "up").symlink_to("/")
    with pytest.raises(TarRefused, match=r'^holds a symbolic link, "sub/up"'):
        check_tree(tmp_path / "tree", LIMITS)


# --- weights tars -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def safety_tar(tiny_weights: Path) -> bytes:
    return folder_tar(tiny_weights / "safety")


def layout_without_safety(root: Path, tiny_weights: Path) -> WeightsLayout:
    """A weights directory lacking only safety/ (the other folders link to the tiny weights)."""
    root.mkdir()
    for folder in ("flux-dev", "flux-schnell", "lassie"):
        os.symlink(tiny_weights / folder, root / folder)
    return WeightsLayout(root)


def entries_of(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir())


def fetch_safety(layout: WeightsLayout, url: str) -> str:
    with pytest.raises(ProvisionError) as caught:
        fetch_missing_folders(layout, Settings.from_env({"LASSIE_SAFETY_URL": url}), options=SMALL_CHUNKS)
    assert entries_of(layout.root) == [".fetching.lock", "flux-dev", "flux-schnell", "lassie"]
    return str(caught.value)


def cve_2025_4517_chain(outside: Path) -> bytes:
    """The shape of CVE-2025-4517's tar: symlinks through folder names so long that the resolved
    path passes PATH_MAX, where Python before 3.11.13 stops checking, then a link through them to
    `outside` and a file written through that link."""
    long_name = "d" * 247
    steps = "abcdefghijklmnop"
    members: list[tarfile.TarInfo | tuple[str, bytes]] = []
    path = ""
    for step in steps:
        members.append(entry(f"{path}{long_name}", tarfile.DIRTYPE))
        members.append(entry(f"{path}{step}", tarfile.SYMTYPE, link=long_name))
        path = f"{path}{long_name}/"
    link_path = "/".join(steps) + "/" + "l" * 254
    members.append(entry(link_path, tarfile.SYMTYPE, link="../" * len(steps)))
    # Spelled out, `escape` stays inside (as many `..` as link_path has parts); resolved, link_path
    # is the folder itself and the `..` climb to `/`.
    climb = "../" * (len(steps) + 1)
    members.append(entry("escape", tarfile.SYMTYPE, link=f"{link_path}/{climb}{str(outside).lstrip('/')}"))
    members.append(("escape/written.txt", b"outside the weights"))
    return tar_of(*members)


def test_a_weights_tar_with_the_cve_2025_4517_link_chain_writes_nothing_anywhere(
        tiny_weights: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    layout = layout_without_safety(tmp_path / "weights", tiny_weights)
    with RangeServer() as host:
        said = fetch_safety(layout, host.serve("/safety.tar", cve_2025_4517_chain(outside)))
    assert 'holds a symbolic link, "a"; only regular files and folders are unpacked' in said
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("kind", list(COMPRESSORS))
def test_a_compressed_weights_tar_is_refused_naming_its_compression(
        safety_tar: bytes, tiny_weights: Path, tmp_path: Path, kind: str) -> None:
    layout = layout_without_safety(tmp_path / "weights", tiny_weights)
    with RangeServer() as host:
        said = fetch_safety(layout, host.serve(f"/safety.tar.{kind}", COMPRESSORS[kind](safety_tar)))
    assert f"safety.tar.{kind} is {kind}-compressed; only uncompressed tars are accepted" in said


@contextmanager
def unsized_host(body: bytes) -> Iterator[str]:
    """A host that sends `body` without Content-Length and closes: a cut cannot be seen in HTTP."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: object) -> None:
            """Quiet."""

        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/safety.tar"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("host_kind", ["no Content-Length", "short Content-Length, ranges", "short, one stream"])
def test_a_weights_tar_cut_at_a_member_boundary_puts_nothing_in_place(
        safety_tar: bytes, tiny_weights: Path, tmp_path: Path, host_kind: str) -> None:
    cut = without_end(safety_tar)
    layout = layout_without_safety(tmp_path / "weights", tiny_weights)
    if host_kind == "no Content-Length":
        with unsized_host(cut) as url:
            said = fetch_safety(layout, url)
    else:
        with RangeServer(ranges=host_kind.endswith("ranges")) as host:
            said = fetch_safety(layout, host.serve("/safety.tar", cut))
    assert "safety.tar ends without its end-of-archive blocks: it was cut short or is damaged" in said


def damaged(tar: bytes, member: str, data: bytes) -> bytes:
    """`tar` with one member's bytes replaced."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(tar)) as source, tarfile.open(fileobj=out, mode="w") as copy:
        for info in source:
            content = source.extractfile(info).read() if info.isfile() else b""
            if info.name == member:
                content = data
            info.size = len(content)
            copy.addfile(info, io.BytesIO(content))
    return out.getvalue()


COMPVIS_WEIGHTS = "compvis/model.safetensors"
DAMAGES = {
    "0-byte safetensors": (COMPVIS_WEIGHTS, lambda data: b"",
                           "is not a usable .safetensors file: it is empty or truncated (0 bytes)"),
    "truncated safetensors": (COMPVIS_WEIGHTS, lambda data: data[:len(data) - 100],
                              "is not a usable .safetensors file: the file is truncated"),
    "bad JSON": ("falcon/config.json", lambda data: data[:len(data) // 2], "is not valid JSON"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_fetched_folder_with_a_damaged_file_is_refused(safety_tar: bytes, tiny_weights: Path,
                                                         tmp_path: Path, damage: str) -> None:
    member, change, said = DAMAGES[damage]
    original = (tiny_weights / "safety" / member).read_bytes()
    layout = layout_without_safety(tmp_path / "weights", tiny_weights)
    with RangeServer() as host:
        message = fetch_safety(layout, host.serve("/safety.tar", damaged(safety_tar, member, change(original))))
    assert f"safety.tar safety/{member} {said}" in message


# --- damaged folders in place, at a start -------------------------------------------------------


def layout_with_own_safety(root: Path, tiny_weights: Path) -> WeightsLayout:
    """A complete weights directory whose safety/ is a copy (the test damages it)."""
    layout = layout_without_safety(root, tiny_weights)
    shutil.copytree(tiny_weights / "safety", root / "safety")
    return layout


def cut_in_place(layout: WeightsLayout) -> None:
    weights = layout.root / "safety" / COMPVIS_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])


def test_a_damaged_folder_in_place_is_fetched_again_once_at_the_next_start(
        safety_tar: bytes, tiny_weights: Path, tmp_path: Path) -> None:
    layout = layout_with_own_safety(tmp_path / "weights", tiny_weights)
    cut_in_place(layout)
    with RangeServer() as host:
        settings = Settings.from_env({"LASSIE_SAFETY_URL": host.serve("/safety.tar", safety_tar)})
        ensure_weights(layout, settings)
        assert host.count("/safety.tar") == 1
        assert (layout.root / "safety" / COMPVIS_WEIGHTS).read_bytes() == \
            (tiny_weights / "safety" / COMPVIS_WEIGHTS).read_bytes()
        ensure_weights(layout, settings)  # sound now: nothing fetched
        assert host.count("/safety.tar") == 1


def test_a_damaged_folder_whose_tar_is_damaged_too_fails_setup_naming_both(
        safety_tar: bytes, tiny_weights: Path, tmp_path: Path) -> None:
    layout = layout_with_own_safety(tmp_path / "weights", tiny_weights)
    cut_in_place(layout)
    kept = (layout.root / "safety" / COMPVIS_WEIGHTS).read_bytes()
    bad = damaged(safety_tar, COMPVIS_WEIGHTS, b"")
    with RangeServer() as host:
        lassie = Lassie(Settings.from_env({"LASSIE_WEIGHTS_DIR": str(layout.root),
                                           "LASSIE_SAFETY_URL": host.serve("/safety.tar", bad)}))
        with pytest.raises(ProvisionError) as caught:
            lassie.setup()
        assert host.count("/safety.tar") == 1
    message = str(caught.value)
    assert f"fetching {layout.root / 'safety'} failed" in message
    assert f"safety/{COMPVIS_WEIGHTS} is not a usable .safetensors file: it is empty or truncated" in message
    assert (layout.root / "safety" / COMPVIS_WEIGHTS).read_bytes() == kept and lassie.models is None


def cut_index_in_place(layout: WeightsLayout) -> None:
    """compvis/ as a sharded checkpoint whose index is cut: no shard can be found from it."""
    (layout.root / "safety" / COMPVIS_WEIGHTS).unlink()
    (layout.root / "safety" / f"{COMPVIS_WEIGHTS}.index.json").write_text('{"weight_map": {"a": "model-0')


@pytest.mark.parametrize(("damage", "said"), [
    (cut_in_place, f"safety/{COMPVIS_WEIGHTS} is not a usable .safetensors file: the file is truncated"),
    (cut_index_in_place, f"safety/{COMPVIS_WEIGHTS}.index.json is not valid JSON"),
], ids=["truncated safetensors", "cut index"])
def test_a_damaged_folder_without_a_url_fails_setup_naming_it_and_what_is_wrong(
        tiny_weights: Path, tmp_path: Path, damage: Callable[[WeightsLayout], None], said: str) -> None:
    layout = layout_with_own_safety(tmp_path / "weights", tiny_weights)
    damage(layout)
    lassie = Lassie(Settings.from_env({"LASSIE_WEIGHTS_DIR": str(layout.root)}))
    with pytest.raises(ProvisionError) as caught:
        lassie.setup()
    assert f"{layout.root / 'safety'} is damaged: {said}" in str(caught.value)
    assert "LASSIE_WEIGHTS_URL" in str(caught.value) and lassie.models is None


def test_download_weights_refetches_a_damaged_folder_and_names_one_it_cannot(
        safety_tar: bytes, tiny_weights: Path, tmp_path: Path) -> None:
    layout = layout_with_own_safety(tmp_path / "weights", tiny_weights)
    cut_in_place(layout)
    with pytest.raises(ProvisionError, match=rf"{layout.root / 'safety'} is damaged: safety/{COMPVIS_WEIGHTS} is not"):
        provision_from_tars(layout.root, Settings.from_env({"LASSIE_FLUX_DEV_URL": "http://127.0.0.1:9/dev.tar"}))
    with RangeServer() as host:
        url = host.serve("/safety.tar", safety_tar)
        assert provision_from_tars(layout.root, Settings.from_env({"LASSIE_SAFETY_URL": url})) == ["safety"]
    assert (layout.root / "safety" / COMPVIS_WEIGHTS).read_bytes() == \
        (tiny_weights / "safety" / COMPVIS_WEIGHTS).read_bytes()


# --- pget's output ------------------------------------------------------------------------------


@pytest.mark.parametrize(("made", "said"), [
    ('ln -s / "$3/compvis/up"', 'holds a symbolic link, "compvis/up"'),
    ('ln "$3/compvis/config.json" "$3/../linked"', 'holds a hard link, "compvis/config.json"'),
])
def test_pget_output_with_links_is_not_put_in_place(tiny_weights: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, made: str, said: str) -> None:
    fake = tmp_path / "bin" / "pget"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\ncp -r "{tiny_weights / "safety"}" "$3"\n{made}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    layout = layout_without_safety(tmp_path / "weights", tiny_weights)
    with pytest.raises(ProvisionError) as caught:
        fetch_missing_folders(layout, Settings.from_env({"LASSIE_SAFETY_URL": "http://127.0.0.1:9/safety.tar"}))
    assert f"safety.tar, as pget unpacked it, {said}" in str(caught.value)
    assert entries_of(layout.root) == [".fetching.lock", "flux-dev", "flux-schnell", "lassie"]


# --- LoRA tars: COG_WEIGHTS and extra_lora ------------------------------------------------------


@pytest.mark.parametrize("kind", list(COMPRESSORS))
def test_a_compressed_cog_weights_tar_is_refused_naming_its_compression(tmp_path: Path, kind: str) -> None:
    with RangeServer() as host:
        url = host.serve(f"/trained_model.tar.{kind}", COMPRESSORS[kind](training_output_tar(make_lora(3))))
        with pytest.raises(ProvisionError, match=f"it is {kind}-compressed; only uncompressed tars are accepted"):
            resolve(WeightsLayout(tmp_path / "weights"), Settings.from_env({}, cog_weights=url))
    assert list((tmp_path / "weights" / "fetched-lora").glob("*/lora.safetensors")) == []


def test_a_cog_weights_tar_with_a_link_is_refused(tmp_path: Path) -> None:
    archive = make_tar({"output/lora.safetensors": make_lora(3)}, links={"output/config.yaml": "/etc/passwd"})
    with RangeServer() as host:
        url = host.serve("/trained_model.tar", archive)
        with pytest.raises(ProvisionError, match=r'holds a symbolic link, "output/config\.yaml"'):
            resolve(WeightsLayout(tmp_path / "weights"), Settings.from_env({}, cog_weights=url))


@pytest.mark.parametrize("kind", list(COMPRESSORS))
def test_a_compressed_extra_lora_tar_is_refused_naming_its_compression(
        services: FakeServices, tmp_path: Path, kind: str) -> None:
    services.add_replicate_model("alice", "bomb", COMPRESSORS[kind](make_tar({"lora.safetensors": make_lora(1)})))
    cache = LoraCache(services.settings(min_free_bytes=0), tmp_path / "lora-cache")
    with pytest.raises(InputError, match=f"Replicate model alice/bomb is {kind}-compressed"):
        cache.fetch(identify("alice/bomb"))
    assert cache.cached_files() == [] and list(cache.staging_dir.iterdir()) == []


def test_an_extra_lora_tar_cut_at_a_member_boundary_is_refused(
        services: FakeServices, tmp_path: Path) -> None:
    services.add_replicate_model("alice", "cut", without_end(make_tar({"lora.safetensors": make_lora(1)})))
    cache = LoraCache(services.settings(min_free_bytes=0), tmp_path / "lora-cache")
    with pytest.raises(InputError, match="Replicate model alice/cut ends without its end-of-archive blocks"):
        cache.fetch(identify("alice/cut"))
    assert cache.cached_files() == []

