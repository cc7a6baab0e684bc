"""The strided-rows Triton kernels (attn_core.strided_varlen) against float64, in the interpreter.

Sequences of strided rows with per-sequence heads, two "groups" (the second merged into the first's
out / LSE, as packed dilated attention does), causal and not, GQA, key padding with rows that see no
key, sequences of one row and longer than a tile; outputs, LSE and all gradients (the 2x rule).
Both load paths: tiles inside a sequence through TMA descriptors, and (inputs at a base that is
not 16-byte aligned) masked pointer loads everywhere.
"""

from __future__ import annotations

import pytest
import torch

from attn_core import reference, strided_varlen
from attn_core.testing import assert_close_to_reference
from attn_core.triton_env import interpret_mode

pytest.importorskip("triton")

# (start, length, stride, q_head0, kv_head0) per sequence; heads (q_hs, q_hn, kv_hs, kv_hn)
GROUP_A = dict(
    seqs=[(0, 45, 3, 0, 0), (1, 1, 3, 0, 0), (2, 30, 3, 2, 1), (140, 9, 1, 0, 0), (149, 140, 1, 2, 1)],
    heads=(1, 2, 1, 1),
)
GROUP_B = dict(  # overlaps group A's (row, head) pairs: merged
    seqs=[(0, 100, 2, 0, 0), (1, 70, 2, 1, 0), (200, 89, 1, 0, 0), (141, 3, 2, 1, 0)],
    heads=(2, 2, 1, 2),
)
N, H, HKV = 289, 4, 2


def _rows(start: int, length: int, stride: int) -> torch.Tensor:
    return start + stride * torch.arange(length)


def _reference_group(q, k, v, group, mask, causal, scale, dtype):
    """out (N, H, D), lse (N, H) of one group in ``dtype`` (0 / -inf where it selects nothing)."""
    q_hs, q_hn, kv_hs, kv_hn = group["heads"]
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=dtype, device=q.device)
    for start, length, stride, qh0, kh0 in group["seqs"]:
        rows = _rows(start, length, stride).to(q.device)
        for i in range(q_hn):
            qh, kh = qh0 + i * q_hs, kh0 + (i // (q_hn // kv_hn)) * kv_hs
            o, lv = reference.dense_attention(
                q[rows, qh][None, :, None], k[rows, kh][None, :, None], v[rows, kh][None, :, None],
                is_causal=causal, key_padding_mask=None if mask is None else mask[rows][None],
                softmax_scale=scale, dtype=dtype,
            )  # fmt: skip
            out = out.index_put((rows, torch.full_like(rows, qh)), o[0, :, 0].to(dtype))
            lse = lse.index_put((rows, torch.full_like(rows, qh)), lv.reshape(-1).to(dtype))
    return out, lse


def _reference(q, k, v, mask, causal, scale, dtype):
    """Both groups, merged by LSE, in ``dtype``."""
    oa, la = _reference_group(q, k, v, GROUP_A, mask, causal, scale, dtype)
    ob, lb = _reference_group(q, k, v, GROUP_B, mask, causal, scale, dtype)
    m = torch.maximum(la, lb)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    ea, eb = torch.exp(la - m), torch.exp(lb - m)
    tot = ea + eb
    safe = torch.where(tot == 0, torch.ones_like(tot), tot)
    out = (oa * ea[..., None] + ob * eb[..., None]) / safe[..., None]
    return out, torch.where(tot == 0, torch.full_like(tot, float("-inf")), m + torch.log(safe))


def _sequences(group, device):
    # one StridedSequences per stride (a table has one stride)
    out = []
    for stride in sorted({s[2] for s in group["seqs"]}):
        seqs = [s for s in group["seqs"] if s[2] == stride]
        t = torch.tensor(seqs)
        out.append(strided_varlen.strided_sequences(t[:, 0], t[:, 1], t[:, 3], t[:, 4], stride, group["heads"], device))
    return out


def _misaligned(x: torch.Tensor) -> torch.Tensor:
    """A copy of x whose base is 2 elements past a 16-byte boundary (no TMA descriptor takes it)."""
    buf = torch.empty(x.numel() + 2, dtype=x.dtype, device=x.device)
    out = buf[2:].view(x.shape)
    out.copy_(x)
    return out


def _check(
    device: torch.device, dtype: torch.dtype, causal: bool, padding: bool, descriptors: bool = True, D: int = 16
) -> None:
    """Both groups through the kernels on ``device`` against float64 (out, LSE, dq, dk, dv);
    ``descriptors`` False: inputs the descriptors cannot take (the pointer loads everywhere)."""
    scale = 0.3
    g = torch.Generator().manual_seed(7 + 2 * causal + padding)
    q = torch.randn(N, H, D, generator=g).to(dtype)
    k, v = (torch.randn(N, HKV, D, generator=g).to(dtype) for _ in range(2))
    dout = torch.randn(N, H, D, generator=g).to(dtype)
    mask = None
    if padding:
        mask = torch.rand(N, generator=g) < 0.3
        mask[0] = True  # the first row of causal sequences starting at 0 sees no key
        mask[2] = True
    qd, kd, vd, dd = (x.to(device) if descriptors else _misaligned(x.to(device)) for x in (q, k, v, dout))
    md = None if mask is None else mask.to(device)
    assert not strided_varlen.unsupported_reasons(qd)
    if device.type == "cpu" or torch.cuda.get_device_capability(device) >= (9, 0):
        assert (not strided_varlen.descriptor_reasons(qd, kd, vd, dd)) == descriptors

    out = torch.zeros(N, H, D, dtype=dtype, device=device)
    lse_store = torch.full((H, N), float("-inf"), device=device)  # (N, H) view with strides (1, N)
    lse = lse_store.t()
    for first, group in ((True, GROUP_A), (False, GROUP_B)):
        for i, seqs in enumerate(_sequences(group, device)):
            strided_varlen.forward_(
                qd, kd, vd, seqs, out, lse, key_padding_mask=md, is_causal=causal, scale=scale, first=first and i == 0
            )
    delta = strided_varlen.row_delta(dd, out)
    grads = tuple(torch.zeros_like(x) for x in (qd, kd, vd))
    for group in (GROUP_A, GROUP_B):
        for seqs in _sequences(group, device):
            strided_varlen.backward_(
                dd, qd, kd, vd, lse, delta, seqs, grads, key_padding_mask=md, is_causal=causal, scale=scale
            )

    # the baseline in the same dtype: float32 rounded on the CPU (CPU fp16 matmuls are not plain
    # PyTorch's), the dtype itself on CUDA
    plain_dtype = torch.float32 if device.type == "cpu" else dtype
    results = {}
    for cdt, dev in ((torch.float64, torch.device("cpu")), (plain_dtype, device)):
        leaves = [x.detach().to(dev, cdt).requires_grad_() for x in (q, k, v)]
        o, lv = _reference(*leaves, None if mask is None else mask.to(dev), causal, scale, cdt)
        results[cdt] = (o, lv, *torch.autograd.grad(o, leaves, dout.to(dev, cdt)))
    ref, plain = results[torch.float64], results[plain_dtype]
    lse = lse.cpu()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref[1]))
    fin = torch.isfinite(ref[1])
    assert torch.allclose(lse[fin].double(), ref[1][fin], atol=2e-3)
    for name, mine, r, p in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref[0], *ref[2:]), (plain[0], *plain[2:])):
        assert not torch.isnan(mine).any(), name
        assert_close_to_reference(name, mine.cpu(), r, p.cpu().to(dtype))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("descriptors", [True, False])
def test_strided_kernels_match_float64(causal, padding, descriptors):
    if torch.cuda.is_available() or not interpret_mode():  # Triton reads the setting when it loads
        pytest.skip("the interpreter variant needs TRITON_INTERPRET=1 from the start and no GPU (CI sets it)")
    _check(torch.device("cpu"), torch.float16, causal, padding, descriptors)


def test_strided_kernels_head_dim_below_the_tile():
    # D=24 in 32-column tiles: the descriptors' blocks reach past D (zero-filled, never read)
    if torch.cuda.is_available() or not interpret_mode():
        pytest.skip("the interpreter variant needs TRITON_INTERPRET=1 from the start and no GPU (CI sets it)")
    _check(torch.device("cpu"), torch.float16, True, True, True, D=24)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("causal", "padding"), [(False, False), (True, True)])
@pytest.mark.parametrize("descriptors", [True, False])
@pytest.mark.parametrize("head_dim", [16, 96])  # 96: tiles of 128 columns, descriptor blocks past D
def test_strided_kernels_cuda(dtype, causal, padding, descriptors, head_dim):
    if strided_varlen.unsupported_reasons(torch.empty(1, 1, 16, device="cuda", dtype=dtype)):
        pytest.skip("the compiled kernels cannot run here (interpreter set or no triton)")
    _check(torch.device("cuda"), dtype, causal, padding, descriptors, D=head_dim)


def test_tables_and_reasons():
    long = strided_varlen.FWD_BLOCK_M + 2  # two forward tiles, the second of 2 rows
    t = torch.tensor([[5, 0], [0, long], [200, 3]])
    seqs = strided_varlen.strided_sequences(
        t[:, 0], t[:, 1], torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), 2, (1, 1, 1, 1),
        torch.device("cpu"),
    )  # fmt: skip
    assert seqs.lengths.tolist() == [long, 3]  # the empty sequence is dropped
    seq, m0 = seqs.fwd_tiles
    assert seq.tolist() == [0, 0, 1] and m0.tolist() == [0, strided_varlen.FWD_BLOCK_M, 0]
    with pytest.raises(ValueError, match="q_hn a multiple of kv_hn"):
        strided_varlen.strided_sequences(t[:, 0], t[:, 1], t[:, 0], t[:, 0], 1, (1, 3, 1, 2), torch.device("cpu"))
    assert any("float16/float32" in r for r in strided_varlen.unsupported_reasons(torch.zeros(2, 1, 8).double()))
    assert any("head dim" in r for r in strided_varlen.unsupported_reasons(torch.zeros(2, 1, 160)))
    x = torch.zeros(4, 2, 16, dtype=torch.float16)
    assert not strided_varlen.descriptor_reasons(x, x[:, 1:])  # head 1: 32 bytes past an aligned base
    assert any("16 bytes" in r for r in strided_varlen.descriptor_reasons(x[:, :, 1:]))  # base 2 bytes off
    assert any("16 bytes" in r for r in strided_varlen.descriptor_reasons(torch.zeros(4, 3, 3)[:, :, :2]))
    assert any("16 bytes" in r for r in strided_varlen.descriptor_reasons(x[:, :1].expand(4, 2, 16)))  # stride 0


def test_forward_pipeline_fits_shared_memory():
    # an H100 / H200 (232448 bytes) takes the defaults at D=128 in bf16
    assert strided_varlen._fwd_pipeline(128, 2, 232448) == (strided_varlen.FWD_BLOCK_N, strided_varlen.FWD_STAGES)
    for shared in (166912, 101376, 65536, 49152):  # A100, sm_86/89, smaller devices, every CUDA device
        block_n, stages = strided_varlen._fwd_pipeline(128, 2, shared)
        assert (strided_varlen.FWD_BLOCK_M + 2 * block_n * stages) * 128 * 2 <= shared
        assert block_n <= strided_varlen.FWD_BLOCK_N and 1 <= stages <= strided_varlen.FWD_STAGES
    assert strided_varlen._fwd_pipeline(128, 2, 1024) == (32, 1)  # nothing fits: the smallest


def test_descriptors_need_a_recent_triton(monkeypatch):
    x = torch.zeros(4, 2, 16, dtype=torch.float16)
    monkeypatch.setattr(strided_varlen, "_triton_version", lambda: (3, 5))
    assert any("triton >= 3.6" in r for r in strided_varlen.descriptor_reasons(x))
