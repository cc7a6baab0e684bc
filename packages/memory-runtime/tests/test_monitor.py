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
        assert set(n) == {"node", "cpus", "total_bytes", "free_bytes"} and n["cpus"] >= 1
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
