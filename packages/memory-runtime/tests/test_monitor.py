"""`python -m memory_runtime monitor`: JSON schema (as a subprocess), text output, plot, bad args."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import memory_runtime
from memory_runtime.monitor import SCHEMA, main

SRC = str(Path(memory_runtime.__file__).resolve().parent.parent)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def check_schema(s: dict) -> None:
    assert s["schema"] == SCHEMA
    assert isinstance(s["time_unix"], float) and isinstance(s["hostname"], str)
    assert set(s["host"]) == {"total_bytes", "available_bytes", "used_bytes", "percent"}
    assert s["host"]["total_bytes"] > 0
    assert set(s["numa"]) == {"numa", "reason", "nodes"} and s["numa"]["nodes"]
    for n in s["numa"]["nodes"]:
        assert set(n) == {"node", "cpus", "total_bytes", "free_bytes", "used_bytes"} and n["cpus"] >= 1
    assert isinstance(s["gpu_status"], str)
    gpu_keys = {
        "index",
        "name",
        "pci_address",
        "numa_node",
        "memory_total_bytes",
        "memory_used_bytes",
        "memory_free_bytes",
        "utilization_gpu_percent",
        "utilization_memory_percent",
    }
    for g in s["gpus"]:
        assert set(g) == gpu_keys and g["memory_total_bytes"] >= g["memory_used_bytes"]
    if not s["gpus"]:
        assert s["gpu_status"].startswith("no GPU")


def test_once_json_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "memory_runtime", "monitor", "--once", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    check_schema(json.loads(lines[0]))


def test_synthetic_sysfs_and_text_and_plot(tmp_path):
    node = tmp_path / "devices" / "system" / "node"
    for n in range(2):
        (node / f"node{n}").mkdir(parents=True)
        (node / f"node{n}" / "cpulist").write_text(f"{2 * n}-{2 * n + 1}\n")
        (node / f"node{n}" / "meminfo").write_text(f"Node {n} MemTotal: 1048576 kB\nNode {n} MemFree: 524288 kB\n")
    out = io.StringIO()
    assert main(["--json", "--interval", "0.05", "--duration", "0.12", "--sysfs-root", str(tmp_path)], out=out) == 0
    samples = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(samples) >= 2
    for s in samples:
        check_schema(s)
        assert [n["node"] for n in s["numa"]["nodes"]] == [0, 1]
        assert s["numa"]["nodes"][1]["total_bytes"] == 2**30 and s["numa"]["nodes"][1]["free_bytes"] == 2**29
    text = io.StringIO()
    png = tmp_path / "timeline.png"
    assert main(["--once", "--sysfs-root", str(tmp_path), "--plot", str(png)], out=text) == 0
    assert "node 1: 2 CPUs" in text.getvalue() and png.stat().st_size > 1000


def test_bad_arguments():
    with pytest.raises(SystemExit):
        main(["--interval", "0"], out=io.StringIO())
    with pytest.raises(SystemExit):
        main(["--duration", "-1"], out=io.StringIO())
    with pytest.raises(SystemExit):  # time.sleep(1e300) raised OverflowError after the first sample
        main(["--interval", "1e300"], out=io.StringIO())
    proc = subprocess.run(
        [sys.executable, "-m", "memory_runtime", "frobnicate"], capture_output=True, text=True, timeout=120, env=_env()
    )
    assert proc.returncode == 2 and "monitor" in proc.stderr


def test_monitor_does_not_import_torch():
    code = (
        "import sys, io, memory_runtime.monitor as m; "
        "m.main(['--once', '--json'], out=io.StringIO()); "
        "assert 'torch' not in sys.modules, 'monitor imported torch'; "
        "import memory_runtime; memory_runtime.DeviceBufferPool; assert 'torch' in sys.modules; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


KIB = 1024


def write_meminfo(tmp_path: Path, *, node_kb: dict[str, int], host_kb: dict[str, int]) -> tuple[Path, Path]:
    """A one-node /sys and a /proc/meminfo (values in kB)."""
    node = tmp_path / "sys" / "devices" / "system" / "node" / "node0"
    node.mkdir(parents=True)
    (node / "cpulist").write_text("0-3\n")
    (node / "meminfo").write_text("".join(f"Node 0 {k}: {v} kB\n" for k, v in node_kb.items()))
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "meminfo").write_text("".join(f"{k}: {v} kB\n" for k, v in host_kb.items()) + "HugePages_Total: 0\n")
    return tmp_path / "sys", proc


def test_host_and_node_used_share_one_definition(tmp_path):
    """One node: host used and node used agree (page cache and reclaimable slab count as free on
    both); the node view used to count page cache as used (11.2 GiB where the host said 1.5)."""
    gib_kb = 2**20
    total, free, buffers, cached, swap_cached, sreclaim = 24 * gib_kb, 12 * gib_kb, gib_kb // 4, 8 * gib_kb, 0, gib_kb
    sys_root, proc_root = write_meminfo(
        tmp_path,
        node_kb={
            "MemTotal": total,
            "MemFree": free,
            "MemUsed": total - free,
            "FilePages": buffers + cached + swap_cached,
            "SReclaimable": sreclaim,
        },
        host_kb={
            "MemTotal": total,
            "MemFree": free,
            "MemAvailable": free + cached + sreclaim - gib_kb // 8,
            "Buffers": buffers,
            "Cached": cached,
            "SwapCached": swap_cached,
            "SReclaimable": sreclaim,
        },
    )
    out = io.StringIO()
    args = ["--once", "--json", "--sysfs-root", str(sys_root), "--proc-root", str(proc_root)]
    assert main(args, out=out) == 0
    s = json.loads(out.getvalue())
    check_schema(s)
    want = (total - free - buffers - cached - swap_cached - sreclaim) * KIB
    node = s["numa"]["nodes"][0]
    assert s["host"]["used_bytes"] == node["used_bytes"] == want
    assert s["host"]["total_bytes"] == node["total_bytes"] == total * KIB and node["free_bytes"] == free * KIB
    assert s["host"]["percent"] == pytest.approx(100 * want / (total * KIB))
    text = io.StringIO()
    assert main(["--once", "--sysfs-root", str(sys_root), "--proc-root", str(proc_root)], out=text) == 0
    lines = text.getvalue().splitlines()
    used = f"{want / 2**30:.1f}/{total * KIB / 2**30:.1f} GiB used"
    assert used in lines[0] and used in lines[1], lines


def test_plot_without_matplotlib_fails_before_sampling(tmp_path, monkeypatch, capsys):
    import memory_runtime.monitor as monitor

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)

    def no_sampling(self):
        raise AssertionError("sampled although --plot cannot be written")

    monkeypatch.setattr(monitor.Monitor, "sample", no_sampling)
    png = tmp_path / "t.png"
    assert main(["--duration", "30", "--interval", "10", "--plot", str(png)], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install" in err and not png.exists()


def test_failing_plot_keeps_the_samples(tmp_path, monkeypatch, capsys):
    import memory_runtime.monitor as monitor

    def broken(samples, path):
        raise OSError("disk full")

    monkeypatch.setattr(monitor, "plot_timeline", broken)
    png = tmp_path / "t.png"
    args = ["--interval", "0.01", "--duration", "0.05", "--sysfs-root", str(tmp_path), "--plot", str(png)]
    assert main(args, out=io.StringIO()) == 1
    saved = monitor.samples_path(str(png))
    samples = [json.loads(line) for line in saved.read_text().splitlines()]
    assert samples and all(s["schema"] == SCHEMA for s in samples)
    assert "disk full" in capsys.readouterr().err
    # the directory is missing too: the samples go to stdout rather than nowhere
    out = io.StringIO()
    missing = tmp_path / "nope" / "t.png"
    assert main(["--once", "--sysfs-root", str(tmp_path), "--plot", str(missing)], out=out) == 1
    assert json.loads(out.getvalue().splitlines()[-1])["schema"] == SCHEMA
