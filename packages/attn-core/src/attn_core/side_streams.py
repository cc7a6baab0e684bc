"""Run independent pieces of work concurrently on a CUDA device's side streams (fork, then join).

Small attention calls (one document's segments on one or two heads) fill a few of the GPU's SMs;
several of them, and a long kernel beside them, fill it when they run on separate streams.
:func:`fork_join` runs each callable on its own stream after the work already queued on the
current stream, and makes the current stream wait for all of them, so callers see ordinary
stream-ordered semantics. It is also safe under CUDA graph capture (the side streams join the
capture through the fork's event).

The caching allocator stays safe without ``record_stream``: memory a callable allocates belongs to
its side stream's pool and is reused only by later work on that stream; memory allocated before
the fork is reused only by work queued after the join.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .memo import BoundedMemo

__all__ = ["MAX_SIDE_STREAMS", "fork_join"]

# Side streams per device: enough to fill an H100 with calls of ~16-32 CTAs each.
MAX_SIDE_STREAMS = 8
# (device index, lane) -> stream; bounded for processes that touch many devices
_STREAMS = BoundedMemo(max_entries=16 * MAX_SIDE_STREAMS)


def _side_stream(device: torch.device, lane: int) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _STREAMS.get((index, lane), lambda: torch.cuda.Stream(device=index))


def fork_join(work: Sequence[Callable[[], None]], device: torch.device, streams: int) -> None:
    """Run every callable of ``work`` on up to ``streams`` side streams of ``device`` (at most
    :data:`MAX_SIDE_STREAMS`): stream i takes callables i, i + s, ... in order. With fewer than two
    streams to use, off CUDA, or under torch.compile tracing, they run in order on the current
    stream.

    The callables must be independent: no element one of them writes is read or written by
    another.
    """
    count = min(len(work), streams, MAX_SIDE_STREAMS)
    if device.type != "cuda" or count < 2 or torch.compiler.is_compiling():
        for fn in work:
            fn()
        return
    main = torch.cuda.current_stream(device)
    lanes = [_side_stream(device, i) for i in range(count)]
    for lane in lanes:
        lane.wait_stream(main)
    for i, fn in enumerate(work):
        with torch.cuda.stream(lanes[i % len(lanes)]):
            fn()
    for lane in lanes:
        main.wait_stream(lane)
