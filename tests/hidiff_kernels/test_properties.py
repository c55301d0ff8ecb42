"""Property-based tests: random valid arguments match the reference, random invalid ones are refused clearly.

Valid draws run the public ops' Triton kernels (on CPU under TRITON_INTERPRET=1; skipped without it, where
the ops would run the reference itself) on tiny random shapes, layouts and arguments and compare with
``hidiff_kernels.reference``.
Invalid draws take a valid call, break one thing, and expect a ValueError/TypeError whose message names
the problem, from the op and its reference twin alike (never an IndexError or RuntimeError from deep inside
torch or Triton, and never a silent result).
"""
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hidiff_kernels
from hidiff_kernels import reference

from conftest import relative_error, requires_interpreter

# Interpreted kernels are slow: few, tiny examples; derandomized so CI replays the same ones.
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
valid_settings = settings(max_examples=40, **SETTINGS)
invalid_settings = settings(max_examples=10, **SETTINGS)  # per broken argument: cheap, no kernel runs


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


seeds = st.integers(0, 2**31 - 1)

# ---------------------------------------------------------------------------------------------- msw_attention


def msw_layout(t, layout):
    """The same values as [B, N, heads, d] tensor t, in another memory layout."""
    if layout == "heads_major":  # [B, heads, N, d] storage, as after a transpose
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "padded_d":  # head vectors are a slice of wider rows (unaligned start, row stride not 16 B)
        wide = torch.zeros(*t.shape[:3], t.shape[3] + 3)
        wide[..., 1:-2] = t
        return wide[..., 1:-2]
    if layout == "broadcast_heads":  # every head shares head 0 (stride 0 along heads)
        return t[:, :, :1].expand(t.shape)
    return t


@st.composite
def msw_args(draw):
    B, H, W, heads = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([8, 16, 24, 40]))
    gen = torch.Generator().manual_seed(draw(seeds))
    q, k, v = (msw_layout(randn(gen, B, H * W, heads, head_dim), draw(st.sampled_from(
        ["contiguous", "heads_major", "padded_d", "broadcast_heads"]))) for _ in range(3))
    size = draw(st.sampled_from([tuple, list, torch.Size]))((H, W))
    shift = (draw(st.integers(0, H - 1)), draw(st.integers(0, W - 1)))
    if draw(st.booleans()):  # a shift tensor: any ints, used modulo the size
        wraps = draw(st.integers(-2, 2)), draw(st.integers(-2, 2))
        shift = torch.tensor([shift[0] + wraps[0] * H, shift[1] + wraps[1] * W],
                             dtype=draw(st.sampled_from([torch.int32, torch.int64])))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0), st.integers(1, 2)))
    return dict(q=q, k=k, v=v, size=size, shift=shift, scale=scale)


@requires_interpreter
@valid_settings
@given(args=msw_args())
@torch.no_grad()
def test_msw_attention_matches_reference(args):
    out = hidiff_kernels.msw_attention(**args)
    shift = args["shift"]
    if isinstance(shift, torch.Tensor):
        shift = tuple(s % n for s, n in zip(shift.tolist(), args["size"]))
    expected = reference.msw_attention(**{**args, "shift": shift})
    assert out.shape == args["q"].shape and out.dtype == args["q"].dtype
    assert relative_error(out, expected) < 1e-5


def _msw_mutations():
    """(name, change(args, draw) -> new args, error type, message regex) for one broken msw_attention argument."""
    def with_(**kw):
        return lambda a, draw: {**a, **kw}

    def each(fn):  # apply fn to q, k and v
        return lambda a, draw: {**a, **{n: fn(a[n]) for n in "qkv"}}

    def size_of(a):
        return a["size"]

    return [
        ("rank3", each(lambda t: t.flatten(2)), ValueError, r"q must be \[B, N, heads, head_dim\]"),
        ("rank5", each(lambda t: t[None]), ValueError, r"q must be \[B, N, heads, head_dim\]"),
        ("k_rank", lambda a, d: {**a, "k": a["k"].flatten(2)}, ValueError, "same shape"),
        ("v_heads", lambda a, d: {**a, "v": torch.cat([a["v"], a["v"]], 2)}, ValueError, "same shape"),
        ("k_tokens", lambda a, d: {**a, "k": a["k"][:, :-1]}, ValueError, "same shape"),
        ("size_not_N", lambda a, d: {**a, "size": (size_of(a)[0] + d(st.integers(1, 3)), size_of(a)[1])},
         ValueError, "does not match N"),
        ("size_negative", lambda a, d: {**a, "size": (-size_of(a)[0], -size_of(a)[1])}, ValueError, "does not match N"),
        ("size_zero", lambda a, d: {**a, "size": (0, size_of(a)[1])}, ValueError, "does not match N"),
        ("shift_high", lambda a, d: {**a, "shift": (size_of(a)[0] + d(st.integers(0, 3)), 0)}, ValueError,
         "shift .* out of range"),
        ("shift_wide", lambda a, d: {**a, "shift": (0, size_of(a)[1])}, ValueError, "shift .* out of range"),
        ("shift_negative", lambda a, d: {**a, "shift": (0, -d(st.integers(1, 3)))}, ValueError, "shift .* out of range"),
        ("int_dtype", each(lambda t: t.to(torch.int32)), TypeError, "dtype"),
        ("float64", each(lambda t: t.double()), TypeError, "dtype"),
        ("bool_dtype", lambda a, d: {**a, "q": a["q"] > 0}, TypeError, "dtype"),
        ("mixed_dtype", lambda a, d: {**a, d(st.sampled_from("kv")): a["v"].to(d(st.sampled_from(
            [torch.float16, torch.bfloat16])))}, TypeError, "dtype"),
        ("empty_batch", each(lambda t: t[:0]), ValueError, "empty"),
        ("empty_heads", each(lambda t: t[:, :, :0]), ValueError, "empty"),
        ("empty_head_dim", each(lambda t: t[..., :0]), ValueError, "empty"),
        ("head_dim_too_big", each(lambda t: t[..., :1].expand(*t.shape[:3], 264)), ValueError, "head_dim"),
        ("q_not_tensor", lambda a, d: {**a, "q": a["q"].tolist()}, TypeError, "q must be a torch.Tensor"),
        ("v_numpy", lambda a, d: {**a, "v": a["v"].numpy()}, TypeError, "v must be a torch.Tensor"),
        ("size_int", lambda a, d: {**a, "size": size_of(a)[0] * size_of(a)[1]}, TypeError, "size must be a pair"),
        ("size_triple", lambda a, d: {**a, "size": (*size_of(a), 1)}, TypeError, "size must be a pair"),
        ("size_float", lambda a, d: {**a, "size": (float(size_of(a)[0]), size_of(a)[1])}, TypeError, "size must be"),
        ("size_str", with_(size="9x9"), TypeError, "size must be a pair"),
        ("size_none", with_(size=None), TypeError, "size must be a pair"),
        ("size_tensor", lambda a, d: {**a, "size": torch.tensor(size_of(a))}, TypeError, "size must be a pair"),
        ("shift_float", with_(shift=(0.0, 0)), TypeError, "shift must be a pair"),
        ("shift_bool", with_(shift=(False, 0)), TypeError, "shift must be a pair"),
        ("shift_none", with_(shift=None), TypeError, "shift must be a pair"),
        ("shift_int", with_(shift=0), TypeError, "shift must be a pair"),
        ("shift_tensor_float", with_(shift=torch.tensor([0.0, 1.0])), TypeError, "shift tensor must be int32/int64"),
        ("shift_tensor_bool", with_(shift=torch.tensor([False, True])), TypeError, "shift tensor must be int32/int64"),
        ("shift_tensor_three", with_(shift=torch.tensor([0, 0, 0])), TypeError, r"shift tensor .* shape \[2\]"),
        ("shift_tensor_2d", with_(shift=torch.zeros(1, 2, dtype=torch.int64)), TypeError, r"shift tensor .* shape \[2\]"),
        ("shift_tensor_device", with_(shift=torch.zeros(2, dtype=torch.int64, device="meta")), ValueError,
         "shift is on meta"),
        ("scale_str", with_(scale="0.5"), TypeError, "scale must be"),
        ("scale_tensor", with_(scale=torch.tensor(0.5)), TypeError, "scale must be"),
        ("scale_nan", lambda a, d: {**a, "scale": d(st.sampled_from([math.nan, math.inf, -math.inf]))}, TypeError,
         "scale must be a finite"),
        ("scale_bool", with_(scale=True), TypeError, "scale must be"),
    ]


MSW_MUTATIONS = _msw_mutations()


@pytest.mark.parametrize("mutation", MSW_MUTATIONS, ids=[m[0] for m in MSW_MUTATIONS])
@invalid_settings
@given(args=msw_args(), data=st.data())
@torch.no_grad()
def test_msw_attention_rejects_invalid_arguments(mutation, args, data):
    name, change, error, message = mutation
    bad = change(args, data.draw)
    for op in (hidiff_kernels.msw_attention, reference.msw_attention):
        with pytest.raises(error, match=message) as raised:
            op(**bad)
        assert type(raised.value) is error, (name, raised.value)
        assert "msw_attention" in str(raised.value), name  # the message names the op


# ---------------------------------------------------------------------------------- RAU-Net 3x3 convolutions


def conv_layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "cropped":  # a view into a larger map: row stride != width, nonzero storage offset
        big = torch.zeros(*x.shape[:2], x.shape[2] + 1, x.shape[3] + 2)
        big[:, :, 1:, 1:-1] = x
        return big[:, :, 1:, 1:-1]
    return x


@st.composite
def conv_args(draw, max_hw=9):
    B, Ci, Co = draw(st.integers(1, 2)), draw(st.integers(1, 12)), draw(st.integers(1, 12))
    H, W = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    gen = torch.Generator().manual_seed(draw(seeds))
    x = conv_layout(randn(gen, B, Ci, H, W), draw(st.sampled_from(["contiguous", "channels_last", "cropped"])))
    weight = randn(gen, Co, Ci, 3, 3) / math.sqrt(9 * Ci)
    if draw(st.booleans()):
        weight = weight.contiguous(memory_format=torch.channels_last)
    bias = randn(gen, Co) if draw(st.booleans()) else None
    return dict(x=x, weight=weight, bias=bias)


@st.composite
def upsample_args(draw):
    args = draw(conv_args(max_hw=6))
    H, W = args["x"].shape[2:]
    kind = draw(st.sampled_from(["size_int", "size_pair", "factor", "factor_pair"]))
    if kind == "size_int":
        args["size"] = draw(st.integers(1, 12))
    elif kind == "size_pair":
        args["size"] = draw(st.sampled_from([tuple, list, torch.Size]))((draw(st.integers(1, 12)), draw(st.integers(1, 12))))
    else:
        def factor(lo, hi):  # floor(n * f) in [1, 12] for the sides lo <= n <= hi it scales
            return draw(st.one_of(st.sampled_from([1, 2, 2.0, 1.5, 0.5]), st.floats(1 / lo, 12 / hi)).filter(
                lambda f: math.floor(lo * f) >= 1 and math.floor(hi * f) <= 12))
        args["scale_factor"] = factor(min(H, W), max(H, W)) if kind == "factor" else (factor(H, H), factor(W, W))
    return args


@requires_interpreter
@valid_settings
@given(args=conv_args())
@torch.no_grad()
def test_rau_downsample_conv_matches_reference(args):
    out = hidiff_kernels.rau_downsample_conv(**args)
    expected = reference.rau_downsample_conv(**args)
    B, _, H, W = args["x"].shape
    assert out.shape == (B, args["weight"].shape[0], math.ceil(H / 4), math.ceil(W / 4)) == expected.shape
    assert out.dtype == torch.float32
    assert relative_error(out, expected) < 1e-5


@requires_interpreter
@valid_settings
@given(args=upsample_args())
@torch.no_grad()
def test_upsample_conv_matches_reference(args):
    out = hidiff_kernels.upsample_conv(**args)
    expected = reference.upsample_conv(**args)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert relative_error(out, expected) < 1e-5


def _conv_mutations():
    """(name, ops it applies to, change(args, draw) -> new args, error type, message regex)."""
    both, up = ("down", "up"), ("up",)

    def with_(**kw):
        return lambda a, draw: {**a, **kw}

    def replace(name, fn):
        return lambda a, draw: {**a, name: fn(a[name], draw)}

    def other_channels(w, d):
        return w.new_ones(w.shape[0], w.shape[1] + d(st.integers(1, 3)), 3, 3)

    def size_and_factor(a, d):
        return {**a, "size": (4, 4), "scale_factor": 2.0}

    def neither(a, d):
        return {k: v for k, v in a.items() if k not in ("size", "scale_factor")}

    return [
        ("x_rank3", both, replace("x", lambda x, d: x[0]), ValueError, r"x must be \[B, C, H, W\]"),
        ("x_rank5", both, replace("x", lambda x, d: x[None]), ValueError, r"x must be \[B, C, H, W\]"),
        ("w_rank2", both, replace("weight", lambda w, d: w.flatten(1)), ValueError, r"weight must be \[Co, Ci, 3, 3\]"),
        ("w_kernel", both, replace("weight", lambda w, d: w.new_ones(*w.shape[:2], *d(st.sampled_from(
            [(1, 1), (5, 5), (3, 1), (1, 3), (2, 2)])))), ValueError, r"weight must be \[Co, Ci, 3, 3\]"),
        ("channels", both, replace("weight", other_channels), ValueError, "input channels but x has"),
        ("bias_shape", both, lambda a, d: {**a, "bias": torch.ones(a["weight"].shape[0] + d(st.integers(1, 2)))},
         ValueError, "bias must be"),
        ("bias_2d", both, lambda a, d: {**a, "bias": torch.ones(1, a["weight"].shape[0])}, ValueError, "bias must be"),
        ("x_int", both, replace("x", lambda x, d: x.to(d(st.sampled_from([torch.int64, torch.uint8, torch.bool])))),
         TypeError, "dtype"),
        ("w_float64", both, replace("weight", lambda w, d: w.double()), TypeError, "dtype"),
        ("mixed_x", both, replace("x", lambda x, d: x.half()), TypeError, "dtype"),
        ("mixed_bias", both, lambda a, d: {**a, "bias": torch.ones(a["weight"].shape[0], dtype=torch.bfloat16)},
         TypeError, "dtype"),
        ("x_empty", both, replace("x", lambda x, d: x[:0] if d(st.booleans()) else x[..., :0]), ValueError, "empty"),
        ("w_empty", both, replace("weight", lambda w, d: w[:0]), ValueError, "empty"),
        ("x_not_tensor", both, replace("x", lambda x, d: x.tolist()), TypeError, "x must be a torch.Tensor"),
        ("bias_not_tensor", both, with_(bias=0.5), TypeError, "bias must be a torch.Tensor"),
        ("both", up, size_and_factor, ValueError, "exactly one of size and scale_factor"),
        ("neither", up, neither, ValueError, "exactly one of size and scale_factor"),
        ("size_nonpositive", up, lambda a, d: {**neither(a, d), "size": d(st.sampled_from(
            [0, -3, (0, 4), (4, -1), [-2, -2]]))}, ValueError, "size must be positive"),
        ("size_type", up, lambda a, d: {**neither(a, d), "size": d(st.sampled_from(
            [2.5, (4.0, 4), "8", (4,), (4, 4, 4), torch.tensor(4), True]))}, TypeError, "size must be a pair"),
        ("factor_nonpositive", up, lambda a, d: {**neither(a, d), "scale_factor": d(st.sampled_from(
            [0, 0.0, -2.0, (2.0, -1.0), math.inf, math.nan]))}, ValueError, "scale_factor must be positive"),
        ("factor_type", up, lambda a, d: {**neither(a, d), "scale_factor": d(st.sampled_from(
            ["2", torch.tensor(2.0), (2.0,), (2.0, 2.0, 2.0), True, [2, "2"]]))},
         TypeError, "scale_factor must be a float"),
        ("factor_empty_output", up, lambda a, d: {**neither(a, d), "scale_factor": 1 / (2 * max(a["x"].shape[2:]) + 1)},
         ValueError, "gives an empty output"),
    ]


CONV_MUTATIONS = _conv_mutations()
CONV_OPS = {"down": (hidiff_kernels.rau_downsample_conv, reference.rau_downsample_conv),
            "up": (hidiff_kernels.upsample_conv, reference.upsample_conv)}
CONV_CASES = [(op, mutation) for mutation in CONV_MUTATIONS for op in mutation[1]]


@pytest.mark.parametrize("op_name, mutation", CONV_CASES, ids=[f"{op}-{m[0]}" for op, m in CONV_CASES])
@invalid_settings
@given(args=conv_args(max_hw=6), data=st.data())
@torch.no_grad()
def test_convs_reject_invalid_arguments(op_name, mutation, args, data):
    name, _, change, error, message = mutation
    if op_name == "up":
        args = {**args, "scale_factor": 2.0}
    bad = change(args, data.draw)
    for op in CONV_OPS[op_name]:
        with pytest.raises(error, match=message) as raised:
            op(**bad)
        assert type(raised.value) is error, (name, raised.value)
        assert re.search("(downsample|upsample)_conv", str(raised.value)), name  # the message names the op
