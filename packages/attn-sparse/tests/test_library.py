"""PatternLibrary: safetensors round trip, LRU cache by bytes, and a loader that rejects every bad file with ValueError."""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attn_sparse import BlockLayout, LayoutCache, PatternLibrary, bigbird, local_window
from attn_sparse.library import FORMAT_NAME, FORMAT_VERSION
from attn_sparse.library_format import entry_digest


def _library() -> PatternLibrary:
    lib = PatternLibrary()
    lib.add_pattern("win", "local_window", seq_len=300, window=40, block_size=[16, 32])
    lib.add_pattern(
        "bb.heads",
        "bigbird",
        seq_len=256,
        window=16,
        global_tokens=16,
        random_blocks=2,
        seed=3,
        num_heads=2,
        block_size=32,
    )
    lib.add(
        "custom-1",
        BlockLayout.from_dense(torch.tensor([[[True, False], [True, True]]]), 64),
        params={"note": "hand made"},
    )
    lib.add("empty", BlockLayout.from_dense(torch.zeros(1, 2, 3, dtype=torch.bool), 16))
    return lib


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("lib") / "lib.safetensors"
    _library().save(path)
    return path.read_bytes()


def test_round_trip(tmp_path: Path) -> None:
    lib = _library()
    path = tmp_path / "patterns.safetensors"
    lib.save(path)
    back = PatternLibrary.load(path)
    assert back == lib
    assert back.names() == ["bb.heads", "custom-1", "empty", "win"]
    assert back["win"] == local_window(300, 40, block_size=(16, 32))
    assert back["bb.heads"] == bigbird(256, 16, 16, 2, seed=3, num_heads=2, block_size=32)
    assert back.kind("win") == "local_window" and back.kind("custom-1") == "custom"
    assert back.params("bb.heads")["seed"] == 3
    assert back.params("custom-1") == {"note": "hand made"}
    assert "win" in back and len(back) == 4
    back.remove("win")
    assert back != lib


def test_add_pattern_keeps_the_recipe_without_the_build_device(tmp_path: Path) -> None:
    lib = PatternLibrary()
    built = lib.add_pattern("w", "local_window", seq_len=200, window=30, block_size=32, device="cpu")
    assert lib.params("w") == {"seq_len": 200, "window": 30, "block_size": 32}
    lib.save(tmp_path / "w.safetensors")
    back = PatternLibrary.load(tmp_path / "w.safetensors")
    assert back["w"] == built and "device" not in back.params("w")


def test_entry_validation() -> None:
    lib = PatternLibrary()
    layout = local_window(64, 4, block_size=16)
    for bad in ("", "a/b", ".hidden", "x" * 200, 3):
        with pytest.raises(ValueError, match="name"):
            lib.add(bad, layout)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="BlockLayout"):
        lib.add("x", "layout")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        lib.add("x", layout, kind="mystery")
    with pytest.raises(TypeError, match="JSON"):
        lib.add("x", layout, params={"f": object()})
    with pytest.raises(TypeError, match="JSON"):
        lib.add("x", layout, params={"f": float("nan")})
    with pytest.raises(KeyError, match="nothing"):
        lib["nothing"]


def test_cache_is_lru_and_bounded_by_bytes() -> None:
    sizes = {w: local_window(4096, w, block_size=16).nbytes for w in (64, 63, 62)}
    assert sizes[62] <= sizes[63]
    cache = LayoutCache(max_bytes=sizes[64] + sizes[63])
    a = cache.get("local_window", seq_len=4096, window=64, block_size=16)
    assert cache.get("local_window", block_size=16, window=64, seq_len=4096) is a  # key order does not matter
    assert (cache.hits, cache.misses) == (1, 1)
    cache.get("local_window", seq_len=4096, window=63, block_size=16)
    cache.get("local_window", seq_len=4096, window=64, block_size=16)  # refresh a
    cache.get("local_window", seq_len=4096, window=62, block_size=16)  # evicts window=63, the least recent
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    assert cache.get("local_window", seq_len=4096, window=64, block_size=16) is a
    misses = cache.misses
    cache.get("local_window", seq_len=4096, window=63, block_size=16)
    assert cache.misses == misses + 1
    tiny = LayoutCache(max_bytes=1)
    tiny.get("causal", seq_len=64, block_size=16)
    assert len(tiny) == 0 and tiny.nbytes == 0
    with pytest.raises(ValueError, match="max_bytes"):
        LayoutCache(max_bytes=-1)


def test_cache_is_thread_safe() -> None:
    cache = LayoutCache(max_bytes=3 * local_window(2048, 32, block_size=16).nbytes)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(30):
                w = 32 + (seed * 7 + i) % 5
                lay = cache.get("local_window", seq_len=2048, window=w, block_size=16)
                assert lay == local_window(2048, w, block_size=16)
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.nbytes <= cache.max_bytes


# ---------------------------------------------------------------- hostile files
def _file(header: dict, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _meta(entries: list, version: str = str(FORMAT_VERSION)) -> dict:
    return {"format": FORMAT_NAME, "format_version": version, "entries": json.dumps(entries)}


def _entry(crow: tuple[int, ...] = (0, 1), col: tuple[int, ...] = (0,), **over: object) -> dict:
    """An entry signed for the tensors ``crow``, ``col`` (the digest checks pass; later checks are tested)."""
    e = {
        "name": "a",
        "kind": "custom",
        "params": {},
        "block_size": [16, 16],
        "num_heads": 1,
        "num_query_blocks": 1,
        "num_key_blocks": 1,
        "nnz": 1,
    }
    e.update(over)
    e["sha256"] = entry_digest(e, torch.tensor(crow, dtype=torch.int32), torch.tensor(col, dtype=torch.int32))
    return e


def _tensors(crow: list[int], col: list[int], dtype: str = "I32") -> tuple[dict, bytes]:
    body = struct.pack(f"<{len(crow)}i", *crow) + struct.pack(f"<{len(col)}i", *col)
    return {
        "a/crow_indices": {"dtype": dtype, "shape": [len(crow)], "data_offsets": [0, 4 * len(crow)]},
        "a/col_indices": {
            "dtype": dtype,
            "shape": [len(col)],
            "data_offsets": [4 * len(crow), 4 * (len(crow) + len(col))],
        },
    }, body


def _hostile() -> dict[str, bytes]:
    table, body = _tensors([0, 1], [0])
    ok = _file({"__metadata__": _meta([_entry()]), **table}, body)
    assert PatternLibrary.from_bytes(ok)["a"].nnz == 1  # the base case is valid
    deep = b"[" * 100000 + b"]" * 100000
    return {
        "empty": b"",
        "short": b"\x01\x00",
        "huge header size": struct.pack("<Q", 2**63) + b"{}",
        "header past end": struct.pack("<Q", 100) + b"{}",
        "not json": struct.pack("<Q", 4) + b"\xff\xfe{}",
        "deep json": struct.pack("<Q", len(deep)) + deep,
        "json list": _file([]),  # type: ignore[arg-type]
        "no metadata": _file(table, body),
        "wrong format": _file({"__metadata__": {**_meta([_entry()]), "format": "other"}, **table}, body),
        "future version": _file({"__metadata__": _meta([_entry()], str(FORMAT_VERSION + 1)), **table}, body),
        "metadata not str": _file({"__metadata__": {"format": 1}, **table}, body),
        "entries not list": _file({"__metadata__": _meta({"a": 1}), **table}, body),  # type: ignore[arg-type]
        "entry missing key": _file({"__metadata__": _meta([{"name": "a"}]), **table}, body),
        "bad name": _file({"__metadata__": _meta([_entry(name="../a")]), **table}, body),
        "bad kind": _file({"__metadata__": _meta([_entry(kind="pickle")]), **table}, body),
        "bad block": _file({"__metadata__": _meta([_entry(block_size=[24, 16])]), **table}, body),
        "bool count": _file({"__metadata__": _meta([_entry(num_heads=True)]), **table}, body),
        "nnz mismatch": _file({"__metadata__": _meta([_entry(nnz=2)]), **table}, body),
        "float dtype": _file({"__metadata__": _meta([_entry()]), **_tensors([0, 1], [0], "F32")[0]}, body),
        "offsets past end": _file({"__metadata__": _meta([_entry()]), **table}, body[:4]),
        "extra tensor": _file(
            {
                "__metadata__": _meta([_entry()]),
                **table,
                "b/crow_indices": {"dtype": "I32", "shape": [0], "data_offsets": [8, 8]},
            },
            body,
        ),
        "column out of range": _file(
            {"__metadata__": _meta([_entry(col=(5,))]), **_tensors([0, 1], [5])[0]}, _tensors([0, 1], [5])[1]
        ),
        "offsets decrease": _file(
            {
                "__metadata__": _meta([_entry((0, 1, 0), (0,), num_query_blocks=2, num_key_blocks=2)]),
                **_tensors([0, 1, 0], [0])[0],
            },
            _tensors([0, 1, 0], [0])[1],
        ),
        "overlapping data": _file(
            {
                "__metadata__": _meta([_entry()]),
                "a/crow_indices": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]},
                "a/col_indices": {"dtype": "I32", "shape": [1], "data_offsets": [4, 8]},
            },
            body,
        ),
        "nan param": _file({"__metadata__": {**_meta([]), "entries": '[{"params": NaN}]'}}),
    }


@pytest.mark.parametrize("case", sorted(_hostile()))
def test_hostile_files_raise_value_error(case: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_hostile()[case])
    with pytest.raises(ValueError, match=r"invalid pattern library|cannot read"):
        PatternLibrary.load(path)


def test_load_refuses_missing_and_oversized(tmp_path: Path, valid_bytes: bytes) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        PatternLibrary.load(tmp_path / "missing.safetensors")
    path = tmp_path / "big.safetensors"
    path.write_bytes(valid_bytes)
    with pytest.raises(ValueError, match="max_bytes"):
        PatternLibrary.load(path, max_bytes=100)


def _load_or_value_error(data: bytes) -> None:
    try:
        lib = PatternLibrary.from_bytes(data)
    except ValueError:
        return
    for name in lib.names():  # whatever loads must be a valid library
        layout = lib[name]
        assert int(layout.crow_indices[-1]) == layout.nnz


_FUZZ = settings(
    max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_FUZZ
@given(data=st.data())
def test_fuzz_bit_flips(valid_bytes: bytes, data: st.DataObject) -> None:
    buf = bytearray(valid_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] ^= 1 << data.draw(st.integers(0, 7))
    _load_or_value_error(bytes(buf))


@_FUZZ
@given(data=st.data())
def test_fuzz_truncation_and_splices(valid_bytes: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(valid_bytes)))
    insert = data.draw(st.binary(max_size=32))
    at = data.draw(st.integers(0, cut))
    _load_or_value_error(valid_bytes[:at] + insert + valid_bytes[at:cut])


@_FUZZ
@given(data=st.data())
def test_fuzz_header_values(valid_bytes: bytes, data: st.DataObject) -> None:
    # rewrite one JSON value of the header (or of the entries) with an arbitrary JSON value
    n = int.from_bytes(valid_bytes[:8], "little")
    header = json.loads(valid_bytes[8 : 8 + n])
    entries = json.loads(header["__metadata__"]["entries"])
    junk = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=6,
    )
    if data.draw(st.booleans()):
        e = entries[data.draw(st.integers(0, len(entries) - 1))]
        e[data.draw(st.sampled_from(sorted(e)))] = data.draw(junk)
        header["__metadata__"]["entries"] = json.dumps(entries)
    else:
        key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[key][field] = data.draw(junk)
    raw = json.dumps(header).encode()
    _load_or_value_error(struct.pack("<Q", len(raw)) + raw + valid_bytes[8 + n :])
