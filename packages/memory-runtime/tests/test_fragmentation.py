"""Fragmentation metrics on synthetic memory_stats / snapshot dicts; the OOM hook writes JSON."""

from __future__ import annotations

import json

import pytest
import torch

from memory_runtime import FragmentationReport, OOMHook, fragmentation_report, install_oom_hook

MIB = 2**20

STATS = {
    "allocated_bytes.all.current": 800 * MIB,
    "requested_bytes.all.current": 700 * MIB,
    "reserved_bytes.all.current": 1000 * MIB,
    "inactive_split_bytes.all.current": 150 * MIB,
    "allocated_bytes.all.peak": 900 * MIB,
    "requested_bytes.all.peak": 850 * MIB,
    "reserved_bytes.all.peak": 1275 * MIB,
    "num_alloc_retries": 3,
    "num_ooms": 1,
    "segment.all.current": 4,
    "segment.all.allocated": 9,
}

SNAPSHOT = [
    {
        "device": 0,
        "total_size": 600 * MIB,
        "blocks": [
            {"size": 400 * MIB, "requested_size": 350 * MIB, "state": "active_allocated"},
            {"size": 120 * MIB, "requested_size": 0, "state": "inactive"},
            {"size": 80 * MIB, "requested_size": 0, "state": "inactive"},
        ],
    },
    {
        "device": 0,
        "total_size": 400 * MIB,
        "blocks": [
            {"size": 400 * MIB, "requested_size": 350 * MIB, "state": "active_allocated"},
        ],
    },
]


def test_metrics_from_stats_and_snapshot():
    r = FragmentationReport.from_stats(STATS, SNAPSHOT, device="cuda:0")
    assert r.available and r.source == "memory_stats+snapshot"
    assert r.internal_fragmentation == pytest.approx(1 - 700 / 800)
    assert r.external_fragmentation == pytest.approx(150 / 1000)
    assert r.free_in_segments_bytes == 200 * MIB
    assert r.largest_hole_bytes == 120 * MIB
    assert r.largest_hole_ratio == pytest.approx(120 / 200)
    assert r.peak_inflation == pytest.approx(1275 / 850)
    assert (r.num_alloc_retries, r.num_ooms, r.num_segments, r.segments_allocated_total) == (3, 1, 4, 9)
    d = json.loads(r.to_json())
    assert d["largest_hole_ratio"] == pytest.approx(0.6)
    assert "external 15.0%" in r.summary() and "peak inflation 1.500x" in r.summary()


def test_snapshot_dict_form_and_no_free_blocks():
    r = FragmentationReport.from_stats(STATS, {"segments": SNAPSHOT[1:]})
    assert r.largest_hole_bytes == 0 and r.largest_hole_ratio == 1.0


def test_stats_only_and_empty_allocator():
    r = FragmentationReport.from_stats(STATS)
    assert r.source == "memory_stats" and r.largest_hole_ratio is None and r.largest_hole_bytes is None
    empty = FragmentationReport.from_stats({k: 0 for k in STATS})
    assert empty.internal_fragmentation == 0.0 and empty.external_fragmentation == 0.0
    assert empty.peak_inflation is None  # nothing requested yet: undefined, not a division by zero
    partial = FragmentationReport.from_stats({"reserved_bytes.all.current": 10})
    assert partial.internal_fragmentation is None and partial.external_fragmentation is None


def test_malformed_inputs_raise():
    with pytest.raises(TypeError, match="memory_stats"):
        FragmentationReport.from_stats([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="allocated_bytes"):
        FragmentationReport.from_stats({"allocated_bytes.all.current": "lots"})
    with pytest.raises(ValueError, match="segments"):
        FragmentationReport.from_stats(STATS, {"nope": 1})
    with pytest.raises(ValueError, match="blocks"):
        FragmentationReport.from_stats(STATS, [{"blocks": 5}])


def test_oom_hook_writes_report(tmp_path):
    path = tmp_path / "oom.json"
    hook = OOMHook(path, stats_fn=lambda dev: STATS, snapshot_fn=lambda: [*SNAPSHOT, {"device": 1, "blocks": []}])
    hook(0, 512 * MIB, 1000 * MIB, 10 * MIB)
    doc = json.loads(path.read_text())
    assert doc["event"] == "cuda_out_of_memory" and doc["requested_bytes"] == 512 * MIB
    assert doc["report"]["largest_hole_ratio"] == pytest.approx(0.6)
    assert doc["report"]["device"] == "cuda:0" and hook.calls == 1

    def broken_snapshot():
        raise RuntimeError("snapshot failed")

    hook2 = OOMHook(path, stats_fn=lambda dev: STATS, snapshot_fn=broken_snapshot)
    hook2(0, 1, 2, 3)
    doc = json.loads(path.read_text())
    assert "snapshot failed" in doc["snapshot_error"] and doc["report"]["external_fragmentation"] == pytest.approx(0.15)


def test_this_process_report_and_hook_install(tmp_path):
    r = fragmentation_report()
    hook = install_oom_hook(tmp_path / "oom.json")
    if torch.cuda.is_available():
        assert r.available and r.reserved_bytes is not None
    else:
        assert not r.available and "CUDA is not available" in r.reason and "not available" in r.summary()
        assert not hook.installed and "CUDA" in hook.reason


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("allocated_bytes.all.current", float("inf"), "allocated_bytes.all.current.*finite"),
        ("reserved_bytes.all.current", float("nan"), "reserved_bytes.all.current.*finite"),
        ("requested_bytes.all.current", -5, "requested_bytes.all.current.*>= 0"),
        ("num_ooms", True, "num_ooms.*number"),
        ("allocated_bytes.all.current", 2000 * MIB, "allocated_bytes.all.current.*exceeds.*reserved"),
        ("requested_bytes.all.current", 8000 * MIB, "requested_bytes.all.current.*exceeds"),
        ("inactive_split_bytes.all.current", 300 * MIB, "inactive_split_bytes.*reserved - allocated"),
        ("reserved_bytes.all.peak", 10 * MIB, "exceeds 'reserved_bytes.all.peak'"),
    ],
)
def test_impossible_stats_raise_naming_the_field(key, value, match):
    """inf / NaN / negative / inconsistent numbers gave OverflowError or ratios like -900%."""
    with pytest.raises(ValueError, match=match):
        FragmentationReport.from_stats({**STATS, key: value})


def test_bad_snapshot_blocks_raise_value_error():
    for blk in ({"size": float("inf"), "state": "inactive"}, {"size": -1, "state": "inactive"}, "x"):
        with pytest.raises(ValueError, match="snapshot block"):
            FragmentationReport.from_stats(STATS, [{"blocks": [blk]}])
    np = pytest.importorskip("numpy")
    r = FragmentationReport.from_stats({k: np.int64(v) for k, v in STATS.items()})
    assert r.internal_fragmentation == pytest.approx(1 - 700 / 800)


def test_report_refuses_a_bool_device():
    with pytest.raises(TypeError, match="device"):
        fragmentation_report(True)  # type: ignore[arg-type]


def test_oom_hook_records_rejected_stats(tmp_path):
    hook = OOMHook(tmp_path / "oom.json", stats_fn=lambda d: {"allocated_bytes.all.current": -1}, snapshot_fn=list)
    hook(0, 1, 2, 3)
    doc = json.loads((tmp_path / "oom.json").read_text())
    assert doc["report"]["available"] is False and "allocated_bytes" in doc["report"]["reason"]
