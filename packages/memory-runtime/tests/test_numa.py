"""NUMA topology parsing on synthetic /sys trees (1, 2, 4 nodes; a GPU on node 1), libnuma fallback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memory_runtime import load_libnuma, parse_cpulist, read_topology
from memory_runtime.numa import normalize_pci_address, used_bytes

GIB_KB = 1024 * 1024


def make_sysfs(root: Path, n_nodes: int, cpus_per_node: int = 4, gpus: dict[str, int] | None = None) -> Path:
    """A minimal sysfs: node dirs with cpulist/meminfo/distance; NVIDIA cards under class/drm."""
    node_dir = root / "devices" / "system" / "node"
    node_dir.mkdir(parents=True)
    (node_dir / "online").write_text(f"0-{n_nodes - 1}\n")
    for n in range(n_nodes):
        d = node_dir / f"node{n}"
        d.mkdir()
        lo = n * cpus_per_node
        (d / "cpulist").write_text(f"{lo}-{lo + cpus_per_node - 1}\n")
        total_kb = (n + 1) * 16 * GIB_KB
        (d / "meminfo").write_text(
            f"Node {n} MemTotal:       {total_kb} kB\nNode {n} MemFree:        {total_kb // 2} kB\n"
            f"Node {n} MemUsed:        {total_kb // 2} kB\nNode {n} HugePages_Total:     0\n"
        )
        (d / "distance").write_text(" ".join("10" if m == n else "21" for m in range(n_nodes)) + "\n")
    for i, (addr, node) in enumerate((gpus or {}).items()):
        dev = root / "devices" / "pci0000:00" / addr
        dev.mkdir(parents=True)
        (dev / "numa_node").write_text(f"{node}\n")
        (dev / "vendor").write_text("0x10de\n")
        bus = root / "bus" / "pci" / "devices"
        bus.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(dev, bus), bus / addr)
        card = root / "class" / "drm" / f"card{i}"
        card.mkdir(parents=True)
        os.symlink(os.path.relpath(dev, card), card / "device")
    # a non-NVIDIA card must be ignored
    other = root / "devices" / "pci0000:00" / "0000:03:00.0"
    other.mkdir(parents=True)
    (other / "vendor").write_text("0x1a03\n")
    card = root / "class" / "drm" / "card9"
    card.mkdir(parents=True)
    os.symlink(os.path.relpath(other, card), card / "device")
    return root


@pytest.mark.parametrize("n_nodes", [1, 2, 4])
def test_nodes_cpus_memory(tmp_path, n_nodes):
    root = make_sysfs(tmp_path, n_nodes)
    topo = read_topology(root, use_nvml=False)
    assert topo.numa and topo.node_ids == list(range(n_nodes))
    for n in topo.nodes:
        assert n.cpus == tuple(range(n.id * 4, n.id * 4 + 4))
        assert n.mem_total_bytes == (n.id + 1) * 16 * 2**30
        assert n.mem_free_bytes == n.mem_total_bytes // 2
        assert len(n.distances) == n_nodes and n.distances[n.id] == 10
    assert topo.node(n_nodes - 1).id == n_nodes - 1
    with pytest.raises(ValueError, match="does not exist"):
        topo.node(n_nodes)
    assert f"{n_nodes} node(s)" in topo.summary()


@pytest.mark.parametrize("n_nodes", [2, 4])
def test_gpu_on_node_1_from_drm(tmp_path, n_nodes):
    root = make_sysfs(tmp_path, n_nodes, gpus={"0000:17:00.0": 0, "0000:b3:00.0": 1})
    topo = read_topology(root, use_nvml=False)
    assert [g.pci_address for g in topo.gpus] == ["0000:17:00.0", "0000:b3:00.0"]
    assert topo.gpu_node(1) == 1 and topo.gpu_node(0) == 0
    assert topo.gpus[1].source == "sysfs class/drm"
    with pytest.raises(ValueError, match="GPU 5"):
        topo.gpu_node(5)


def test_gpu_addresses_given_in_nvml_form(tmp_path):
    root = make_sysfs(tmp_path, 2, gpus={"0000:b3:00.0": 1})
    topo = read_topology(root, gpu_pci_addresses=["00000000:B3:00.0"])
    assert topo.gpus[0].pci_address == "0000:b3:00.0" and topo.gpus[0].numa_node == 1
    assert topo.gpus[0].source == "given"


def test_unknown_gpu_node(tmp_path):
    root = make_sysfs(tmp_path, 2, gpus={"0000:17:00.0": -1})
    assert read_topology(root, use_nvml=False).gpus[0].numa_node is None  # -1 on 2 nodes: unknown
    root1 = make_sysfs(tmp_path / "one", 1, gpus={"0000:17:00.0": -1})
    assert read_topology(root1, use_nvml=False).gpus[0].numa_node == 0  # one node: it is node 0


def test_no_numa_tree_falls_back_with_reason(tmp_path):
    topo = read_topology(tmp_path, use_nvml=False)
    assert not topo.numa and len(topo.nodes) == 1 and "no NUMA nodes" in topo.reason
    assert topo.gpus == ()
    with pytest.raises(ValueError, match="not a directory"):
        read_topology(tmp_path / "missing")


def test_parse_cpulist_and_pci():
    assert parse_cpulist("0-3,8-11,16\n") == [0, 1, 2, 3, 8, 9, 10, 11, 16]
    assert parse_cpulist("") == []
    assert parse_cpulist("0-6:2") == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="x-3"):
        parse_cpulist("x-3")
    with pytest.raises(ValueError, match="end before start"):
        parse_cpulist("5-2")
    assert normalize_pci_address("00000000:17:00.0") == "0000:17:00.0"
    assert normalize_pci_address("B3:00.1") == "0000:b3:00.1"
    with pytest.raises(ValueError, match="PCI"):
        normalize_pci_address("gpu0")


def test_libnuma_loads_or_explains():
    lib, reason = load_libnuma()
    if lib is None:
        assert "libnuma" in reason or "NUMA" in reason
    else:
        assert reason == "" and lib.max_node() >= 0
        with pytest.raises(ValueError, match="does not exist"):
            lib.mbind(0, 4096, lib.max_node() + 1)


def test_parse_cpulist_rejects_non_strings_and_malformed_lists():
    with pytest.raises(TypeError, match="cpulist must be a str"):
        parse_cpulist(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cpulist must be a str"):
        parse_cpulist(b"0-3")  # type: ignore[arg-type]
    for bad in ["a", "0-", "-1", "1-2-3", "3-1", "0-7:0", "0,,2", "0-99999999999"]:
        with pytest.raises(ValueError, match="cpulist"):
            parse_cpulist(bad)
    assert parse_cpulist(" 0-2, 8 ,10-14:2\n") == [0, 1, 2, 8, 10, 12, 14]


def test_node_used_counts_page_cache_as_free(tmp_path):
    root = make_sysfs(tmp_path, 2)
    meminfo = root / "devices" / "system" / "node" / "node1" / "meminfo"
    total_kb = 32 * GIB_KB
    meminfo.write_text(
        f"Node 1 MemTotal: {total_kb} kB\nNode 1 MemFree: {4 * GIB_KB} kB\nNode 1 FilePages: {20 * GIB_KB} kB\n"
        f"Node 1 SReclaimable: {GIB_KB} kB\nNode 1 HugePages_Total: 7\n"
    )
    topo = read_topology(root, use_nvml=False)
    assert topo.node(1).mem_used_bytes == (32 - 4 - 20 - 1) * 2**30
    assert topo.node(0).mem_used_bytes is None  # FilePages / SReclaimable missing: not guessed
    assert used_bytes({"MemTotal": 10, "MemFree": 2, "FilePages": 3, "SReclaimable": 1}) == 4


def test_pci_address_and_distance_errors_are_clear(tmp_path):
    with pytest.raises(TypeError, match="PCI address must be a str"):
        normalize_pci_address(None)  # type: ignore[arg-type]
    root = make_sysfs(tmp_path, 2)
    (root / "devices" / "system" / "node" / "node1" / "distance").write_text("21 ten\n")
    with pytest.raises(ValueError, match=r"malformed NUMA distance file .*node1"):
        read_topology(root, use_nvml=False)
