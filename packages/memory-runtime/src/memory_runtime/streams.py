"""How a pool sees streams: a key per stream and fences (events) on them, for CPU and CUDA.

:class:`StreamOps` is the protocol (tests inject fakes); :class:`NoStreams` serves the CPU, where
every released block is reusable at once; :class:`CudaStreams` keys CUDA streams by their raw
handle and fences them with events.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any, Protocol

import torch

__all__ = ["CudaStreams", "NoStreams", "StreamOps", "cuda_current_device"]


class StreamOps(Protocol):
    """How the pool sees streams: a hashable key per stream and fences (events) on them.

    ``note_stream(key)`` (optional) is called, with that stream current, the first time the pool
    keeps memory for ``key``; ``fence(key)`` may be called later from any stream.
    """

    def current_key(self) -> Hashable: ...

    def fence(self, key: Hashable) -> Any: ...

    def done(self, fence: Any) -> bool: ...

    def wait(self, fence: Any) -> None: ...


class NoStreams:
    """CPU: no asynchrony, every block is reusable the moment it is released."""

    def current_key(self) -> Hashable:
        return None

    def fence(self, key: Hashable) -> Any:
        return None

    def done(self, fence: Any) -> bool:
        return True

    def wait(self, fence: Any) -> None:
        return None


class CudaStreams:
    """CUDA streams keyed by their raw ``cudaStream_t`` (an int); fences are events on the stream."""

    def __init__(self, device: torch.device) -> None:
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self._streams: dict[Hashable, torch.cuda.Stream] = {}
        # torch._C._cuda_getCurrentRawStream(device) returns the current stream's handle as an int
        # without building a Stream object (cheaper on the hot path). Private: guarded, with the
        # public accessor as the fallback.
        self.raw_current: Callable[[int], int] | None = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        self.current_key: Callable[[], Hashable]
        if self.raw_current is not None:
            self.current_key = functools.partial(self.raw_current, self.index)
        else:
            self.current_key = self._public_key

    def _public_key(self) -> Hashable:
        return torch.cuda.current_stream(self.index).cuda_stream

    def note_stream(self, key: Hashable) -> None:
        """Remember the Stream object behind ``key`` (current now) so a fence can be recorded on it later."""
        if key not in self._streams:
            self._streams[key] = torch.cuda.current_stream(self.index)

    def fence(self, key: Hashable) -> Any:
        event = torch.cuda.Event()
        event.record(self._streams[key])
        return event

    def done(self, fence: Any) -> bool:
        return bool(fence.query())

    def wait(self, fence: Any) -> None:
        fence.synchronize()


# torch._C._cuda_getDevice skips torch.cuda.current_device()'s lazy-init check (a pool's CUDA
# device was validated at construction). Private: guarded, public accessor as the fallback.
cuda_current_device: Callable[[], int] = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
