"""Host cost of the eager entry points of the kernel ops, on CPU: calls per second on tiny shapes.

Rows (each a forward + backward through torch.autograd.grad, and a forward under no_grad):
  - dilated_attention(backend="sdpa"): B=1, N=64, H=2, D=16 (the CPU flash kernel does the work),
    then again with attn_core.sdpa_ops' attention calls replaced by stand-ins returning zeros
    (planning, strided views, merges and the autograd glue without the kernel's variance);
  - block_sparse_attention(backend="triton"): B=1, N=64, H=2, D=16, 16x16 blocks, with the Triton
    launchers replaced by stand-ins that only look up their launch tables (the interpreter would
    time numpy, not the host path): validation, the layout's CSR, the autograd glue and the memo;
  - with attn_core.custom_op present, the same calls made through the registered custom op
    (``op.forward_op`` with its register_autograd formula: what eager would pay if it dispatched
    through torch.library as the compiled path does).
Times are this thread's CPU time (time.thread_time, torch on one thread), so other processes on a
shared machine count less; the best of --repeats runs of --calls calls each (as timeit does). Run it on two
checkouts to compare them:

    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' ':') TRITON_INTERPRET=1 python tools/bench_op_host.py
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend accepts CPU tensors only then

import torch


def per_call_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    for _ in range(max(calls // 10, 5)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        times.append((time.thread_time() - t0) / calls)
    return min(times) * 1e6


def sdpa_cases() -> dict[str, Callable[[], object]]:
    from attn_core import dilated_attention
    from attn_core.backends import sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 16, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(1, 64, 2, 16, generator=g)

    def call() -> torch.Tensor:
        return dilated_attention(q, k, v, [16, 32], [1, 2], backend="sdpa")

    cases: dict[str, Callable[[], object]] = {
        "sdpa fwd+bwd": lambda: torch.autograd.grad(call(), (q, k, v), dout),
        "sdpa fwd no_grad": lambda: _no_grad(call),
    }
    op = getattr(sdpa, "DILATED_SDPA", None)
    if op is not None:
        from attn_core.config import DilatedConfig

        config = DilatedConfig([16, 32], [1, 2])

        def via_op() -> torch.Tensor:
            out: torch.Tensor = op.forward_op(q, k, v, *op.encode(None, None, config, False, 0.25))[0]
            return out

        cases["sdpa fwd+bwd, kernel through the custom op"] = lambda: torch.autograd.grad(via_op(), (q, k, v), dout)
    return cases


def sdpa_stand_in_cases() -> dict[str, Callable[[], object]]:
    from attn_core import sdpa_ops

    def forward(q, k, v, **kw):  # type: ignore[no-untyped-def]
        return torch.zeros_like(q), torch.zeros(q.shape[:-1], dtype=torch.float32)

    def backward(dout, q, k, v, out, lse, **kw):  # type: ignore[no-untyped-def]
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    sdpa_ops.attention_forward, sdpa_ops.attention_backward = forward, backward  # type: ignore[assignment]
    return {f"{name} (stand-in kernels)": fn for name, fn in sdpa_cases().items()}


def sparse_cases() -> dict[str, Callable[[], object]]:
    from attn_sparse import block_sparse_attention, patterns
    from attn_sparse.kernels import ops

    def forward(q, k, v, csr, mask, scale, cfg):  # type: ignore[no-untyped-def]
        B, N, H, _ = q.shape
        csr.row_table(B, H)
        return torch.empty_like(q), torch.empty(B, H, N)

    def backward(dout, q, k, v, out, lse, csr, mask, scale, cfg):  # type: ignore[no-untyped-def]
        csr.row_table(q.shape[0], q.shape[2])
        csr.transposed_slots()
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    ops.block_sparse_forward, ops.block_sparse_backward = forward, backward  # type: ignore[assignment]
    layout = patterns.local_window(64, 16, block_size=(16, 16))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 64, 2, 16, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(1, 64, 2, 16, generator=g)

    def call() -> torch.Tensor:
        return block_sparse_attention(q, k, v, layout, backend="triton")

    cases: dict[str, Callable[[], object]] = {
        "block_sparse fwd+bwd (stand-in kernels)": lambda: torch.autograd.grad(call(), (q, k, v), dout),
        "block_sparse fwd no_grad (stand-in kernels)": lambda: _no_grad(call),
    }
    op = getattr(ops, "BLOCK_SPARSE", None)
    if op is not None:
        from attn_sparse.kernels import CSR, KernelMask, default_config

        def via_op() -> torch.Tensor:
            csr = CSR.from_layout(layout)
            out: torch.Tensor = op.forward_op(
                q, k, v, *op.encode(csr, KernelMask.causal(False, 64, 64), 0.25, default_config((16, 16)))
            )[0]
            return out

        cases["block_sparse fwd+bwd, kernels through the custom op (stand-in kernels)"] = lambda: torch.autograd.grad(
            via_op(), (q, k, v), dout
        )
    return cases


def _no_grad(fn: Callable[[], object]) -> object:
    with torch.no_grad():
        return fn()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, CPU time; best of {args.repeats} x {args.calls} calls")
    print(f"| {'case':<72} | us/call | calls/s |")
    print(f"|{'-' * 74}|---------|---------|")
    # in this order: each group's stand-ins replace kernels for every later call
    for cases in (sdpa_cases, sdpa_stand_in_cases, sparse_cases):
        for name, fn in cases().items():
            us = per_call_us(fn, args.calls, args.repeats)
            print(f"| {name:<72} | {us:7.1f} | {1e6 / us:7.0f} |")


if __name__ == "__main__":
    main()
