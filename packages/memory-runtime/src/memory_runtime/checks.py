"""Argument checks shared by the pools, arenas and buffer managers: one definition of a valid shape,
dtype, device and byte count, so every entry point accepts and rejects the same values.

A shape entry is anything ``operator.index`` accepts (Python and numpy integers, one-element
integer tensors), never a bool, never negative. A request's bytes are bounded by
:data:`MAX_REQUEST_BYTES` and computed with an early exit, so a shape of huge dimensions is
rejected in bounded time before anything is allocated.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

__all__ = [
    "MAX_DIM",
    "MAX_NDIM",
    "MAX_REQUEST_BYTES",
    "check_count",
    "check_dtype",
    "contiguous_strides",
    "normalize_shape",
    "request_nbytes",
    "resolve_device",
]

# torch sizes are int64.
MAX_DIM = (1 << 63) - 1
# More dimensions than any real buffer has; bounds the time spent checking a shape.
MAX_NDIM = 64
# No single request may exceed 2**48 bytes (256 TiB): no device or host has that much memory, and
# the pools' free-range keys (region << 48 | offset) need every slab below it.
MAX_REQUEST_BYTES = 1 << 48


def _index(value: Any, what: str) -> int:
    """``value`` as an int via operator.index; bools (Python, numpy, torch) are refused."""
    if type(value).__name__ in ("bool", "bool_"):  # Python bool, numpy.bool (numpy 2) / numpy.bool_ (1.x)
        raise TypeError(f"{what} must be an int, got the bool {value!r}")
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        raise TypeError(f"{what} must be an int, got a bool tensor {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}") from None


def check_count(value: Any, name: str, *, minimum: int = 0, maximum: int = MAX_REQUEST_BYTES) -> int:
    """An integer argument (a byte count, a length, an index) in ``[minimum, maximum]``, as an int.

    TypeError for a non-integer or a bool, ValueError naming ``name`` and the range otherwise.
    """
    out = _index(value, name)
    if not minimum <= out <= maximum:
        raise ValueError(f"{name} must be an int in [{minimum}, {maximum}], got {out}")
    return out


def normalize_shape(shape: Any) -> tuple[int, ...]:
    """A shape (an int, or a tuple / list / torch.Size of ints) as a tuple of Python ints.

    Entries: anything ``operator.index`` takes (numpy ints, one-element integer tensors), not
    bools, in ``[0, MAX_DIM]``; at most ``MAX_NDIM`` of them. TypeError / ValueError name the bad
    entry. The size in bytes is checked separately (:func:`request_nbytes`), once the dtype is known.
    """
    if type(shape) is tuple:  # fast path: a short tuple of in-range Python ints is returned as is
        for d in shape:
            if type(d) is not int or d < 0 or d > MAX_DIM:
                break
        else:
            if len(shape) <= MAX_NDIM:
                return shape
    if isinstance(shape, (tuple, list, torch.Size)):
        entries = list(shape)
    else:
        try:
            entries = [_index(shape, "shape")]
        except TypeError:
            raise TypeError(
                f"shape must be an int or a sequence of ints, got {type(shape).__name__} {shape!r}"
            ) from None
    if len(entries) > MAX_NDIM:
        raise ValueError(f"shape has {len(entries)} dimensions; at most {MAX_NDIM} are supported")
    out = []
    for d in entries:
        try:
            v = _index(d, "shape entries")
        except TypeError as exc:
            raise TypeError(f"{exc} in shape {tuple(entries)!r}") from None
        if v < 0:
            raise ValueError(f"shape entries must be >= 0, got {v} in shape {tuple(entries)!r}")
        if v > MAX_DIM:
            raise ValueError(f"shape entries must be < 2**63, got {v} in shape {tuple(entries)!r}")
        out.append(v)
    return tuple(out)


def request_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a contiguous ``shape`` of ``dtype`` (a shape from :func:`normalize_shape`).

    ValueError when the product of the non-zero entries times the item size exceeds
    MAX_REQUEST_BYTES -- zero-element shapes too, as their strides are that product -- and the
    product stops growing as soon as it passes the bound, so huge entries cost no more than small ones.
    """
    nbytes = dtype.itemsize
    for d in shape:
        if d:
            nbytes *= d
            if nbytes > MAX_REQUEST_BYTES:
                raise ValueError(
                    f"shape {shape} of {dtype} needs more than {MAX_REQUEST_BYTES} bytes (2**48), "
                    "the most one request may ask for"
                )
    return 0 if 0 in shape else nbytes


_STRIDES: dict[tuple[int, ...], tuple[int, ...]] = {}
# Bounded: cleared when full (dict get/set are atomic under the GIL, so no lock is needed).
STRIDE_CACHE_ENTRIES = 4096


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides (in elements) of ``shape``, as torch gives a contiguous tensor."""
    out = _STRIDES.get(shape)
    if out is not None:
        return out
    strides = [1] * len(shape)
    acc = 1
    for i in range(len(shape) - 1, -1, -1):
        strides[i] = acc
        acc *= max(shape[i], 1)
    if len(_STRIDES) >= STRIDE_CACHE_ENTRIES:
        _STRIDES.clear()
    out = _STRIDES[shape] = tuple(strides)
    return out


def check_dtype(dtype: Any) -> torch.dtype:
    """``dtype`` if it is a torch.dtype; TypeError otherwise."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    return dtype


def resolve_device(device: torch.device | str | int | None) -> torch.device:
    """A concrete CUDA device (with index) or the CPU; None picks CUDA when present. ValueError otherwise."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must name a torch device such as 'cuda:0' or 'cpu', got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise ValueError(f"device must be a CUDA device or 'cpu', got {device!r}")
    return dev
