"""Bad inputs to every public entry point raise ValueError/TypeError naming the value and what is allowed."""

from __future__ import annotations

import re

import pytest
import torch

from attn_core import (
    DilatedAttention,
    LongNetDecoderLayer,
    LongNetEncoderLayer,
    LongNetLM,
    MultiheadDilatedAttention,
    dilated_attention,
    explain,
)
from attn_core.blocks import block_backward, block_forward


def _qkv(B=2, N=8, H=4, Hkv=2, D=4, dtype=torch.float32):
    return (
        torch.randn(B, N, H, D, dtype=dtype),
        torch.randn(B, N, Hkv, D, dtype=dtype),
        torch.randn(B, N, Hkv, D, dtype=dtype),
    )


SEG, RATES = [4, 8], [1, 2]
q0, k0, v0 = _qkv()

# (id, kwargs overriding the good call, exception type, regex the message must match)
BAD_CALLS = [
    ("q rank 3", {"q": q0[0]}, ValueError, r"q must have 4 dims \(B, N, H, D\), got shape \(8, 4, 4\)"),
    ("k rank 5", {"k": k0[None]}, ValueError, r"k must have 4 dims .* got shape \(1, 2, 8, 2, 4\)"),
    (
        "batch mismatch",
        {"k": _qkv(B=3)[1], "v": _qkv(B=3)[2]},
        ValueError,
        r"batch size of k/v \(3\) must equal that of q \(2\)",
    ),
    ("length mismatch", {"k": _qkv(N=9)[1], "v": _qkv(N=9)[2]}, ValueError, r"sequence length of k/v \(9\).*\(8\)"),
    (
        "k/v shape mismatch",
        {"v": _qkv(Hkv=1)[2]},
        ValueError,
        r"k and v must have the same shape, got \(2, 8, 2, 4\) and \(2, 8, 1, 4\)",
    ),
    (
        "head dim mismatch",
        {"k": _qkv(D=8)[1], "v": _qkv(D=8)[2]},
        ValueError,
        r"head dim of k/v \(8\) must equal that of q \(4\)",
    ),
    (
        "H % Hkv",
        {"k": _qkv(Hkv=3)[1], "v": _qkv(Hkv=3)[2]},
        ValueError,
        r"H=4 must be a positive multiple of kv heads Hkv=3",
    ),
    ("int q", {"q": q0.to(torch.int64)}, TypeError, r"q must be a floating tensor .* got torch.int64"),
    (
        "int k/v",
        {"k": k0.to(torch.int32), "v": v0.to(torch.int32)},
        TypeError,
        r"k must be a floating tensor .* got torch.int32",
    ),
    ("mixed dtypes", {"q": q0.double()}, TypeError, r"one dtype, got torch.float64, torch.float32, torch.float32"),
    ("not a tensor", {"q": q0.tolist()}, TypeError, r"q must be a torch.Tensor, got list"),
    ("mixed devices", {"k": k0.to("meta"), "v": v0.to("meta")}, ValueError, r"one device, got cpu, meta, meta"),
    (
        "segment % rate",
        {"segment_lengths": [4, 6], "dilation_rates": [1, 4]},
        ValueError,
        r"segment length 6 is not divisible by its dilation rate 4",
    ),
    (
        "unequal lists",
        {"dilation_rates": [1, 2, 4]},
        ValueError,
        r"same length, got 2 \(\[4, 8\]\) and 3 \(\[1, 2, 4\]\)",
    ),
    (
        "empty lists",
        {"segment_lengths": [], "dilation_rates": []},
        ValueError,
        r"segment_lengths must name at least one",
    ),
    ("zero segment", {"segment_lengths": [0, 8]}, ValueError, r"segment lengths must be positive, got 0 in \[0, 8\]"),
    ("negative segment", {"segment_lengths": [-4, 8]}, ValueError, r"segment lengths must be positive, got -4"),
    ("zero rate", {"dilation_rates": [0, 2]}, ValueError, r"dilation rates must be positive, got 0 in \[0, 2\]"),
    ("negative rate", {"dilation_rates": [1, -2]}, ValueError, r"dilation rates must be positive, got -2"),
    (
        "float segment",
        {"segment_lengths": [4.0, 8]},
        TypeError,
        r"segment_lengths must contain ints, got 4.0 of type float",
    ),
    ("bool rate", {"dilation_rates": [True, 2]}, TypeError, r"dilation_rates must contain ints, got True"),
    (
        "segments not a sequence",
        {"segment_lengths": 8},
        TypeError,
        r"segment_lengths must be a sequence of positive ints, got 8",
    ),
    (
        "0-d tensor segments",
        {"segment_lengths": torch.tensor(8)},
        TypeError,
        r"segment_lengths must be a sequence of positive ints, got tensor\(8\)",
    ),
    (
        "float array rates",
        {"dilation_rates": torch.tensor([1.0, 2.0])},
        TypeError,
        r"dilation_rates must contain ints, got tensor\(1\.\) of type Tensor",
    ),
    ("string segments", {"segment_lengths": "48"}, TypeError, r"segment_lengths must be a sequence .* got '48'"),
    (
        "mask wrong shape",
        {"key_padding_mask": torch.zeros(2, 7, dtype=torch.bool)},
        ValueError,
        r"key_padding_mask must have shape \(B, N\) = \(2, 8\), got \(2, 7\)",
    ),
    (
        "mask 3 dims",
        {"key_padding_mask": torch.zeros(2, 8, 1, dtype=torch.bool)},
        ValueError,
        r"key_padding_mask must have shape .* got \(2, 8, 1\)",
    ),
    (
        "mask float",
        {"key_padding_mask": torch.zeros(2, 8)},
        TypeError,
        r"key_padding_mask must have dtype torch.bool .* got torch.float32",
    ),
    (
        "mask list",
        {"key_padding_mask": [[False] * 8] * 2},
        TypeError,
        r"key_padding_mask must be a torch.Tensor .* got list",
    ),
    (
        "mask device",
        {"key_padding_mask": torch.zeros(2, 8, dtype=torch.bool, device="meta")},
        ValueError,
        r"key_padding_mask must be on cpu like q, got meta",
    ),
    ("negative scale", {"softmax_scale": -1.0}, ValueError, r"softmax_scale must be finite and > 0, got -1.0"),
    ("nan scale", {"softmax_scale": float("nan")}, ValueError, r"softmax_scale must be finite and > 0, got nan"),
    ("string scale", {"softmax_scale": "0.5"}, TypeError, r"softmax_scale must be a float or None, got '0.5'"),
    ("dropout 1", {"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    ("dropout negative", {"dropout_p": -0.1}, ValueError, r"dropout_p must be in \[0, 1\), got -0.1"),
    ("dropout bool", {"dropout_p": True}, TypeError, r"dropout_p must be a float in \[0, 1\), got True"),
    ("head mode", {"head_mode": "heads"}, ValueError, r"head_mode must be one of \('all', 'split'\), got 'heads'"),
    ("is_causal int", {"is_causal": 1}, TypeError, r"is_causal must be a bool, got 1"),
    ("unknown backend", {"backend": "cuda"}, ValueError, r"unknown backend 'cuda'; allowed: \('auto', "),
    ("backend not str", {"backend": None}, TypeError, r"backend must be a str, one of .* got None"),
]


def _call(fn, overrides):
    args = {"q": q0, "k": k0, "v": v0, "segment_lengths": SEG, "dilation_rates": RATES}
    args.update(overrides)
    pos = [args.pop(n) for n in ("q", "k", "v", "segment_lengths", "dilation_rates")]
    return fn(*pos, **args)


@pytest.mark.parametrize(("overrides", "exc", "match"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
@pytest.mark.parametrize("entry", ["dilated_attention", "explain"])
def test_bad_calls_raise_with_the_value(entry, overrides, exc, match):
    fn = dilated_attention if entry == "dilated_attention" else explain
    with pytest.raises(exc, match=match):
        _call(fn, overrides)


def test_good_call_passes():
    # The base call of the table above is valid: every failure there comes from its one change.
    assert _call(dilated_attention, {}).shape == q0.shape


BAD_MODULE_CONFIGS = [
    (lambda: DilatedAttention([4, 6], [1, 4]), ValueError, "segment length 6 is not divisible by its dilation rate 4"),
    (lambda: DilatedAttention([4], [1], dropout=1.5), ValueError, r"dropout must be in \[0, 1\), got 1.5"),
    (
        lambda: DilatedAttention([4], [1], softmax_scale=0.0),
        ValueError,
        "softmax_scale must be finite and > 0, got 0.0",
    ),
    (lambda: DilatedAttention([4], [1], backend="fast"), ValueError, "unknown backend 'fast'"),
    (lambda: DilatedAttention([4], [1], head_mode="x"), ValueError, "head_mode must be one of"),
    (lambda: MultiheadDilatedAttention(30, 4, [4], [1]), ValueError, "embed_dim=30 must be divisible by num_heads=4"),
    (
        lambda: MultiheadDilatedAttention(32, 4, [4], [1], num_kv_heads=3),
        ValueError,
        r"num_heads=4 must be a multiple of num_kv_heads=3",
    ),
    (lambda: MultiheadDilatedAttention(32, 0, [4], [1]), ValueError, "num_heads must be a positive int, got 0"),
    (lambda: MultiheadDilatedAttention(32.0, 4, [4], [1]), TypeError, "embed_dim must be a positive int, got 32.0"),
    (
        lambda: MultiheadDilatedAttention(32, 4, [4], [1], gamma_init=-1.0),
        ValueError,
        "gamma_init must be a positive float, got -1.0",
    ),
    (
        lambda: MultiheadDilatedAttention(32, 4, [4], [1], dtype=torch.int32),
        TypeError,
        "dtype must be one of .* got torch.int32",
    ),
    (lambda: LongNetLM(0, 32, 4, 2, [4], [1]), ValueError, "vocab_size must be a positive int, got 0"),
    (lambda: LongNetLM(10, 32, 4, 0, [4], [1]), ValueError, "num_layers must be a positive int, got 0"),
    (
        lambda: LongNetLM(10, 32, 4, 1, [4], [1], activation="tanh"),
        ValueError,
        r"activation must be one of \['gelu', 'relu'\], got 'tanh'",
    ),
    (lambda: LongNetLM(10, 32, 4, 1, [4], [1], tie_weights=1), TypeError, "tie_weights must be a bool, got 1"),
    (
        lambda: LongNetLM(10, 32, 4, 1, [4], [1], dim_feedforward=-8),
        ValueError,
        "dim_feedforward must be a positive int, got -8",
    ),
    (lambda: LongNetLM(10, 32, 4, 1, [4], [1], dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got 1.0"),
    (
        lambda: LongNetLM(10, 32, 4, 1, [4], [1], attention_dropout=-0.5),
        ValueError,
        r"attention_dropout must be in \[0, 1\), got -0.5",
    ),
]


@pytest.mark.parametrize(("make", "exc", "match"), BAD_MODULE_CONFIGS)
def test_bad_module_configs(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_bad_module_inputs():
    mha = MultiheadDilatedAttention(16, 4, [4], [1], num_kv_heads=2)
    x = torch.randn(2, 8, 16)
    with pytest.raises(
        ValueError, match=re.escape("query must have 3 dims (B, N, E) (batch first), got shape (8, 16)")
    ):
        mha(x[0], x[0], x[0])
    with pytest.raises(ValueError, match=re.escape("key last dim must be embed_dim=16, got shape (2, 8, 12)")):
        mha(x, x[..., :12], x[..., :12])
    with pytest.raises(ValueError, match=re.escape("key/value (B, N) = (2, 6) must equal query's (2, 8)")):
        mha(x, x[:, :6], x[:, :6])
    with pytest.raises(ValueError, match="key and value must have the same shape"):
        mha(x, x, x[:, :6])
    with pytest.raises(TypeError, match=r"value must be a torch\.Tensor, got NoneType"):
        mha(x, x, None)
    with pytest.raises(TypeError, match=r"key must be a floating tensor, got torch\.int64"):
        mha(x, x.long(), x)
    with pytest.raises(ValueError, match=r"query is on meta but the module's parameters are on cpu"):
        mha(x.to("meta"), x, x)
    with pytest.raises(ValueError, match=re.escape("key_padding_mask must have shape (B, N) = (2, 8), got (8,)")):
        mha(x, x, x, key_padding_mask=torch.zeros(8, dtype=torch.bool))

    lm = LongNetLM(10, 16, 4, 1, [4], [1])
    with pytest.raises(TypeError, match=r"input_ids must have an integer dtype .* got torch\.float32"):
        lm(torch.zeros(2, 8))
    with pytest.raises(ValueError, match=re.escape("input_ids must lie in [0, vocab_size=10), got values in [0, 10]")):
        lm(torch.tensor([[0, 10, 3]]))
    with pytest.raises(ValueError, match=re.escape("got values in [-1, 3]")):
        lm(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match=re.escape("input_ids must have 2 dims (B, N), got shape (3,)")):
        lm(torch.tensor([1, 2, 3]))


def test_zero_query_heads_is_rejected_with_the_gqa_rule() -> None:
    q = torch.randn(2, 16, 0, 8)
    k = torch.randn(2, 16, 1, 8)
    with pytest.raises(ValueError, match="H=0 must be a positive multiple"):
        dilated_attention(q, k, k, [4], [1], backend="reference")


INF, NAN = float("inf"), float("nan")
MHA = MultiheadDilatedAttention
# every option of every module, checked at construction (before any parameter is made)
BAD_MODULE_OPTIONS = [
    (lambda: MHA(32, 4, [4], [1], gamma_init=INF), ValueError, "gamma_init must be a positive float, got inf"),
    (lambda: MHA(32, 4, [4], [1], gamma_init=NAN), ValueError, "gamma_init must be a positive float, got nan"),
    (lambda: MHA(32, 4, [4], [1], gamma_init="1"), TypeError, "gamma_init must be a positive float, got '1'"),
    (lambda: MHA(32, 4, [4], [1], layer_norm_eps=-1), ValueError, "layer_norm_eps must be a positive float, got -1"),
    (lambda: MHA(32, 4, [4], [1], layer_norm_eps=0.0), ValueError, "layer_norm_eps must be a positive float, got 0.0"),
    (lambda: MHA(32, 4, [4], [1], layer_norm_eps="x"), TypeError, "layer_norm_eps must be a positive float, got 'x'"),
    (lambda: MHA(32, 4, [4], [1], bias="no"), TypeError, "bias must be a bool, got 'no'"),
    (lambda: MHA(32, 4, [4], [1], layer_norm=1), TypeError, "layer_norm must be a bool, got 1"),
    (lambda: MHA(32, 4, [4], [1], num_kv_heads=2.0), TypeError, "num_kv_heads must be a positive int, got 2.0"),
    (lambda: MHA(32, 4, [4], [1], dropout="0.1"), TypeError, "dropout must be a float in"),
    (lambda: MHA(32, 4, [4], [1], device="bogus"), ValueError, "device='bogus' is not a device"),
    (lambda: MHA(32, 4, [4], [1], device=3.5), TypeError, "device must be a torch.device, a str .* got 3.5"),
    (lambda: MHA(32, 4, [4], [1], device="cuda:99"), ValueError, "device='cuda:99' is not available here"),
    (lambda: MHA(32, 4, [4], [1], dtype="float32"), TypeError, "dtype must be one of .* got 'float32'"),
    (lambda: DilatedAttention([4], [1], dropout=None), TypeError, "dropout must be a float in"),
    (lambda: DilatedAttention([4], [1], backend=None), TypeError, "backend must be a str"),
    (lambda: LongNetEncoderLayer(0, 2, [4], [1]), ValueError, "d_model must be a positive int, got 0"),
    (lambda: LongNetEncoderLayer(8, 3, [4], [1]), ValueError, "d_model=8 must be divisible by nhead=3"),
    (lambda: LongNetEncoderLayer(8, 2.0, [4], [1]), TypeError, "nhead must be a positive int, got 2.0"),
    (lambda: LongNetEncoderLayer(8, 2, [4], [1], layer_norm_eps=NAN), ValueError, "layer_norm_eps must be a"),
    (lambda: LongNetEncoderLayer(8, 2, [4], [1], gamma_init=-INF), ValueError, "gamma_init must be a positive"),
    (lambda: LongNetDecoderLayer(8, 2, [4], [1], activation=["gelu"]), TypeError, "activation must be a str"),
    (lambda: LongNetDecoderLayer(8, 2, [4], [1], dropout=-0.1), ValueError, r"dropout must be in \[0, 1\)"),
    (lambda: LongNetDecoderLayer(8, 2, [4], [1], device="bogus"), ValueError, "device='bogus' is not a device"),
    (lambda: LongNetDecoderLayer(8, 2, [4], [1], dim_feedforward=1.5), TypeError, "dim_feedforward must be"),
    (lambda: LongNetLM(10, 8, 2, 1, [4], [1], device="bogus"), ValueError, "device='bogus' is not a device"),
    (lambda: LongNetLM(10, 8, 2, 1, [4], [1], dtype=torch.int64), TypeError, "dtype must be one of .* torch.int64"),
    (lambda: LongNetLM(10, 8, "2", 1, [4], [1]), TypeError, "nhead must be a positive int, got '2'"),
    (lambda: LongNetLM(10, 8, 3, 1, [4], [1]), ValueError, "d_model=8 must be divisible by nhead=3"),
    (lambda: LongNetLM(10.0, 8, 2, 1, [4], [1]), TypeError, "vocab_size must be a positive int, got 10.0"),
    (lambda: LongNetLM(10, 8, 2, 1, [4], [1], activation=None), TypeError, "activation must be a str"),
    (
        lambda: LongNetLM(10, 8, 2, 1, [4], [1], gradient_checkpointing="yes"),
        TypeError,
        "gradient_checkpointing must be a bool, got 'yes'",
    ),
    (lambda: LongNetLM(10, 8, 2, 1, [4], [1], num_kv_heads=0), ValueError, "num_kv_heads must be a positive int"),
    (lambda: LongNetLM(10, 8, 2, 1, [4], [3]), ValueError, "segment length 4 is not divisible"),
]


@pytest.mark.parametrize(("make", "exc", "match"), BAD_MODULE_OPTIONS)
def test_bad_module_options_fail_at_construction(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_meta_tensors_run_shape_only_or_say_why():
    q, k, v = (t.to("meta") for t in _qkv())
    assert dilated_attention(q, k, v, SEG, RATES).shape == q.shape  # auto: the reference backend
    assert explain(q, k, v, SEG, RATES).backend == "reference"
    with pytest.raises(ValueError, match="backend 'sdpa' cannot take this input: device type 'meta' is not supported"):
        dilated_attention(q, k, v, SEG, RATES, backend="sdpa")
    mha = MultiheadDilatedAttention(16, 4, SEG, RATES, device="meta")
    x = torch.randn(2, 8, 16, device="meta")
    assert mha(x, x, x)[0].shape == x.shape
    lm = LongNetLM(10, 16, 4, 1, SEG, RATES, device="meta")
    assert lm(torch.zeros(2, 8, dtype=torch.long, device="meta")).shape == (2, 8, 10)
    o, lse = block_forward(q, k, v, softmax_scale=0.5)
    assert o.shape == q.shape and lse.shape == (2, 4, 8)


def test_inputs_on_the_wrong_device_say_so():
    q, k, v = _qkv()
    meta_mask = torch.zeros(2, 8, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="key_padding_mask must be on cpu like q, got meta"):
        dilated_attention(q, k, v, SEG, RATES, key_padding_mask=meta_mask)
    with pytest.raises(ValueError, match="key_padding_mask must be on cpu like q, got meta"):
        block_forward(q, k, v, softmax_scale=0.5, key_padding_mask=meta_mask)
    with pytest.raises(ValueError, match="q, k, v must be on one device, got cpu, meta, meta"):
        block_forward(q, k.to("meta"), v.to("meta"), softmax_scale=0.5)
    out, lse = block_forward(q, k, v, softmax_scale=0.5)
    with pytest.raises(ValueError, match="lse must be on cpu like q, got meta"):
        block_backward(out, q, k, v, out, lse.to("meta"), softmax_scale=0.5)
    with pytest.raises(ValueError, match=re.escape("lse must have shape (2, 4, 8), got (2, 4, 7)")):
        block_backward(out, q, k, v, out, lse[..., :7], softmax_scale=0.5)
    with pytest.raises(ValueError, match=re.escape("dout must have shape (2, 8, 4, 4), got (2, 7, 4, 4)")):
        block_backward(out[:, :7], q, k, v, out, lse, softmax_scale=0.5)
    with pytest.raises(TypeError, match=r"key_padding_mask must have dtype torch\.bool"):
        block_forward(q, k, v, softmax_scale=0.5, key_padding_mask=torch.zeros(2, 8))
    mha = MultiheadDilatedAttention(16, 4, SEG, RATES)
    x = torch.randn(2, 8, 16)
    with pytest.raises(ValueError, match="key_padding_mask must be on cpu like q, got meta"):
        mha(x, x, x, key_padding_mask=meta_mask)
    lm = LongNetLM(10, 16, 4, 1, SEG, RATES)
    with pytest.raises(ValueError, match="input_ids are on meta but the model's parameters are on cpu"):
        lm(torch.zeros(2, 8, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="key_padding_mask must be on cpu like q, got meta"):
        lm(torch.zeros(2, 8, dtype=torch.long), key_padding_mask=meta_mask)
