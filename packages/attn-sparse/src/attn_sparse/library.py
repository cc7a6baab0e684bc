"""PatternLibrary: named block layouts with their parameters, in one safetensors file.

The file format is :mod:`attn_sparse.library_format` (version :data:`FORMAT_VERSION`): per
entry the CSR arrays, the pattern kind and parameters, the geometry and a SHA-256 digest tying
them together. No pickle, no ``torch.load``: :meth:`PatternLibrary.load` reads regular files only,
bounded by the sizes the header declares, checks the header, every tensor's dtype/shape/offsets,
the metadata types, version and digests and every CSR invariant, and raises ValueError for
anything malformed, truncated, hostile, tampered with or of another version. ``verify="rebuild"``
also rebuilds every pattern entry from its kind and parameters and compares the tiles.

:class:`LayoutCache` memoises built patterns (keyed on pattern kind + parameters, which fix the
geometry), least recently used first out, bounded by bytes, thread-safe.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .layout import BlockLayout
from .library_format import (
    CUSTOM_KIND,
    DEFAULT_MAX_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    InvalidFileError,
    StoredEntry,
    check_name,
    decode_bytes,
    read_file,
    write_file,
)
from .patterns import PATTERNS, build_pattern

__all__ = ["CUSTOM_KIND", "FORMAT_NAME", "FORMAT_VERSION", "VERIFY_MODES", "LayoutCache", "PatternLibrary"]

# "digest": check every entry's SHA-256 (format 2); "rebuild": also rebuild each pattern entry
# from its kind and parameters and compare the tiles (the only check a format 1 file can get).
VERIFY_MODES = ("digest", "rebuild")


def _canonical_params(params: Mapping[str, Any] | None) -> str:
    """Canonical JSON of pattern parameters (sorted keys; JSON types only; no NaN/inf). A 1-D
    integer tensor (``documents``' cu_seqlens) is recorded as its list of ints."""
    if params is None:
        return "{}"
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise TypeError(f"params must be a mapping with str keys, got {params!r}")
    plain = {
        k: v.tolist() if isinstance(v, torch.Tensor) and v.dim() == 1 and not v.is_floating_point() else v
        for k, v in params.items()
    }
    try:
        return json.dumps(plain, sort_keys=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"params must be JSON values (int, float, str, bool, None, lists, dicts): {exc}") from exc


class LayoutCache:
    """Bounded-by-bytes, thread-safe LRU cache of built patterns, keyed on (kind, parameters).

    The bound counts each layout's CSR arrays (:attr:`BlockLayout.nbytes`); arrays a layout derives
    later on its own (device copies, transposed CSR, a flex BlockMask) are freed with it on eviction.
    """

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str], BlockLayout] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """CSR bytes of the layouts held now (<= max_bytes)."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, kind: str, **params: Any) -> BlockLayout:
        """The layout of pattern ``kind`` with ``params`` (built on a miss)."""
        key = (kind, _canonical_params(params))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
        layout = build_pattern(kind, **params)  # built outside the lock: other lookups proceed
        size = layout.nbytes
        with self._lock:
            if key in self._items:  # another thread built it meanwhile: keep one copy
                return self._items[key]
            if size <= self.max_bytes:
                self._items[key] = layout
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.nbytes
        return layout

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


class _Entry:
    __slots__ = ("kind", "layout", "params")

    def __init__(self, layout: BlockLayout, kind: str, params: str) -> None:
        self.layout, self.kind, self.params = layout, kind, params


class PatternLibrary:
    """Named block layouts with the pattern kind and parameters that built them.

    >>> lib = PatternLibrary()
    >>> lib.add_pattern("win", "local_window", seq_len=4096, window=256, block_size=128)
    >>> lib.save("patterns.safetensors"); PatternLibrary.load("patterns.safetensors") == lib
    """

    def __init__(self, *, cache: LayoutCache | None = None) -> None:
        self._entries: dict[str, _Entry] = {}
        self._cache = cache if cache is not None else LayoutCache()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ entries
    def add(
        self, name: str, layout: BlockLayout, *, kind: str = CUSTOM_KIND, params: Mapping[str, Any] | None = None
    ) -> None:
        """Store ``layout`` under ``name`` (replacing any entry of that name), with its recipe."""
        check_name(name)
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        if kind != CUSTOM_KIND and kind not in PATTERNS:
            raise ValueError(f"kind must be {CUSTOM_KIND!r} or a pattern of {sorted(PATTERNS)}, got {kind!r}")
        entry = _Entry(layout.to("cpu"), kind, _canonical_params(params))
        with self._lock:
            self._entries[name] = entry

    def add_pattern(self, name: str, kind: str, **params: Any) -> BlockLayout:
        """Build pattern ``kind`` with ``params`` (through the cache) and store it as ``name``.

        ``device=`` (where to build) is not part of the stored recipe: the library keeps CPU copies.
        """
        layout = self._cache.get(kind, **params)
        self.add(name, layout, kind=kind, params={k: v for k, v in params.items() if k != "device"})
        return layout

    def _entry(self, name: str) -> _Entry:
        with self._lock:
            if name not in self._entries:
                raise KeyError(f"no layout named {name!r}; have {sorted(self._entries)}")
            return self._entries[name]

    def __getitem__(self, name: str) -> BlockLayout:
        return self._entry(name).layout

    def kind(self, name: str) -> str:
        """The pattern kind that built ``name`` ("custom" for a layout added directly)."""
        return self._entry(name).kind

    def params(self, name: str) -> dict[str, Any]:
        """The parameters ``name`` was built with (a fresh dict)."""
        result: dict[str, Any] = json.loads(self._entry(name).params)
        return result

    def masks(self, name: str) -> dict[str, Any]:
        """The token masks ``name``'s recipe records, to pass again at call time (the tiles only
        cover them): ``{"is_causal": bool, "window_size": (left, right) or None, "documents":
        number of documents or None}`` from its parameters ``is_causal``, ``window_size`` and
        ``cu_seqlens`` (a :func:`attn_sparse.patterns.documents` recipe holds the offsets and the
        masks it was given; the offsets themselves are ``params(name)["cu_seqlens"]``). A mask the
        recipe leaves out is absent (False / None, the patterns' defaults). Raises ValueError for
        recorded values of the wrong type."""
        p = self.params(name)
        causal, window, offsets = p.get("is_causal", False), p.get("window_size"), p.get("cu_seqlens")
        if not isinstance(causal, bool):
            raise ValueError(f"entry {name!r}: is_causal must be a bool, got {causal!r:.100}")
        if window is not None and not (
            isinstance(window, list) and len(window) == 2 and all(type(w) is int and w >= -1 for w in window)
        ):
            raise ValueError(f"entry {name!r}: window_size must be two ints >= -1 or null, got {window!r:.100}")
        if offsets is not None and not (isinstance(offsets, list) and offsets):
            raise ValueError(f"entry {name!r}: cu_seqlens must be a non-empty list of offsets, got {offsets!r:.100}")
        return {
            "is_causal": causal,
            "window_size": None if window is None else (window[0], window[1]),
            "documents": None if offsets is None else len(offsets) - 1,
        }

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._entries:
                raise KeyError(f"no layout named {name!r}")
            del self._entries[name]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PatternLibrary):
            return NotImplemented
        if self.names() != other.names():
            return False
        for n in self.names():
            a, b = self._entry(n), other._entry(n)
            if (a.kind, a.params) != (b.kind, b.params) or a.layout != b.layout:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PatternLibrary({', '.join(f'{n}: {self.kind(n)}' for n in self.names())})"

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write every entry to one safetensors file, each with its digest (atomically: a temp
        file beside ``path``, then a rename; the temp file never stays behind). Raises ValueError
        when ``path`` exists and is not a regular file."""
        write_file(path, [self._stored(n) for n in self.names()])

    def _stored(self, name: str) -> StoredEntry:
        e = self._entry(name)
        lay = e.layout
        return StoredEntry(
            name,
            e.kind,
            e.params,
            lay.block_size,
            lay.num_heads,
            lay.num_query_blocks,
            lay.num_key_blocks,
            lay.crow_indices,
            lay.col_indices,
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        verify: str = "digest",
        max_bytes: int = DEFAULT_MAX_BYTES,
        cache: LayoutCache | None = None,
    ) -> PatternLibrary:
        """Read a file written by :meth:`save`, validating everything.

        verify: "digest" checks every entry's SHA-256 against its metadata and tensors;
        "rebuild" also rebuilds every pattern entry from its kind and parameters (on the CPU) and
        compares the tiles. A format 1 file (no digests) loads only with "rebuild" (its custom
        entries are then checked as CSR only): save it again to upgrade it.
        Raises ValueError for a path that is not a regular file, a file above ``max_bytes`` and
        any malformed, truncated, hostile, tampered or version-mismatched content, and the usual
        OSError (FileNotFoundError, PermissionError, ...) when the file cannot be opened.
        """
        mode = _check_verify(verify)
        source = repr(str(path)) if isinstance(path, (str, os.PathLike)) else repr(path)
        try:
            version, entries = read_file(path, max_bytes=max_bytes)
            return cls._from_entries(version, entries, mode, cache)
        except InvalidFileError as exc:
            raise ValueError(f"invalid pattern library {source}: {exc}") from None

    @classmethod
    def from_bytes(
        cls, data: bytes, *, verify: str = "digest", cache: LayoutCache | None = None, source: str = "<bytes>"
    ) -> PatternLibrary:
        """Parse the bytes of a library file (the validation of :meth:`load`)."""
        mode = _check_verify(verify)
        try:
            version, entries = decode_bytes(data)
            return cls._from_entries(version, entries, mode, cache)
        except InvalidFileError as exc:
            raise ValueError(f"invalid pattern library {source}: {exc}") from None

    @classmethod
    def _from_entries(
        cls, version: int, entries: list[StoredEntry], verify: str, cache: LayoutCache | None
    ) -> PatternLibrary:
        if version < 2 and verify != "rebuild":
            raise InvalidFileError(
                f"format_version {version} files carry no integrity digests: load with verify='rebuild' "
                "(pattern entries are rebuilt from their recipe and compared) and save again to upgrade"
            )
        lib = cls(cache=cache)
        for e in entries:
            lib._entries[e.name] = _entry_from(e, verify == "rebuild")
        return lib


def _check_verify(verify: object) -> str:
    if not isinstance(verify, str) or verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    return verify


def _entry_from(e: StoredEntry, rebuild: bool) -> _Entry:
    if e.kind != CUSTOM_KIND and e.kind not in PATTERNS:
        raise InvalidFileError(
            f"entry {e.name!r}: kind must be {CUSTOM_KIND!r} or one of {sorted(PATTERNS)}, got {e.kind!r:.100}"
        )
    try:
        layout = BlockLayout.from_csr(
            e.crow_indices,
            e.col_indices,
            block_size=e.block_size,
            num_key_blocks=e.num_key_blocks,
            num_heads=e.num_heads,
        )
    except (TypeError, ValueError) as exc:
        raise InvalidFileError(f"entry {e.name!r}: {exc}") from None
    if rebuild and e.kind != CUSTOM_KIND:
        params = json.loads(e.params)
        try:  # "device" in the stored params is refused (passed twice): the library builds on the CPU
            rebuilt = build_pattern(e.kind, device="cpu", **params)
        except (TypeError, ValueError) as exc:
            raise InvalidFileError(
                f"entry {e.name!r}: its recipe {e.kind}({e.params:.200}) does not build: {exc}"
            ) from None
        if rebuilt != layout:
            raise InvalidFileError(
                f"entry {e.name!r}: the layout rebuilt from {e.kind}({e.params:.200}) differs from the stored tiles"
            )
    return _Entry(layout, e.kind, e.params)
