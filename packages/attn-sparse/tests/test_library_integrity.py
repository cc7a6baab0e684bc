"""Layout files: bounded reads (FIFO, devices, huge and truncated files), per-entry digests, the
rebuild check, format 1 files, atomic saves, and BlockLayout.save/load on the library's format."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import pytest
import torch

from attn_sparse import BlockLayout, PatternLibrary, bigbird, causal, local_window
from attn_sparse.library import FORMAT_NAME
from attn_sparse.library_format import entry_digest


def _library() -> PatternLibrary:
    lib = PatternLibrary()
    lib.add_pattern("win", "local_window", seq_len=300, window=40, block_size=[16, 32])
    lib.add_pattern("causal", "causal", seq_len=200, block_size=16)
    lib.add("custom", BlockLayout.from_dense(torch.tensor([[[True, False], [True, True]]]), 64), params={"n": 1})
    return lib


def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _edit_entries(data: bytes, edit) -> bytes:  # type: ignore[no-untyped-def]
    header, body = _split(data)
    entries = json.loads(header["__metadata__"]["entries"])
    edit(entries)
    header["__metadata__"]["entries"] = json.dumps(entries)
    return _join(header, body)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "lib.safetensors"
    _library().save(path)
    return path


# ---------------------------------------------------------------- bounded reads
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    result: list[BaseException] = []

    def load() -> None:
        try:
            PatternLibrary.load(fifo)
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(timeout=10)
    if t.is_alive():  # unblock the reader so the test process can exit, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("loading a FIFO blocked")
    assert isinstance(result[0], ValueError) and "not a regular file" in str(result[0])
    with pytest.raises(ValueError, match="not a regular file"):
        BlockLayout.load(fifo)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_devices_and_directories_are_refused(device: str, tmp_path: Path) -> None:
    if not os.path.exists(device):
        pytest.skip(f"{device} does not exist here")
    with pytest.raises(ValueError, match="not a regular file"):
        PatternLibrary.load(device)
    with pytest.raises(ValueError, match="not a regular file"):
        PatternLibrary.load(tmp_path)


def test_large_sparse_garbage_is_rejected_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    with open(path, "wb") as f:  # 2 GiB, sparse: nothing but the first bytes is written
        f.write(b"\xff" * 8)
        f.truncate(2**31)
    with pytest.raises(ValueError, match="header size"):
        PatternLibrary.load(path, max_bytes=2**32)
    with pytest.raises(ValueError, match="max_bytes"):  # and the default bound refuses it before reading
        PatternLibrary.load(path, max_bytes=2**31 - 1)
    # a plausible header followed by sparse zeros: rejected once the header is read (declared sizes)
    header = _join({"__metadata__": {"format": FORMAT_NAME, "format_version": "2", "entries": "[]"}}, b"")
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(2**31)
    with pytest.raises(ValueError, match="declares 0 data bytes"):
        PatternLibrary.load(path, max_bytes=2**32)


def test_truncated_and_extended_files(saved: Path, tmp_path: Path) -> None:
    data = saved.read_bytes()
    path = tmp_path / "cut.safetensors"
    for cut in (0, 4, 8, 20, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="invalid pattern library"):
            PatternLibrary.load(path)
    path.write_bytes(data + b"\0")
    with pytest.raises(ValueError, match="data bytes"):
        PatternLibrary.load(path)


# ---------------------------------------------------------------- integrity
def test_tampered_metadata_is_detected(saved: Path, tmp_path: Path) -> None:
    data = saved.read_bytes()
    path = tmp_path / "t.safetensors"

    def rewrite_kind(entries: list) -> None:
        e = next(e for e in entries if e["name"] == "win")
        e["kind"], e["params"] = "causal", {"seq_len": 300, "block_size": [16, 32]}

    def rewrite_params(entries: list) -> None:
        next(e for e in entries if e["name"] == "win")["params"]["window"] = 41

    for edit in (rewrite_kind, rewrite_params):
        path.write_bytes(_edit_entries(data, edit))
        with pytest.raises(ValueError, match=r"entry 'win': sha256 does not match"):
            PatternLibrary.load(path)


def test_tampered_digest_is_detected(saved: Path, tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"

    def flip(entries: list) -> None:
        e = entries[0]
        e["sha256"] = ("0" if e["sha256"][0] != "0" else "1") + e["sha256"][1:]

    path.write_bytes(_edit_entries(saved.read_bytes(), flip))
    with pytest.raises(ValueError, match="sha256 does not match"):
        PatternLibrary.load(path)
    path.write_bytes(_edit_entries(saved.read_bytes(), lambda es: es[0].update(sha256="xyz")))
    with pytest.raises(ValueError, match="64 lowercase hex"):
        PatternLibrary.load(path)


def test_every_valid_column_edit_is_detected(tmp_path: Path) -> None:
    # each column index rewritten to every other value: many such edits are valid CSR (another
    # layout), which loaded silently before the digest
    lib = PatternLibrary()
    lib.add_pattern("w", "local_window", seq_len=160, window=20, block_size=16)
    path = tmp_path / "w.safetensors"
    lib.save(path)
    header, body = _split(path.read_bytes())
    begin = header["w/col_indices"]["data_offsets"][0]
    nnz, nk = lib["w"].nnz, lib["w"].num_key_blocks
    valid_csr = 0
    for i in range(nnz):
        for value in range(nk):
            old = struct.unpack_from("<i", body, begin + 4 * i)[0]
            if value == old:
                continue
            edited = bytearray(body)
            struct.pack_into("<i", edited, begin + 4 * i, value)
            col = torch.frombuffer(bytearray(edited[begin : begin + 4 * nnz]), dtype=torch.int32)
            try:
                BlockLayout.from_csr(lib["w"].crow_indices, col.clone(), block_size=16, num_key_blocks=nk)
                valid_csr += 1
            except ValueError:
                pass
            with pytest.raises(ValueError, match="sha256 does not match"):
                PatternLibrary.from_bytes(_join(header, bytes(edited)))
    assert valid_csr > 0  # the digest, not the CSR checks, caught these


def test_rebuild_catches_a_forged_digest(saved: Path, tmp_path: Path) -> None:
    # someone who rewrites the recipe can recompute the digest (it is not a signature): the
    # rebuild check compares the tiles with what the recipe builds
    def forge(entries: list) -> None:
        e = next(e for e in entries if e["name"] == "win")
        e["params"]["window"] = 100
        meta = {k: v for k, v in e.items() if k != "sha256"}
        lay = _library()["win"]
        e["sha256"] = entry_digest(meta, lay.crow_indices, lay.col_indices)

    path = tmp_path / "forged.safetensors"
    path.write_bytes(_edit_entries(saved.read_bytes(), forge))
    assert PatternLibrary.load(path).params("win")["window"] == 100  # the digest matches
    with pytest.raises(ValueError, match=r"entry 'win': the layout rebuilt from local_window.*differs"):
        PatternLibrary.load(path, verify="rebuild")
    assert PatternLibrary.load(saved, verify="rebuild") == _library()
    with pytest.raises(ValueError, match="verify must be one of"):
        PatternLibrary.load(saved, verify="none")


def test_format_1_files_load_only_with_rebuild(saved: Path, tmp_path: Path) -> None:
    def to_v1(data: bytes) -> bytes:
        header, body = _split(data)
        entries = json.loads(header["__metadata__"]["entries"])
        for e in entries:
            del e["sha256"]
        header["__metadata__"].update(format_version="1", entries=json.dumps(entries))
        return _join(header, body)

    path = tmp_path / "v1.safetensors"
    path.write_bytes(to_v1(saved.read_bytes()))
    with pytest.raises(ValueError, match=r"format_version 1 files carry no integrity digests.*verify='rebuild'"):
        PatternLibrary.load(path)
    lib = PatternLibrary.load(path, verify="rebuild")
    assert lib == _library()
    lib.save(tmp_path / "v2.safetensors")  # upgraded
    assert PatternLibrary.load(tmp_path / "v2.safetensors") == lib
    with pytest.raises(ValueError, match="format_version 1"):
        BlockLayout.load(path, name="win")

    forged = PatternLibrary()
    forged.add_pattern("win", "local_window", seq_len=300, window=41, block_size=[16, 32])
    tampered = _edit_entries(
        to_v1(saved.read_bytes()), lambda es: es[2].update(params={"seq_len": 300, "window": 0, "block_size": [16, 32]})
    )
    path.write_bytes(tampered)
    with pytest.raises(ValueError, match="entry 'win': the layout rebuilt"):
        PatternLibrary.load(path, verify="rebuild")


def test_rebuild_refuses_a_device_in_the_recipe(saved: Path, tmp_path: Path) -> None:
    def add_device(entries: list) -> None:
        e = next(e for e in entries if e["name"] == "causal")
        e["params"]["device"] = "cuda:7"
        meta = {k: v for k, v in e.items() if k != "sha256"}
        lay = _library()["causal"]
        e["sha256"] = entry_digest(meta, lay.crow_indices, lay.col_indices)

    path = tmp_path / "d.safetensors"
    path.write_bytes(_edit_entries(saved.read_bytes(), add_device))
    with pytest.raises(ValueError, match=r"entry 'causal': its recipe causal.*does not build"):
        PatternLibrary.load(path, verify="rebuild")


# ---------------------------------------------------------------- saving
def test_save_to_a_directory_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "dir.safetensors"
    target.mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        _library().save(target)
    with pytest.raises(ValueError, match="not a regular file"):
        causal(64, block_size=16).save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.safetensors"]
    with pytest.raises(FileNotFoundError):
        _library().save(tmp_path / "missing" / "lib.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.safetensors"]


def test_save_failure_removes_the_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _library().save(tmp_path / "lib.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- BlockLayout.save / load
@pytest.mark.parametrize(
    "layout",
    [
        local_window(300, 40, block_size=(16, 32)),
        causal(1000, block_size=64),
        bigbird(500, 32, 32, 2, num_heads=3, block_size=(32, 16), seed=5),
        BlockLayout.from_dense(torch.zeros(2, 3, 4, dtype=torch.bool), 16),
    ],
    ids=["window-16x32", "causal-64", "bigbird-per-head", "empty-per-head"],
)
def test_block_layout_round_trip(layout: BlockLayout, tmp_path: Path) -> None:
    path = tmp_path / "layout.safetensors"
    layout.save(path)
    back = BlockLayout.load(path)
    assert back == layout and back.block_size == layout.block_size and back.shape == layout.shape
    assert back.crow_indices.dtype == torch.int32 and back.col_indices.dtype == torch.int32
    assert BlockLayout.load(path, device=torch.device("cpu")) == layout
    lib = PatternLibrary.load(path)  # the library's format: one custom entry
    assert lib.names() == ["layout"] and lib.kind("layout") == "custom" and lib["layout"] == layout


def test_block_layout_load_from_a_library_and_bad_files(saved: Path, tmp_path: Path) -> None:
    assert BlockLayout.load(saved, name="win") == _library()["win"]
    with pytest.raises(ValueError, match=r"holds 3 layouts.*pass name="):
        BlockLayout.load(saved)
    with pytest.raises(ValueError, match="no layout named 'nope'"):
        BlockLayout.load(saved, name="nope")
    with pytest.raises(ValueError, match="device must name a torch device"):
        BlockLayout.load(saved, name="win", device="bogus")
    bad = tmp_path / "bad.safetensors"
    for data in (b"", b"\x00" * 7, saved.read_bytes()[:-3], struct.pack("<Q", 2**40) + b"{}"):
        bad.write_bytes(data)
        with pytest.raises(ValueError, match="invalid layout file"):
            BlockLayout.load(bad)
    with pytest.raises(FileNotFoundError):
        BlockLayout.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="max_bytes"):
        BlockLayout.load(saved, name="win", max_bytes=10)


def test_library_block_size_bound_on_load(tmp_path: Path) -> None:
    # a file declaring block_size 2**40 (digest consistent) is refused by the geometry bounds
    crow, col = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    entry = {
        "name": "a",
        "kind": "custom",
        "params": {},
        "block_size": [2**40, 2**40],
        "num_heads": 1,
        "num_query_blocks": 1,
        "num_key_blocks": 1,
        "nnz": 1,
    }
    entry["sha256"] = entry_digest(entry, crow, col)
    meta = {"format": FORMAT_NAME, "format_version": "2", "entries": json.dumps([entry])}
    table = {
        "a/crow_indices": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]},
        "a/col_indices": {"dtype": "I32", "shape": [1], "data_offsets": [8, 12]},
    }
    data = _join({"__metadata__": meta, **table}, struct.pack("<3i", 0, 1, 0))
    with pytest.raises(ValueError, match=r"block sizes must be powers of two in \[16, 1024\]"):
        PatternLibrary.from_bytes(data)


def test_saved_file_mode_follows_the_umask(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    path = tmp_path / "lib.safetensors"
    _library().save(path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
