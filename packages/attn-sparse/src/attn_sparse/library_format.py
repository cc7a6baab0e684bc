"""The layout file format (one or many named CSR layouts in one safetensors file): write and read.

Version :data:`FORMAT_VERSION` (2): a safetensors file whose tensors are ``<name>/crow_indices``
and ``<name>/col_indices`` (int32, 1-D) for every entry, and whose string metadata holds
``format`` (:data:`FORMAT_NAME`), ``format_version`` and ``entries``: a JSON list of
``{name, kind, params, block_size, num_heads, num_query_blocks, num_key_blocks, nnz, sha256}``.
``sha256`` ties an entry's metadata to its tensors: the SHA-256 of :data:`DIGEST_TAG`, the
entry's canonical JSON without ``sha256`` (sorted keys, no spaces), a NUL byte, then the
little-endian int32 bytes of crow_indices and of col_indices (their lengths are in the metadata).
Version 1 files are the same without ``sha256``; :func:`read_file` returns them with
``digest=None`` and the caller decides (:meth:`attn_sparse.PatternLibrary.load`).

No pickle, no ``torch.load``. Reading is bounded: only regular files, the 8-byte header size
first, the header (at most :data:`MAX_HEADER_BYTES`) next, then exactly the data bytes the header
declares (the file must hold nothing else). Everything malformed, truncated, hostile, tampered
with or of another version raises :class:`InvalidFileError` (the callers turn it into ValueError).
This module knows the file, not :class:`attn_sparse.BlockLayout`: callers build layouts from
the validated entries with :meth:`BlockLayout.from_csr` (every CSR invariant checked there).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import secrets
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CUSTOM_KIND",
    "DEFAULT_MAX_BYTES",
    "DIGEST_TAG",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_HEADER_BYTES",
    "READABLE_VERSIONS",
    "InvalidFileError",
    "StoredEntry",
    "check_name",
    "decode",
    "decode_bytes",
    "encode",
    "entry_digest",
    "read_entry",
    "read_file",
    "write_file",
]

FORMAT_NAME = "attn_sparse.pattern_library"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no per-entry digest
DIGEST_TAG = b"attn_sparse.pattern_library entry v2\0"
CUSTOM_KIND = "custom"  # an entry's kind for a layout given directly, not built from a pattern
DEFAULT_MAX_BYTES = 2**31  # readers refuse larger files before reading them
MAX_HEADER_BYTES = 16 * 2**20
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_META_KEYS = {"format", "format_version", "entries"}
_ENTRY_KEYS_V1 = {"name", "kind", "params", "block_size", "num_heads", "num_query_blocks", "num_key_blocks", "nnz"}
_ENTRY_KEYS = {*_ENTRY_KEYS_V1, "sha256"}
_TENSOR_FIELDS = ("crow_indices", "col_indices")
_COUNTS = ("num_heads", "num_query_blocks", "num_key_blocks", "nnz")


class InvalidFileError(Exception):
    """A reason a layout file is rejected (callers raise ValueError naming the file)."""


def check_name(name: object) -> str:
    """Validate an entry name: 1-128 of letters, digits, '_', '.', '-', not starting with '.' or '-'."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"layout name must be 1-128 characters of letters, digits, '_', '.', '-' (not starting with '.' or '-'), got {name!r}"
        )
    return name


@dataclass(frozen=True)
class StoredEntry:
    """One named layout of a file: its recipe, geometry and CSR arrays (int32, CPU).

    ``params`` is the canonical JSON text of the pattern parameters; ``digest`` the stored sha256
    (None in a version 1 file). After :func:`decode` every field has the right type and the
    tensor lengths agree with the counts; the CSR invariants are the caller's to check."""

    name: str
    kind: str
    params: str
    block_size: tuple[int, int]
    num_heads: int
    num_query_blocks: int
    num_key_blocks: int
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    digest: str | None = None

    def metadata(self) -> dict[str, Any]:
        """The entry's JSON object without the digest."""
        return {
            "name": self.name,
            "kind": self.kind,
            "params": json.loads(self.params),
            "block_size": list(self.block_size),
            "num_heads": self.num_heads,
            "num_query_blocks": self.num_query_blocks,
            "num_key_blocks": self.num_key_blocks,
            "nnz": self.col_indices.numel(),
        }


def _swap_if_big_endian(t: torch.Tensor) -> torch.Tensor:
    """int32 <-> little-endian bytes order: a byte flip on big-endian hosts, nothing elsewhere."""
    if sys.byteorder == "little":
        return t
    return t.view(torch.uint8).reshape(-1, 4).flip(-1).contiguous().view(torch.int32).reshape(-1)


def _le_int32_bytes(t: torch.Tensor) -> bytes:
    """The little-endian bytes of an int32 tensor (no numpy: read from its memory, as safetensors does)."""
    data = _swap_if_big_endian(t.detach().to(device="cpu", dtype=torch.int32).contiguous())
    n = data.numel() * 4
    return bytes((ctypes.c_char * n).from_address(data.data_ptr())) if n else b""


def entry_digest(metadata: dict[str, Any], crow: torch.Tensor, col: torch.Tensor) -> str:
    """Hex SHA-256 binding an entry's metadata (without ``sha256``) to its CSR arrays."""
    h = hashlib.sha256(DIGEST_TAG)
    h.update(json.dumps(metadata, sort_keys=True, separators=(",", ":"), allow_nan=False).encode())
    h.update(b"\0")
    h.update(_le_int32_bytes(crow))
    h.update(_le_int32_bytes(col))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- writing
def encode(entries: Sequence[StoredEntry]) -> bytes:
    """The file bytes of ``entries`` (names unique), each with its digest."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    listed = []
    for e in entries:
        meta = e.metadata()
        tensors[f"{e.name}/crow_indices"] = e.crow_indices.to(device="cpu", dtype=torch.int32).contiguous()
        tensors[f"{e.name}/col_indices"] = e.col_indices.to(device="cpu", dtype=torch.int32).contiguous()
        listed.append({**meta, "sha256": entry_digest(meta, e.crow_indices, e.col_indices)})
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "entries": json.dumps(listed, sort_keys=True, allow_nan=False),
    }
    return save(tensors, metadata=metadata)


def write_file(path: str | os.PathLike[str], entries: Sequence[StoredEntry]) -> None:
    """Write ``entries`` to ``path`` atomically (a temp file beside it, then a rename).

    Raises ValueError when ``path`` exists and is not a regular file (a directory, a FIFO), the
    usual OSError when its folder is missing or not writable; the temp file never stays behind."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    target = Path(path)
    if target.exists() and not target.is_file():
        raise ValueError(f"cannot save to {str(target)!r}: it exists and is not a regular file")
    data = encode(entries)
    # a fresh name beside the target (concurrent saves do not collide); mode 0o666 less the umask,
    # as a plain open would give (mkstemp's 0o600 would hide the file from other users)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------- reading
def read_file(path: str | os.PathLike[str], *, max_bytes: int) -> tuple[int, list[StoredEntry]]:
    """(format version, entries) of the file at ``path``, read with bounded memory and time.

    Raises ValueError for a path that is not a regular file or is above ``max_bytes``,
    InvalidFileError for bad content, the usual OSError when it cannot be opened."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
    p = Path(path)
    # O_NONBLOCK: a FIFO swapped in after a stat must not block the open (rejected just below)
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        info = os.fstat(fd)  # of the file opened, not of whatever the path names by now
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{str(p)!r} is not a regular file (a directory, device, FIFO or socket)")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb", buffering=0) as f:
        size = info.st_size
        if size > max_bytes:
            raise ValueError(f"{str(p)!r} is {size} bytes, above max_bytes={max_bytes}")
        head = _read_exact(f, 8, "the 8-byte header size")
        n = int.from_bytes(head, "little")
        _check_header_size(n, size)
        header = _read_exact(f, n, f"the {n}-byte header")
        return decode(header, lambda body_len: _read_body(f, body_len, size - 8 - n))


def read_entry(path: str | os.PathLike[str], *, name: str | None, max_bytes: int) -> StoredEntry:
    """The entry ``name`` of a version 2 file (None: the file must hold exactly one), read by
    :func:`read_file`; every failure is a ValueError naming the file."""
    try:
        version, entries = read_file(path, max_bytes=max_bytes)
    except InvalidFileError as exc:
        raise ValueError(f"invalid layout file {str(path)!r}: {exc}") from None
    if version < 2:
        raise ValueError(
            f"layout file {str(path)!r} is format_version {version}, which has no integrity digests; "
            "read it with PatternLibrary.load(path, verify='rebuild')"
        )
    names = [e.name for e in entries]
    if name is None and len(entries) != 1:
        raise ValueError(f"layout file {str(path)!r} holds {len(entries)} layouts {names}; pass name= to pick one")
    for e in entries:
        if name is None or e.name == name:
            return e
    raise ValueError(f"layout file {str(path)!r} has no layout named {name!r}; it has {names}")


def _read_exact(f: Any, n: int, what: str) -> bytearray:
    """Exactly ``n`` bytes (n is already bounded by the file's size), or InvalidFileError."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            raise InvalidFileError(f"truncated: the file ended inside {what} ({got} of {n} bytes)")
        got += k
    return buf


def _read_body(f: Any, body_len: int, available: int) -> bytearray:
    if available != body_len:
        raise InvalidFileError(f"the header declares {body_len} data bytes, the file holds {available}")
    body = _read_exact(f, body_len, f"the {body_len} data bytes")
    if f.read(1):
        raise InvalidFileError("the file grew while it was read")
    return body


def _check_header_size(n: int, size: int) -> None:
    if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
        raise InvalidFileError(f"header size {n} is impossible for a {size}-byte file (max {MAX_HEADER_BYTES})")


def decode_bytes(data: bytes | bytearray | memoryview) -> tuple[int, list[StoredEntry]]:
    """(format version, entries) of file bytes held in memory (the checks of :func:`read_file`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidFileError(f"expected bytes, got {type(data).__name__}")
    data = memoryview(data).cast("B")
    if len(data) < 8:
        raise InvalidFileError(f"truncated: {len(data)} bytes, a safetensors file starts with an 8-byte header size")
    n = int.from_bytes(bytes(data[:8]), "little")
    _check_header_size(n, len(data))

    def body(body_len: int) -> bytearray:
        if len(data) - 8 - n != body_len:
            raise InvalidFileError(f"the header declares {body_len} data bytes, the file holds {len(data) - 8 - n}")
        return bytearray(data[8 + n :])

    return decode(bytes(data[8 : 8 + n]), body)


def decode(header_bytes: bytes | bytearray, read_body: Any) -> tuple[int, list[StoredEntry]]:
    """Validate the header, then ``read_body(body_len) -> bytearray`` the data, then the entries."""
    header = _json(bytes(header_bytes), "header")
    if not isinstance(header, dict):
        raise InvalidFileError("header must be a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InvalidFileError("__metadata__ must be a JSON object of strings")
    if meta.get("format") != FORMAT_NAME:
        raise InvalidFileError(f"metadata format must be {FORMAT_NAME!r}, got {meta.get('format')!r:.100}")
    version_text = meta.get("format_version")
    if version_text not in [str(v) for v in READABLE_VERSIONS]:
        raise InvalidFileError(
            f"format_version {version_text!r:.50} is not supported; this attn_sparse reads versions "
            f"{list(READABLE_VERSIONS)} and writes {FORMAT_VERSION}"
        )
    version = int(version_text)
    if set(meta) != _META_KEYS:
        raise InvalidFileError(f"unexpected metadata keys {sorted(set(meta) ^ _META_KEYS)}")
    raw_entries = _json(meta["entries"], "entries")
    if not isinstance(raw_entries, list):
        raise InvalidFileError("metadata 'entries' must be a JSON list")
    keys = _ENTRY_KEYS if version >= 2 else _ENTRY_KEYS_V1
    names: set[str] = set()
    for e in raw_entries:
        if not isinstance(e, dict) or set(e) != keys:
            raise InvalidFileError(
                f"each version {version} entry must be an object with keys {sorted(keys)}, got {e!r:.200}"
            )
        try:
            check_name(e["name"])
        except ValueError as exc:
            raise InvalidFileError(str(exc)) from None
        if e["name"] in names:
            raise InvalidFileError(f"duplicate entry name {e['name']!r}")
        names.add(e["name"])
    body_len = _check_tensor_table(header, names)
    body = read_body(body_len)
    return version, [_stored_entry(e, header, body) for e in raw_entries]


def _json(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise InvalidFileError(f"{what} is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def _nonneg_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_tensor_table(header: dict[str, Any], names: set[str]) -> int:
    """Validate every tensor's dtype/shape/offsets; the tensors must be exactly the entries' two
    arrays and tile the data bytes without gap or overlap (as safetensors writes them).
    Returns the number of data bytes."""
    expected = {f"{n}/{field}" for n in names for field in _TENSOR_FIELDS}
    if set(header) != expected:
        raise InvalidFileError(
            f"tensors {sorted(header)!r:.300} do not match the entries (expected {sorted(expected)!r:.300})"
        )
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise InvalidFileError(f"tensor {key!r} needs exactly dtype, shape, data_offsets")
        if info["dtype"] != "I32":
            raise InvalidFileError(f"tensor {key!r} must have dtype I32, got {info['dtype']!r:.50}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or len(shape) != 1 or not _nonneg_int(shape[0]):
            raise InvalidFileError(f"tensor {key!r} must be 1-D with a non-negative length, got shape {shape!r:.100}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_nonneg_int(o) for o in offsets):
            raise InvalidFileError(f"tensor {key!r} data_offsets must be two non-negative ints, got {offsets!r:.100}")
        begin, end = offsets
        if end < begin or end - begin != 4 * shape[0]:
            raise InvalidFileError(f"tensor {key!r} data_offsets {offsets} do not fit its shape {shape}")
        spans.append((begin, end))
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos:
            raise InvalidFileError("tensor data ranges overlap or leave a gap")
        pos = end
    return pos


def _stored_entry(e: dict[str, Any], header: dict[str, Any], body: bytearray) -> StoredEntry:
    name = e["name"]
    kind, params, bs = e["kind"], e["params"], e["block_size"]
    if not isinstance(kind, str):
        raise InvalidFileError(f"entry {name!r}: kind must be a string, got {kind!r:.100}")
    if not isinstance(params, dict):
        raise InvalidFileError(f"entry {name!r}: params must be a JSON object")
    if not isinstance(bs, list) or len(bs) != 2 or not all(_nonneg_int(b) for b in bs):
        raise InvalidFileError(f"entry {name!r}: block_size must be a list of two ints, got {bs!r:.100}")
    counts = {k: e[k] for k in _COUNTS}
    if not all(_nonneg_int(v) for v in counts.values()):
        raise InvalidFileError(f"entry {name!r}: {', '.join(_COUNTS)} must be ints >= 0, got {counts!r:.200}")
    digest = e.get("sha256")
    if digest is not None and (not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise InvalidFileError(f"entry {name!r}: sha256 must be 64 lowercase hex digits, got {digest!r:.100}")
    crow, col = (_tensor(header[f"{name}/{field}"], body) for field in _TENSOR_FIELDS)
    if crow.numel() != counts["num_heads"] * counts["num_query_blocks"] + 1 or col.numel() != counts["nnz"]:
        raise InvalidFileError(
            f"entry {name!r}: tensor lengths {crow.numel()}, {col.numel()} disagree with its metadata {counts}"
        )
    if digest is not None:
        meta = {k: v for k, v in e.items() if k != "sha256"}
        if entry_digest(meta, crow, col) != digest:
            raise InvalidFileError(
                f"entry {name!r}: sha256 does not match its metadata and tensors (the file was modified or corrupted)"
            )
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return StoredEntry(
        name,
        kind,
        canonical,
        (bs[0], bs[1]),
        counts["num_heads"],
        counts["num_query_blocks"],
        counts["num_key_blocks"],
        crow,
        col,
        digest,
    )


def _tensor(info: dict[str, Any], body: bytearray) -> torch.Tensor:
    begin, end = info["data_offsets"]
    if end == begin:
        return torch.zeros(0, dtype=torch.int32)
    raw = torch.frombuffer(body, dtype=torch.uint8, count=end - begin, offset=begin)
    return _swap_if_big_endian(raw.clone().view(torch.int32))  # an aligned copy in native order
