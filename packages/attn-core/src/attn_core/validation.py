"""Input validation shared by every public entry point of every package.

Errors name the bad value and what is allowed; nothing here uses assert for user input.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .memo import StorageMemo

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    same_length: bool = True,
) -> tuple[int, int, int, int, int]:
    """Validate q (B, N, H, D), k/v (B, Nk, Hkv, D) and an optional key_padding_mask (B, Nk) bool.

    Returns (B, N, H, Hkv, D). ``same_length`` requires Nk == N (self-attention layouts).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (B, N, H, D), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating tensor of dtype {[str(d) for d in FLOAT_DTYPES]}, got {t.dtype}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, N, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Nk, Hkv, Dk = k.shape
    if Bk != B:
        raise ValueError(f"batch size of k/v ({Bk}) must equal that of q ({B})")
    if same_length and Nk != N:
        raise ValueError(f"sequence length of k/v ({Nk}) must equal that of q ({N})")
    if Dk != D:
        raise ValueError(f"head dim of k/v ({Dk}) must equal that of q ({D})")
    if D == 0:
        raise ValueError("head dim D must be positive, got 0")
    if H == 0 or Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"number of query heads H={H} must be a positive multiple of kv heads Hkv={Hkv} (GQA)")
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, B, Nk, q.device)
    return B, N, H, Hkv, D


def check_key_padding_mask(mask: torch.Tensor, batch: int, length: int, device: torch.device) -> None:
    """key_padding_mask: (B, N) bool, True = padding key to ignore."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor of dtype bool, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must have dtype torch.bool (True = padding), got {mask.dtype}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"key_padding_mask must have shape (B, N) = {(batch, length)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask must be on {device} like q, got {mask.device}")


def resolve_softmax_scale(softmax_scale: float | None, head_dim: int) -> float:
    """Default 1/sqrt(D); an explicit scale must be a finite positive number."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {softmax_scale!r}")
    scale = float(softmax_scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"softmax_scale must be finite and > 0, got {softmax_scale!r}")
    return scale


def check_dropout(dropout_p: float, name: str = "dropout_p") -> float:
    """A dropout probability in [0, 1); ``name`` is the argument named in the error."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {dropout_p!r}")
    p = float(dropout_p)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {dropout_p!r}")
    return p


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_positive_int(name: str, value: object) -> int:
    """A positive int (bools refused): TypeError for the wrong type, ValueError for <= 0."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def check_positive_float(name: str, value: object) -> float:
    """A finite number > 0 (bools refused): TypeError for the wrong type, ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {value!r} of type {type(value).__name__}")
    result = float(value)
    if not (math.isfinite(result) and result > 0):
        raise ValueError(f"{name} must be a positive float, got {value!r}; allowed: finite values > 0")
    return result


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """One of the strings ``allowed``: TypeError for a non-str, ValueError for another string."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {list(allowed)}, got {value!r}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def check_factory_kwargs(device: object, dtype: object) -> dict[str, Any]:
    """Module ``device=`` / ``dtype=`` arguments, checked before any parameter is made.

    device: None, a torch.device, a str such as "cpu", "cuda:1" or "meta", or a CUDA index; it must
    exist here (a 0-element tensor is made on it). dtype: None or one of FLOAT_DTYPES.
    Returns the nn.Module factory kwargs {"device": ..., "dtype": ...}.
    """
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]} or None, got {dtype!r}")
    if device is None:
        return {"device": None, "dtype": dtype}
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise TypeError(f"device must be a torch.device, a str (e.g. 'cpu', 'cuda:0') or an int, got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a device: {str(exc).splitlines()[0]}") from None
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, ValueError, TypeError) as exc:  # e.g. CUDA missing or out of range
        raise ValueError(f"device={device!r} is not available here: {str(exc).splitlines()[0]}") from None
    return {"device": dev, "dtype": dtype}


def check_tensor(name: str, t: object, shape: tuple[int, ...], device: torch.device) -> None:
    """``t`` is a tensor of exactly ``shape`` on ``device`` (the other inputs' device)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {t.device}")


def indexed_device(device: torch.device) -> torch.device:
    """``device`` with its index: torch.device("cuda") names the current CUDA device, but compares
    unequal to the device of a tensor on it (cuda:0)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


# Host copies of cu_seqlens tensors on a GPU, per storage and version (the layers of a step pass
# the same tensor; packed training brings new offsets every step, so few are kept)
HOST_COPIES = 8
_HOST_COPIES = StorageMemo(HOST_COPIES, 1)


def cu_seqlens_on_host(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` on the CPU, as given (dtype and shape unchecked). A tensor on another device is
    copied once while its storage is alive and unmodified (weak reference, version counter): later
    calls with it, or with a view of the same storage and geometry, read nothing from the device.
    A CPU tensor is returned as is."""
    if cu_seqlens.device.type == "cpu":
        return cu_seqlens
    memo = _HOST_COPIES.memo_for((cu_seqlens,), ())
    return cu_seqlens.cpu() if memo is None else memo("host", cu_seqlens.cpu)


def check_cu_seqlens(cu_seqlens: object, *, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """Validate packed-document offsets (flash-attn's varlen convention) and return them unchanged.

    cu_seqlens: int32 (num_docs + 1,) on ``device`` (the inputs' device) or on the CPU, with
    0 = c[0] <= c[1] <= ... <= c[-1] = seq_len; document i covers positions [c[i], c[i+1]).
    Empty documents (equal consecutive offsets) are allowed, as in flash-attn. Documents are
    packed along the sequence, so the batch must be 1.

    Work is one vectorised pass on the host copy of :func:`cu_seqlens_on_host`: a tensor on a GPU
    is read once while it is alive and unmodified, so the layers and the backward of a step, which
    pass the same tensor, wait for the device once, not once per call.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(
            f"cu_seqlens must be a torch.Tensor of dtype torch.int32 (num_docs + 1,), got {type(cu_seqlens).__name__}"
        )
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens must have dtype torch.int32 (cumulative document offsets), got {cu_seqlens.dtype}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0:
        raise ValueError(
            f"cu_seqlens must be 1-D of shape (num_docs + 1,) with at least one entry, got shape {tuple(cu_seqlens.shape)}"
        )
    device = indexed_device(device)
    if cu_seqlens.device != device and cu_seqlens.device.type != "cpu":
        raise ValueError(f"cu_seqlens must be on {device} like q, or on the CPU, got {cu_seqlens.device}")
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch size B == 1 (documents packed along the sequence), got B={batch}")
    c = cu_seqlens_on_host(cu_seqlens).to(torch.int64)
    steps = c[1:] - c[:-1]
    first, last, lowest, decreases = torch.stack([c[0], c[-1], c.min(), (steps < 0).sum()]).tolist()
    if lowest < 0:
        i = int(torch.nonzero(c < 0)[0, 0])
        raise ValueError(f"cu_seqlens must be non-negative, got cu_seqlens[{i}] = {int(c[i])}")
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {first}")
    if decreases:
        i = int(torch.nonzero(steps < 0)[0, 0])
        raise ValueError(
            "cu_seqlens must be non-decreasing (equal neighbours are empty documents), got "
            f"cu_seqlens[{i}] = {int(c[i])} > cu_seqlens[{i + 1}] = {int(c[i + 1])}"
        )
    if last != seq_len:
        raise ValueError(f"cu_seqlens must end at the sequence length N = {seq_len}, got cu_seqlens[-1] = {last}")
    return cu_seqlens


def check_window_size(window_size: object) -> tuple[int, int]:
    """window_size (left, right) in tokens, flash-attn's convention: query i sees keys j with
    i - left <= j <= i + right; -1 means unbounded on that side. Returns it as a tuple of ints."""
    if isinstance(window_size, (str, bytes)) or not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of ints >= -1, got {window_size!r}")
    out = []
    for side in window_size:
        if isinstance(side, bool) or not isinstance(side, int):
            raise TypeError(f"window_size must be a pair (left, right) of ints >= -1, got {window_size!r}")
        if side < -1:
            raise ValueError(f"window_size sides must be >= -1 (-1 = unbounded), got {window_size!r}")
        out.append(side)
    return out[0], out[1]
