"""PatternLibrary: named block layouts with their parameters, in one safetensors file.

File format (version :data:`FORMAT_VERSION`): a safetensors file whose tensors are
``<name>/crow_indices`` and ``<name>/col_indices`` (int32, 1-D) for every entry, and whose
string metadata holds ``format`` (:data:`FORMAT_NAME`), ``format_version`` and ``entries``: a JSON
list of ``{name, kind, params, block_size, num_heads, num_query_blocks, num_key_blocks, nnz}``.
No pickle, no ``torch.load``: :meth:`PatternLibrary.load` checks the header size, the header
JSON, every tensor's dtype/shape/offsets, the metadata types and version and every CSR
invariant, and raises ValueError for anything malformed, truncated, hostile or of another version.

:class:`LayoutCache` memoises built patterns (keyed on pattern kind + parameters, which fix the
geometry), least recently used first out, bounded by bytes, thread-safe.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .layout import BlockLayout
from .patterns import PATTERNS, build_pattern

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "LayoutCache", "PatternLibrary"]

FORMAT_NAME = "attn_sparse.pattern_library"
FORMAT_VERSION = 1
CUSTOM_KIND = "custom"  # a layout given directly, not built from a pattern
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_MAX_HEADER_BYTES = 16 * 2**20
_ENTRY_KEYS = {"name", "kind", "params", "block_size", "num_heads", "num_query_blocks", "num_key_blocks", "nnz"}
_TENSOR_FIELDS = ("crow_indices", "col_indices")


def _canonical_params(params: Mapping[str, Any] | None) -> str:
    """Canonical JSON of pattern parameters (sorted keys; JSON types only; no NaN/inf)."""
    if params is None:
        return "{}"
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise TypeError(f"params must be a mapping with str keys, got {params!r}")
    try:
        return json.dumps(dict(params), sort_keys=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"params must be JSON values (int, float, str, bool, None, lists, dicts): {exc}") from exc


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"layout name must be 1-128 characters of letters, digits, '_', '.', '-' (not starting with '.' or '-'), got {name!r}"
        )
    return name


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
        _check_name(name)
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
        """Write every entry to one safetensors file (atomically: a temp file, then rename)."""
        from safetensors.torch import save

        tensors: dict[str, torch.Tensor] = {}
        entries = []
        for n in self.names():
            e = self._entry(n)
            lay = e.layout
            tensors[f"{n}/crow_indices"] = lay.crow_indices.contiguous()
            tensors[f"{n}/col_indices"] = lay.col_indices.contiguous()
            entries.append(
                {
                    "name": n,
                    "kind": e.kind,
                    "params": json.loads(e.params),
                    "block_size": list(lay.block_size),
                    "num_heads": lay.num_heads,
                    "num_query_blocks": lay.num_query_blocks,
                    "num_key_blocks": lay.num_key_blocks,
                    "nnz": lay.nnz,
                }
            )
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "entries": json.dumps(entries, sort_keys=True, allow_nan=False),
        }
        data = save(tensors, metadata=metadata)
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, max_bytes: int = 2**31, cache: LayoutCache | None = None
    ) -> PatternLibrary:
        """Read a file written by :meth:`save`, validating everything.

        Raises ValueError for any malformed, truncated, hostile or version-mismatched content, and
        the usual OSError (FileNotFoundError, PermissionError, ...) when the file cannot be opened.
        max_bytes: refuse larger files before reading them.
        """
        p = Path(path)
        size = p.stat().st_size
        if size > max_bytes:
            raise ValueError(f"pattern library {str(p)!r} is {size} bytes, above max_bytes={max_bytes}")
        return cls.from_bytes(p.read_bytes(), cache=cache, source=str(p))

    @classmethod
    def from_bytes(cls, data: bytes, *, cache: LayoutCache | None = None, source: str = "<bytes>") -> PatternLibrary:
        """Parse the bytes of a library file (the validation of :meth:`load`)."""
        try:
            return cls._parse(data, cache)
        except _InvalidFileError as exc:
            raise ValueError(f"invalid pattern library {source}: {exc}") from None

    @classmethod
    def _parse(cls, data: bytes, cache: LayoutCache | None) -> PatternLibrary:
        header, body_len = _read_header(data)
        meta = header.pop("__metadata__", None)
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise _InvalidFileError("__metadata__ must be a JSON object of strings")
        if meta.get("format") != FORMAT_NAME:
            raise _InvalidFileError(f"metadata format must be {FORMAT_NAME!r}, got {meta.get('format')!r}")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise _InvalidFileError(
                f"format_version {meta.get('format_version')!r} is not supported; this attn_sparse reads version {FORMAT_VERSION}"
            )
        if set(meta) != {"format", "format_version", "entries"}:
            raise _InvalidFileError(
                f"unexpected metadata keys {sorted(set(meta) - {'format', 'format_version', 'entries'})}"
            )
        entries = _json(meta["entries"], "entries")
        if not isinstance(entries, list):
            raise _InvalidFileError("metadata 'entries' must be a JSON list")
        _check_tensor_table(header, body_len)
        expected: set[tuple[str, str]] = set()
        for e in entries:
            if not isinstance(e, dict) or set(e) != _ENTRY_KEYS:
                raise _InvalidFileError(f"each entry must be an object with keys {sorted(_ENTRY_KEYS)}, got {e!r:.200}")
            try:
                _check_name(e["name"])
            except ValueError as exc:
                raise _InvalidFileError(str(exc)) from None
            if e["name"] in {x[0] for x in expected}:
                raise _InvalidFileError(f"duplicate entry name {e['name']!r}")
            expected.add((e["name"], "crow_indices"))
            expected.add((e["name"], "col_indices"))
        names = {tuple(k.rsplit("/", 1)) for k in header}
        if names != expected:
            raise _InvalidFileError(
                f"tensors {sorted(header)} do not match the entries {sorted('/'.join(x) for x in expected)}"
            )
        from safetensors.torch import load as st_load

        try:
            tensors = st_load(data)
        except Exception as exc:  # safetensors reports malformed input with its own error types
            raise _InvalidFileError(f"safetensors could not read the tensors: {exc}") from None
        lib = cls(cache=cache)
        for e in entries:
            lib._entries[e["name"]] = _entry_from(e, tensors)
        return lib


class _InvalidFileError(Exception):
    """A reason a library file is rejected (turned into ValueError with the source)."""


def _json(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise _InvalidFileError(f"{what} is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def _read_header(data: bytes) -> tuple[dict[str, Any], int]:
    """(header object, number of data bytes after it), checking the header length."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _InvalidFileError(f"expected bytes, got {type(data).__name__}")
    if len(data) < 8:
        raise _InvalidFileError(f"truncated: {len(data)} bytes, a safetensors file starts with an 8-byte header size")
    n = int.from_bytes(bytes(data[:8]), "little")
    if n < 2 or n > _MAX_HEADER_BYTES or n > len(data) - 8:
        raise _InvalidFileError(f"header size {n} is impossible for a {len(data)}-byte file (max {_MAX_HEADER_BYTES})")
    header = _json(bytes(data[8 : 8 + n]), "header")
    if not isinstance(header, dict):
        raise _InvalidFileError("header must be a JSON object")
    return header, len(data) - 8 - n


def _nonneg_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_tensor_table(header: dict[str, Any], body_len: int) -> None:
    spans = []
    for key, info in header.items():
        parts = key.rsplit("/", 1)
        if len(parts) != 2 or parts[1] not in _TENSOR_FIELDS:
            raise _InvalidFileError(
                f"unexpected tensor {key!r:.200}; tensors are '<name>/crow_indices' and '<name>/col_indices'"
            )
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _InvalidFileError(f"tensor {key!r} needs exactly dtype, shape, data_offsets")
        if info["dtype"] != "I32":
            raise _InvalidFileError(f"tensor {key!r} must have dtype I32, got {info['dtype']!r:.50}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or len(shape) != 1 or not _nonneg_int(shape[0]):
            raise _InvalidFileError(f"tensor {key!r} must be 1-D with a non-negative length, got shape {shape!r:.100}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_nonneg_int(o) for o in offsets):
            raise _InvalidFileError(f"tensor {key!r} data_offsets must be two non-negative ints, got {offsets!r:.100}")
        begin, end = offsets
        if not begin <= end <= body_len or end - begin != 4 * shape[0]:
            raise _InvalidFileError(
                f"tensor {key!r} data_offsets {offsets} do not fit its shape {shape} in {body_len} data bytes"
            )
        spans.append((begin, end))
    spans.sort()
    for (_, e0), (b1, _) in itertools.pairwise(spans):
        if b1 < e0:
            raise _InvalidFileError("tensor data ranges overlap")


def _entry_from(e: dict[str, Any], tensors: dict[str, torch.Tensor]) -> _Entry:
    name = e["name"]
    kind, params = e["kind"], e["params"]
    if not isinstance(kind, str) or (kind != CUSTOM_KIND and kind not in PATTERNS):
        raise _InvalidFileError(
            f"entry {name!r}: kind must be {CUSTOM_KIND!r} or one of {sorted(PATTERNS)}, got {kind!r:.100}"
        )
    if not isinstance(params, dict):
        raise _InvalidFileError(f"entry {name!r}: params must be a JSON object")
    bs = e["block_size"]
    ints = {k: e[k] for k in ("num_heads", "num_query_blocks", "num_key_blocks", "nnz")}
    if not isinstance(bs, list) or len(bs) != 2 or not all(_nonneg_int(b) for b in bs):
        raise _InvalidFileError(f"entry {name!r}: block_size must be a list of two ints, got {bs!r:.100}")
    if not all(_nonneg_int(v) for v in ints.values()):
        raise _InvalidFileError(
            f"entry {name!r}: num_heads, num_query_blocks, num_key_blocks, nnz must be ints >= 0, got {ints}"
        )
    crow, col = tensors[f"{name}/crow_indices"], tensors[f"{name}/col_indices"]
    if crow.numel() != ints["num_heads"] * ints["num_query_blocks"] + 1 or col.numel() != ints["nnz"]:
        raise _InvalidFileError(
            f"entry {name!r}: tensor lengths {crow.numel()}, {col.numel()} disagree with its metadata {ints}"
        )
    try:
        layout = BlockLayout.from_csr(
            crow, col, block_size=(bs[0], bs[1]), num_key_blocks=ints["num_key_blocks"], num_heads=ints["num_heads"]
        )
        canonical = _canonical_params(params)
    except (TypeError, ValueError) as exc:
        raise _InvalidFileError(f"entry {name!r}: {exc}") from None
    return _Entry(layout, kind, canonical)
