"""NCCL half of `nox -s integration`: run under torchrun on every GPU of the machine.

    torchrun --standalone --nproc-per-node=N integration_tests/run_nccl.py [-k substring]

Discovers ``checks_*.py`` next to this file; each may list ``NCCL_CHECKS``: functions called as
``fn(rank, world_size)`` after this script has joined the NCCL group and set the CUDA device. The
same functions run on gloo/CPU in the pytest half, so CPU and GPU check identical properties.
Exit status 1 if any check fails on any rank.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", default="", help="run only checks whose name contains this")
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl", timeout=timedelta(seconds=120))
    failures = 0
    for path in sorted(HERE.glob("checks_*.py")):
        mod = importlib.import_module(path.stem)
        for fn in getattr(mod, "NCCL_CHECKS", []):
            name = f"{path.stem}.{fn.__name__}"
            if args.k not in name:
                continue
            t0 = time.perf_counter()
            try:
                fn(rank, world)
                status = "ok"
            except Exception:
                failures += 1
                status = "FAILED\n" + traceback.format_exc()
            flag = torch.tensor([0 if status == "ok" else 1], device="cuda")
            dist.all_reduce(flag)  # every rank learns whether any rank failed this check
            if rank == 0 or status != "ok":
                print(
                    f"[rank {rank}/{world}] {name}: {status} ({time.perf_counter() - t0:.2f} s, "
                    f"{int(flag.item())} rank(s) failed)",
                    flush=True,
                )
    total = torch.tensor([failures], device="cuda")
    dist.all_reduce(total)
    dist.destroy_process_group()
    return 1 if total.item() else 0


if __name__ == "__main__":
    raise SystemExit(main())
