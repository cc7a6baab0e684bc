"""Block-sparse attention backends: one module per backend, imported lazily by ``attn_sparse.api``.

Backends never import each other. ``attn_sparse.api`` lists them in :data:`attn_sparse.api.BACKENDS`
("sdpa", "triton", "flex", "reference"; "auto" tries them in that order) and imports
``attn_sparse.backends.<name>`` on first use; a module that is absent is reported as
"not installed" and never picked.

Backend module contract
-----------------------
Every backend module defines:

``NAME: str``
    The backend's name (equal to the module name).

The module must import on every machine: optional dependencies (triton, a GPU toolchain) are
imported lazily or guarded, and their absence is one of the ``unsupported_reasons``. (A
ModuleNotFoundError raised while importing the backend module itself is only treated as "not
installed" when the missing module is the backend module; anything else propagates.)

``unsupported_reasons(q, k, v, layout, mask) -> list[str]``
    Why this backend cannot take the call; an empty list means it can. Must be cheap (no kernel
    launches, no compilation, no device synchronisation) and must never raise for a validated
    call: a missing optional dependency, a wrong device, an unsupported dtype/head dim/block size
    are all *reasons* ("needs a CUDA device, got cpu"). ``"auto"`` takes the first backend with
    no reasons; a pinned backend with reasons raises ValueError listing them (no fallback).

``block_sparse_attention(q, k, v, layout, mask, softmax_scale) -> torch.Tensor``
    The attention output ``out: (B, Nq, H, D)`` in q's dtype, differentiable with respect to
    q, k and v with exact gradients (wrap kernels in a ``torch.autograd.Function``).

``SUPPORTS_KEY_PADDING_MASK: bool`` (optional, default False)
    True when ``block_sparse_attention`` also accepts the keyword ``key_padding_mask``:
    ``(B, Nk)`` bool on q's device, True = padding key to ignore (passed only when the caller
    gave one). The API rejects a padded call for backends without it ("no key_padding_mask support").

What the API guarantees before it calls a backend (the backend need not re-check):

- ``q: (B, Nq, H, D)``, ``k, v: (B, Nk, Hkv, D)``; one float dtype (float16, bfloat16, float32,
  float64) and one device; ``H % Hkv == 0`` (GQA: query head ``j`` reads kv head
  ``j // (H // Hkv)``); D > 0. Tensors may be non-contiguous (call ``.contiguous()`` if needed).
- ``layout`` is an :class:`attn_sparse.layout.BlockLayout` already moved to ``q.device`` that fits
  the call (``layout.check_fits(Nq, Nk, H)`` passed):
    * ``layout.block_size == (Bq, Bk)``, powers of two >= 16 (64 and 128 are the production sizes);
    * ``layout.num_query_blocks == ceil(Nq / Bq)``, ``layout.num_key_blocks == ceil(Nk / Bk)``
      (the last block row/column may be partial: tokens past N do not exist);
    * ``layout.num_heads`` is 1 (one layout shared by every query head) or H (one per query head);
    * ``layout.crow_indices: (num_heads * num_query_blocks + 1,) int32`` CSR row offsets, row
      ``h * num_query_blocks + i`` holds the active key blocks of query block ``i`` of head ``h``;
    * ``layout.col_indices: (nnz,) int32``, strictly increasing within each row, in
      ``[0, num_key_blocks)``;
    * ``layout.transposed_csr() -> (ccol_indices (num_heads * num_key_blocks + 1,) int32,
      row_indices (nnz,) int32)``: the same tiles grouped by key block (for a backward pass over
      key blocks), rows sorted within each column; cached on the layout.
    * ``layout.max_blocks_per_row`` / ``layout.max_blocks_per_col``: python ints (grid sizing).
- ``mask``: an :class:`attn_sparse.masks.TokenMask` (validated): the token masks inside the tiles
  (``mask.causal``, ``mask.window``, ``mask.cu_seqlens``). Query token ``i`` sees key token ``j``
  only if ``mask.key_intervals`` puts ``j`` in its interval ``[lo_i, hi_i]`` (in addition to its
  tile being active). Causal is top-left aligned like SDPA (``j <= i``). Active tiles entirely
  outside the masks contribute nothing.
- ``softmax_scale``: a finite positive float (1/sqrt(D) already substituted for None).

Semantics every backend must meet: for each (batch, head, query token), softmax over the keys
of its active tiles (minus the keys the token masks remove) of ``scale * q.k``, times v. A query token that
sees no key (no active tile in its row, or all masked) outputs exactly 0, never NaN, and gets
zero gradients. The float64 reference is ``attn_core.reference.block_sparse_attention`` with
``layout.to_dense()`` as the block mask, and :meth:`TokenMask.dense` for the token masks.
"""
