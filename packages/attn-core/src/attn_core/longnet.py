"""LongNet transformer layers and a decoder-only language model built on dilated attention.

Layers are pre-LN with MAGNETO sub-LayerNorms (arXiv 2210.06423): one inside the attention
(before its output projection, see :class:`MultiheadDilatedAttention`) and one inside the
feed-forward (before its second linear), with v/out/FFN weights initialised with gain
``gamma_init``; :func:`magneto_gamma` gives the paper's value for a stack of L layers.

Shapes are batch first: x (B, N, d_model); key padding masks (B, N) bool, True = padding.
Packed documents: ``cu_seqlens`` int32 (num_docs + 1,) with B == 1 (:func:`attn_core.pack_sequences`);
every layer then equals itself run on each document alone (attention stays within documents, the
rest acts per token), and :class:`LongNetLM` restarts positions at each document's start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.functional import gelu, linear, relu
from torch.utils.checkpoint import checkpoint

from .modules import MultiheadDilatedAttention
from .packing import document_positions
from .validation import (
    check_bool,
    check_choice,
    check_cu_seqlens,
    check_dropout,
    check_factory_kwargs,
    check_positive_float,
    check_positive_int,
)

__all__ = ["LongNetDecoderLayer", "LongNetEncoderLayer", "LongNetLM", "magneto_gamma"]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": gelu, "relu": relu}


def magneto_gamma(num_layers: int) -> float:
    """MAGNETO init gain sqrt(log(2L)) for an encoder-only or decoder-only stack of L layers."""
    return math.sqrt(math.log(2 * check_positive_int("num_layers", num_layers)))


class _LongNetLayer(nn.Module):
    """Pre-LN block: x + Dropout(DilatedMHA(LN(x))); x + Dropout(W2(subLN(act(W1(LN(x)))))).

    ``dropout`` acts on the residual branches; ``attention_dropout`` on the attention
    probabilities (default 0: the fused sdpa backend takes no dropout, so attention dropout > 0
    runs the pure PyTorch reference backend, see :func:`attn_core.explain`).
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        num_kv_heads: int | None = None,
        dim_feedforward: int | None = None,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation: str = "gelu",
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        head_mode: str = "all",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        # every option is checked before any parameter exists; MultiheadDilatedAttention checks
        # the dilated config, num_kv_heads, head_mode and backend
        factory = check_factory_kwargs(device, dtype)
        d_model = check_positive_int("d_model", d_model)
        nhead = check_positive_int("nhead", nhead)
        if d_model % nhead != 0:
            raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}")
        activation = check_choice("activation", activation, tuple(sorted(_ACTIVATIONS)))
        dropout = check_dropout(dropout, "dropout")
        check_dropout(attention_dropout, "attention_dropout")
        layer_norm_eps = check_positive_float("layer_norm_eps", layer_norm_eps)
        gamma_init = check_positive_float("gamma_init", gamma_init)
        ff = 4 * d_model if dim_feedforward is None else check_positive_int("dim_feedforward", dim_feedforward)
        self.self_attn = MultiheadDilatedAttention(
            d_model,
            nhead,
            segment_lengths,
            dilation_rates,
            num_kv_heads=num_kv_heads,
            dropout=attention_dropout,
            layer_norm=True,
            layer_norm_eps=layer_norm_eps,
            gamma_init=gamma_init,
            head_mode=head_mode,
            backend=backend,
            **factory,
        )
        self.activation = activation
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.linear1 = nn.Linear(d_model, ff, **factory)
        self.ffn_norm = nn.LayerNorm(ff, eps=layer_norm_eps, **factory)
        self.linear2 = nn.Linear(ff, d_model, **factory)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_normal_(self.linear1.weight, gain=gamma_init)
        nn.init.xavier_normal_(self.linear2.weight, gain=gamma_init)
        nn.init.zeros_(self.linear1.bias)
        nn.init.zeros_(self.linear2.bias)

    def _run(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        is_causal: bool,
        cu_seqlens: torch.Tensor | None,
    ) -> torch.Tensor:
        h = self.norm1(x)
        h, _ = self.self_attn(h, h, h, is_causal=is_causal, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)
        x = x + self.dropout(h)
        h = _ACTIVATIONS[self.activation](self.linear1(self.norm2(x)))
        x = x + self.dropout(self.linear2(self.ffn_norm(h)))
        return x


class LongNetEncoderLayer(_LongNetLayer):
    """Bidirectional LongNet layer.

    forward(src (B, N, d_model), *, src_key_padding_mask (B, N) bool, is_causal=False, cu_seqlens
    int32 (num_docs + 1,) with B == 1) -> (B, N, d_model).
    """

    def forward(
        self,
        src: torch.Tensor,
        *,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._run(src, src_key_padding_mask, is_causal, cu_seqlens)


class LongNetDecoderLayer(_LongNetLayer):
    """Decoder-only LongNet layer: causal dilated self-attention + FFN (no cross-attention).

    forward(tgt (B, N, d_model), *, tgt_key_padding_mask (B, N) bool, cu_seqlens int32
    (num_docs + 1,) with B == 1) -> (B, N, d_model).
    """

    def forward(
        self,
        tgt: torch.Tensor,
        *,
        tgt_key_padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._run(tgt, tgt_key_padding_mask, True, cu_seqlens)


def sinusoidal_positions(seq_len: int, dim: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(seq_len, dim) sinusoidal position encoding (Vaswani et al.); no length limit, no parameters."""
    return sinusoidal_encoding(torch.arange(seq_len, device=device), dim, dtype=dtype)


def sinusoidal_encoding(positions: torch.Tensor, dim: int, *, dtype: torch.dtype) -> torch.Tensor:
    """(N, dim) sinusoidal encoding of integer positions (N,) (e.g. restarting per packed document)."""
    device, seq_len = positions.device, positions.shape[0]
    # Angles in float64: at a million positions float32 would round pos * freq by ~0.06 rad.
    pos = positions.to(torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float64) * (-math.log(10000.0) / dim))
    pe = torch.zeros(seq_len, dim, device=device, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe.to(dtype)


class LongNetLM(nn.Module):
    """Decoder-only LongNet language model.

    token embedding (scaled by sqrt(d_model)) + sinusoidal positions -> ``num_layers`` x
    :class:`LongNetDecoderLayer` (MAGNETO gamma for the depth) -> LayerNorm -> vocabulary head
    (tied to the embedding by default).

    forward(input_ids (B, N) int64, *, key_padding_mask (B, N) bool, cu_seqlens int32 (num_docs + 1,)
    with B == 1) -> logits (B, N, vocab_size). Padded keys are never read into the attention result
    of any position. With cu_seqlens (documents packed along N, :func:`attn_core.pack_sequences`)
    positions restart at each document's start and the logits equal the model run on each document
    alone (a next-token loss over packed logits must not pair a document's last token with the next
    document's first).
    ``dropout`` (embedding and residual branches) and ``attention_dropout`` as in the layers.
    ``gradient_checkpointing=True`` recomputes each layer in backward (torch.utils.checkpoint,
    non-reentrant, RNG state preserved so dropout masks match) when training with grad enabled.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        nhead: int,
        num_layers: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        num_kv_heads: int | None = None,
        dim_feedforward: int | None = None,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation: str = "gelu",
        tie_weights: bool = True,
        gradient_checkpointing: bool = False,
        head_mode: str = "all",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        # the LM's own options, and the layers' (checked again by each layer) before the embedding
        # is made: a bad value fails here, by name, not deep in torch or after allocating
        factory = check_factory_kwargs(device, dtype)
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.d_model = check_positive_int("d_model", d_model)
        self.num_layers = check_positive_int("num_layers", num_layers)
        if self.d_model % check_positive_int("nhead", nhead) != 0:
            raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}")
        check_bool("tie_weights", tie_weights)
        gradient_checkpointing = check_bool("gradient_checkpointing", gradient_checkpointing)
        check_choice("activation", activation, tuple(sorted(_ACTIVATIONS)))
        check_dropout(dropout, "dropout")
        check_dropout(attention_dropout, "attention_dropout")
        if dim_feedforward is not None:
            check_positive_int("dim_feedforward", dim_feedforward)
        self.gradient_checkpointing = gradient_checkpointing
        self.embed = nn.Embedding(vocab_size, d_model, **factory)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        gamma = magneto_gamma(num_layers)
        self.layers = nn.ModuleList(
            LongNetDecoderLayer(
                d_model,
                nhead,
                segment_lengths,
                dilation_rates,
                num_kv_heads=num_kv_heads,
                dim_feedforward=dim_feedforward,
                dropout=dropout,
                attention_dropout=attention_dropout,
                activation=activation,
                gamma_init=gamma,
                head_mode=head_mode,
                backend=backend,
                **factory,
            )
            for _ in range(num_layers)
        )
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model, **factory)
        self.lm_head: nn.Linear | None = None
        if not tie_weights:
            self.lm_head = nn.Linear(d_model, vocab_size, bias=False, **factory)
            nn.init.normal_(self.lm_head.weight, std=d_model**-0.5)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must have an integer dtype (e.g. torch.int64), got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have 2 dims (B, N), got shape {tuple(input_ids.shape)}")
        if input_ids.device != self.embed.weight.device:
            raise ValueError(
                f"input_ids are on {input_ids.device} but the model's parameters are on {self.embed.weight.device}"
            )
        if input_ids.device.type == "meta":
            return  # no values to check (shape-only run)
        if input_ids.numel() > 0 and torch.compiler.is_compiling():
            # reading the range back to the host cannot be traced: a device-side assert instead
            in_range = ((input_ids >= 0) & (input_ids < self.vocab_size)).all()
            torch._assert_async(in_range, f"input_ids must lie in [0, vocab_size={self.vocab_size})")
        elif input_ids.numel() > 0:
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"input_ids must lie in [0, vocab_size={self.vocab_size}), got values in [{lo}, {hi}]")

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_ids(input_ids)
        B, N = input_ids.shape
        x = self.embed(input_ids) * math.sqrt(self.d_model)
        if cu_seqlens is None:
            x = x + sinusoidal_positions(N, self.d_model, device=x.device, dtype=x.dtype)
        else:
            check_cu_seqlens(cu_seqlens, batch=B, seq_len=N, device=x.device)
            _, positions = document_positions(cu_seqlens.to(x.device), N)
            x = x + sinusoidal_encoding(positions, self.d_model, dtype=x.dtype)
        x = self.dropout(x)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if use_ckpt:
                x = checkpoint(
                    layer, x, use_reentrant=False, tgt_key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens
                )
            else:
                x = layer(x, tgt_key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)
        x = self.norm(x)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return linear(x, weight)
