"""Probe (not shipped): which ATen SDPA ops accept dilated strided views, GQA, a strided LSE and a key bias.

Kept as run for the kernel choice of attn_core.sdpa_ops (result: docs/benchmarks/sdpa_ops_probe_h100.json).
For each CUDA op (cuDNN, flash, efficient): forward/backward on a dilated view batch vs a float64 math
reference; then per-(w, r) timings of cuDNN on views at N=256K, H=16, D=128, and dense cuDNN at 64K.
Note: the timing FLOP counts in the JSON over-count by the rate r (4*N*w*H*D/r instead of /r^2); the
times are what the kernel choice used.
"""

# ruff: noqa: E402, E731, B023, SIM115

import json
import os

import torch

A = torch.ops.aten
dev = "cuda"
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.backends.cudnn.version())
for n in [
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_cudnn_attention_backward",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention_backward",
]:
    print(getattr(A, n).default._schema)


def view(x, w, r, o, h0, hs, hn):
    B, N, H, D = x.shape
    S = N // w
    t = x[:, : S * w].reshape(B * S, w // r, r, H, D)[:, :, o, h0::hs][:, :, :hn]
    return t.transpose(1, 2)  # (B*S, h, rows, D)


def fwd(kind, q, k, v, causal, scale, bias=None):
    if kind == "cudnn":
        r = A._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, causal, False, scale=scale)
    elif kind == "flash":
        r = A._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    else:
        r = A._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal, scale=scale)
    return r


def bwd(kind, r, do, q, k, v, o, lse, causal, scale, bias=None):
    if kind == "cudnn":
        return A._scaled_dot_product_cudnn_attention_backward(
            do, q, k, v, o, lse, r[6], r[7], bias, r[2], r[3], r[4], r[5], 0.0, causal, scale=scale
        )
    if kind == "flash":
        return A._scaled_dot_product_flash_attention_backward(
            do, q, k, v, o, lse, r[2], r[3], r[4], r[5], 0.0, causal, r[6], r[7], scale=scale
        )
    g = A._scaled_dot_product_efficient_attention_backward(
        do,
        q,
        k,
        v,
        bias if bias is not None else torch.empty(0, device=dev),
        o,
        lse,
        r[2],
        r[3],
        0.0,
        [True, True, True, bias is not None and bias.requires_grad],
        causal,
        scale=scale,
    )
    return g[:3]


def mathref(q, k, v, causal, scale, bias=None):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    if k.shape[1] != q.shape[1]:
        kk = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        vv = v.repeat_interleave(q.shape[1] // k.shape[1], 1)
    else:
        kk, vv = k, v
    s = (q @ kk.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=dev).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ vv
    return out, lse, (q, k, v)


res = {}
torch.manual_seed(0)
B, N, H, D = 1, 8192, 16, 128
for dt in (torch.bfloat16,):
    q = torch.randn(B, N, H, D, device=dev, dtype=dt)
    k = torch.randn_like(q)
    v = torch.randn_like(q)
    kg = torch.randn(B, N, 4, D, device=dev, dtype=dt)
    vg = torch.randn_like(kg)
    scale = D**-0.5
    for kind in ("cudnn", "flash", "efficient"):
        for case in ("plain", "gqa", "bias"):
            for causal in (False, True):
                key = f"{kind}/{case}/causal={causal}"
                try:
                    w, r, o = 1024, 2, 1
                    qv = view(q, w, r, o, o, r, H // r)
                    if case == "gqa":
                        # q heads o, o+2, ..., kv heads (o+m r)//4 = m//2 -> contiguous 4 kv heads, 2 q per kv
                        kv_, vv_ = view(kg, w, r, o, 0, 1, 4), view(vg, w, r, o, 0, 1, 4)
                    else:
                        kv_, vv_ = view(k, w, r, o, o, r, H // r), view(v, w, r, o, o, r, H // r)
                    bias = None
                    if case == "bias":
                        if kind == "flash":
                            continue
                        nb = qv.shape[2]
                        braw = torch.zeros(qv.shape[0], 1, 1, nb + 8, device=dev, dtype=dt)
                        braw[..., : nb // 3] = float("-inf")
                        braw[:2] = float("-inf")
                        bias = braw[..., :nb].expand(qv.shape[0], qv.shape[1], nb, nb)
                    rr = fwd(kind, qv, kv_, vv_, causal, scale, bias)
                    out, lse = rr[0], rr[1]
                    ro, rl, leaves = mathref(qv, kv_, vv_, causal, scale, bias)
                    do = torch.randn_like(out)
                    (ro * do.double()).sum().backward()
                    # strided lse: internal buffer (B, N, H) fp32
                    Lbuf = torch.zeros(B, N, H, device=dev, dtype=torch.float32)
                    lv = Lbuf[:, : (N // w) * w].reshape(B * (N // w), w // r, r, H)[:, :, o, o::r].transpose(1, 2)
                    lse3 = lse.reshape(lv.shape) if lse.dim() == 4 else lse[..., : lv.shape[-1]]
                    lv.copy_(lse3)
                    lse_arg = lv.unsqueeze(-1) if lse.dim() == 4 else lv
                    try:
                        g = bwd(kind, rr, do, qv, kv_, vv_, out, lse_arg, causal, scale, bias)
                        strided_ok = True
                    except Exception as e:
                        strided_ok = str(e)[:200]
                        g = bwd(kind, rr, do, qv, kv_, vv_, out, lse, causal, scale, bias)
                    g2 = bwd(kind, rr, do, qv, kv_, vv_, out, lse, causal, scale, bias)
                    strided_ok = (
                        strided_ok,
                        "dq diff strided vs own lse",
                        (g[0] - g2[0]).abs().max().item(),
                        "own-lse dq err",
                        (g2[0].double() - leaves[0].grad).abs().max().item(),
                    )
                    sl = slice(2, None) if case == "bias" else slice(None)
                    errs = {
                        "out": (out.double() - ro)[sl].abs().max().item(),
                        "lse": (lse3.double() - rl)[sl].abs().max().item(),
                        "dq": (g[0].double() - leaves[0].grad)[sl].abs().max().item(),
                        "dk": (g[1].double() - leaves[1].grad)[sl].abs().max().item(),
                        "dv": (g[2].double() - leaves[2].grad)[sl].abs().max().item(),
                    }
                    if case == "bias":
                        errs["padrows"] = dict(
                            out_nan=bool(out[:2].isnan().any()),
                            out_max=out[:2].float().abs().max().item(),
                            lse=lse3[:2].flatten()[:3].tolist(),
                            dq_nan=bool(g[0][:2].isnan().any()),
                            dk_nan=bool(g[1].isnan().any()),
                        )
                    res[key] = dict(
                        ok=True,
                        lse_shape=list(lse.shape),
                        lse_stride=list(lse.stride()),
                        out_stride=list(out.stride()),
                        dq_stride=list(g[0].stride()),
                        strided_lse_bwd=strided_ok,
                        errs=errs,
                    )
                except Exception as e:
                    res[key] = dict(ok=False, err=str(e)[:300])
                print(key, res[key], flush=True)

# timing: N=256K, per group all offsets, all heads, fwd and bwd
from triton.testing import do_bench

N = 262144
q = torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16)
k = torch.randn_like(q)
v = torch.randn_like(q)
tim = {}
for kind in ("cudnn",):
    for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8)):
        try:
            views = [
                (view(q, w, r, o, o, r, H // r), view(k, w, r, o, o, r, H // r), view(v, w, r, o, o, r, H // r))
                for o in range(r)
            ]
            rs = [fwd(kind, *t, False, D**-0.5) for t in views]
            dos = [torch.randn_like(x[0]) for x in rs]
            f = lambda: [fwd(kind, *t, False, D**-0.5) for t in views]
            b = lambda: [bwd(kind, x, d, *t, x[0], x[1], False, D**-0.5) for x, d, t in zip(rs, dos, views)]
            tf, tb = do_bench(f, warmup=5, rep=30), do_bench(b, warmup=5, rep=30)
            fl = 4 * N * (w // r) * D * H
            tim[f"{kind}/{w},{r}"] = dict(fwd_ms=tf, bwd_ms=tb, fwd_tf=fl / tf / 1e9, fb_tf=3.5 * fl / (tf + tb) / 1e9)
        except Exception as e:
            tim[f"{kind}/{w},{r}"] = dict(err=str(e)[:200])
        print(kind, w, r, tim[f"{kind}/{w},{r}"], flush=True)
# padded rows check
print("nan check out", {k: v for k, v in res.items() if "bias" in k})
# dense cudnn anchor at 64K
qd = torch.randn(1, H, 65536, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
from torch.nn.attention import SDPBackend, sdpa_kernel

with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
    f = lambda: torch.nn.functional.scaled_dot_product_attention(qd, qd, qd)
    tf = do_bench(f)
    o = f()
    go = torch.randn_like(o)
    tfb = do_bench(lambda: torch.autograd.grad(f(), qd, go))
fl = 4 * 65536**2 * D * H
print("dense cudnn 64K fwd TF", fl / tf / 1e9, "fwdbwd TF", 3.5 * fl / tfb / 1e9)
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(dict(res=res, tim=tim), open(os.path.join(os.environ.get("OUT", "/tmp"), "probe.json"), "w"), indent=1)
