"""The RAU-Net conv kernels against the reference run in float32 (CPU through TRITON_INTERPRET=1, or CUDA).

Interpreter tile: BLOCK_M=64, BLOCK_N=64, BLOCK_K=32; the shapes below give several M tiles, several
N tiles (Co=70) and several channel chunks (Ci=40), all with tails.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hidiff_kernels
from hidiff_kernels import _common, reference
from hidiff_kernels.ops import rau_conv

from conftest import relative_error, requires_interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's fp32 -> bf16 conversion truncates (CUDA rounds to nearest): bf16 errors here run at ~0.3-0.45
# of the tolerance, at most 2**-7 per element; on CUDA about half that.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def exact_cudnn(monkeypatch):
    """Keep cuDNN's fp32 reference convs out of TF32, so they are a 1e-5 oracle on CUDA too."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture(autouse=True)
def poisoned_output(monkeypatch):
    """Every output buffer starts as NaN: an element the kernel does not write fails the test."""
    def alloc(shape, like, memory_format):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device).contiguous(memory_format=memory_format)

    monkeypatch.setattr(rau_conv, "_alloc_output", alloc)


def make_inputs(B, Ci, Co, H, W, dtype, channels_last, bias):
    x = torch.randn(B, Ci, H, W, device=DEVICE).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (torch.randn(Co, Ci, 3, 3, device=DEVICE) / math.sqrt(9 * Ci)).to(dtype)
    b = torch.randn(Co, device=DEVICE).to(dtype) if bias else None
    return x, w, b


def check_parity(out, expected_fn, x, w, b):
    """out vs expected_fn run in float32 on the same inputs: dtype, shape, memory format, every element written."""
    expected = expected_fn(x.float(), w.float(), None if b is None else b.float())
    assert out.dtype == x.dtype and out.shape == expected.shape
    for fmt in (torch.contiguous_format, torch.channels_last):  # F.conv2d's output memory format
        assert out.is_contiguous(memory_format=fmt) == expected.is_contiguous(memory_format=fmt)
    assert torch.isfinite(out).all(), "unwritten (NaN) output elements"
    assert relative_error(out, expected) < TOL[x.dtype]


DOWN_CASES = [  # B, Ci, Co, H, W, channels_last, bias
    (1, 5, 3, 1, 1, False, True),
    (2, 19, 17, 5, 7, True, False),
    (2, 40, 70, 9, 4, False, True),
    (1, 3, 40, 17, 13, True, True),
    (3, 8, 16, 30, 22, False, False),  # 3 * 8 * 6 = 144 output pixels: 3 M tiles
]


@requires_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Ci,Co,H,W,channels_last,bias", DOWN_CASES)
def test_downsample_matches_reference(B, Ci, Co, H, W, channels_last, bias, dtype):
    x, w, b = make_inputs(B, Ci, Co, H, W, dtype, channels_last, bias)
    out = hidiff_kernels.rau_downsample_conv(x, w, b)
    assert out.shape[2:] == (math.ceil(H / 4), math.ceil(W / 4))
    check_parity(out, reference.rau_downsample_conv, x, w, b)


UP_CASES = [  # B, Ci, Co, H, W, resize, channels_last, bias
    (1, 5, 3, 1, 1, dict(size=(2, 2)), False, True),
    (2, 5, 19, 4, 3, dict(size=(8, 6)), True, False),  # x2, the upsampler's usual ratio
    (2, 19, 17, 3, 4, dict(size=(12, 16)), True, True),  # x4, as when RAD-conv was active
    (1, 40, 70, 5, 3, dict(size=(7, 8)), False, False),  # 5 -> 7, 3 -> 8
    (2, 8, 40, 6, 5, dict(size=(13, 9)), True, True),  # 6 -> 13, 5 -> 9
    (1, 17, 24, 4, 6, dict(scale_factor=2), False, True),
    (1, 6, 9, 3, 2, dict(scale_factor=4.0), True, False),
    (2, 11, 13, 5, 7, dict(scale_factor=1.5), False, True),
]


@requires_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Ci,Co,H,W,resize,channels_last,bias", UP_CASES)
def test_upsample_matches_reference(B, Ci, Co, H, W, resize, channels_last, bias, dtype):
    x, w, b = make_inputs(B, Ci, Co, H, W, dtype, channels_last, bias)
    out = hidiff_kernels.upsample_conv(x, w, b, **resize)
    check_parity(out, lambda *t: reference.upsample_conv(*t, **resize), x, w, b)


# Every config the CUDA launcher can pick (fp32 configs on fp32 inputs, the others on fp16), for both gathers,
# on shapes sized to the config: 2 N tiles (Co = BLOCK_N + 8), 2 channel chunks (Ci = BLOCK_K + 6) and 2 M
# tiles (143 output pixels, more than the largest BLOCK_M of 128), all with tails.
CONFIG_CASES = [(itemsize, channels_last, config) for (itemsize, channels_last), configs in rau_conv.CONFIGS.items()
                for config in configs]


@pytest.mark.all_configs
@requires_interpreter
@pytest.mark.parametrize("op", ["down", "up"])
@pytest.mark.parametrize("itemsize,channels_last,config", CONFIG_CASES,
                         ids=[f"{'fp32' if c[0] == 4 else 'fp16'}-{'cl' if c[1] else 'nchw'}-{c[2]}" for c in CONFIG_CASES])
def test_every_cuda_config_matches_reference(op, itemsize, channels_last, config):
    dtype = torch.float32 if itemsize == 4 else torch.float16
    Ci, Co = config.kwargs["BLOCK_K"] + 6, config.kwargs["BLOCK_N"] + 8
    if op == "down":
        x, w, b = make_inputs(1, Ci, Co, 43, 51, dtype, channels_last, True)  # -> 11 x 13
        out = rau_conv._launch(x, w, b, (11, 13), (0.0, 0.0), upsample=False, config=config)
        check_parity(out, reference.rau_downsample_conv, x, w, b)
    else:
        x, w, b = make_inputs(1, Ci, Co, 5, 7, dtype, channels_last, True)  # -> 11 x 13 (non-integer ratios)
        ratios = [rau_conv._nearest_ratio(n, o, None, x.device) for n, o in zip((5, 7), (11, 13))]
        out = rau_conv._launch(x, w, b, (11, 13), ratios, upsample=True, config=config)
        check_parity(out, lambda *t: reference.upsample_conv(*t, size=(11, 13)), x, w, b)


@requires_interpreter
@pytest.mark.parametrize("op", ["down", "up"])
def test_random_shapes(op):
    for _ in range(3):
        B, Ci, Co, H, W, out_h, out_w = (int(torch.randint(1, hi, ())) for hi in (4, 48, 48, 12, 12, 14, 14))
        x, w, b = make_inputs(B, Ci, Co, H, W, torch.float32, bool(torch.rand(()) < 0.5), True)
        if op == "down":
            check_parity(hidiff_kernels.rau_downsample_conv(x, w, b), reference.rau_downsample_conv, x, w, b)
        else:
            size = (out_h, out_w)
            out = hidiff_kernels.upsample_conv(x, w, b, size=size)
            check_parity(out, lambda *t: reference.upsample_conv(*t, size=size), x, w, b)


@requires_interpreter
def test_strided_input_view():
    """Neither NCHW- nor channels-last-contiguous: the kernel reads through the strides as given."""
    x = torch.randn(2, 9, 11, 16, device=DEVICE)[:, 1:8, :, ::2]
    w, b = torch.randn(6, 7, 3, 3, device=DEVICE), torch.randn(6, device=DEVICE)
    expected = F.conv2d(x.double(), w.double(), b.double(), stride=4, padding=2, dilation=2)
    assert relative_error(hidiff_kernels.rau_downsample_conv(x, w, b), expected) < 1e-5
    expected = F.conv2d(F.interpolate(x.double(), size=(21, 17)), w.double(), b.double(), padding=1)
    assert relative_error(hidiff_kernels.upsample_conv(x, w, b, size=(21, 17)), expected) < 1e-5


GATHER_CASES = [  # in (H, W), size or scale_factor: odd ratios, and CPU's copy / x2 special cases
    ((3, 5), dict(size=(8, 7))),
    ((6, 7), dict(size=(13, 11))),
    ((5, 9), dict(size=(19, 23))),
    ((7, 4), dict(size=(9, 5))),
    ((4, 6), dict(size=(16, 24))),
    ((3, 3), dict(scale_factor=1.2)),  # 3 x 3 out: copied, whatever the factor
    ((2, 5), dict(scale_factor=(2.0, 1.1))),  # 4 x 5 out: the columns are copied
    ((3, 5), dict(scale_factor=2.2)),  # 6 x 11 out: CPU halves the rows
    ((5, 6), dict(scale_factor=(7 / 3, 1 / 0.3))),
    ((9, 4), dict(scale_factor=1.5)),
]


@requires_interpreter
@pytest.mark.parametrize("in_size,resize", GATHER_CASES)
def test_upsample_gather_is_exactly_nearest(in_size, resize):
    """With a centre-tap identity weight the output is the enlarged map itself: must equal F.interpolate bit for bit."""
    x = torch.randn(1, 2, *in_size, device=DEVICE)
    w = torch.zeros(2, 2, 3, 3, device=DEVICE)
    w[0, 0, 1, 1] = w[1, 1, 1, 1] = 1.0
    torch.testing.assert_close(hidiff_kernels.upsample_conv(x, w, **resize), F.interpolate(x, **resize), rtol=0, atol=0)


def test_nearest_ratio_matches_interpolate_for_many_sizes():
    """The host-side float32 ratio reproduces CPU F.interpolate's source index for every size pair."""
    for n in range(1, 40):
        x = torch.arange(n, dtype=torch.float32).view(1, 1, 1, n)
        pairs = [(o, None) for o in range(1, 130)] + [
            (math.floor(n * f), f) for f in (0.7, 1.2, 1.5, 2.0, 2.2, 2.5, 3.0, 7 / 3, 4.0, 1 / 0.3) if n * f >= 1
        ]
        for out, factor in pairs:
            resize = dict(size=(1, out)) if factor is None else dict(scale_factor=(1.0, factor))
            expected = F.interpolate(x, **resize).view(-1).long().numpy()
            ratio = np.float32(rau_conv._nearest_ratio(n, out, factor, torch.device("cpu")))
            index = np.minimum((np.arange(out, dtype=np.float32) * ratio).astype(np.int64), n - 1)
            assert np.array_equal(index, expected), (n, out, factor)


def test_nearest_ratio_on_cuda_follows_its_kernel():
    # ATen's CUDA kernel copies an axis whose size stays (as the CPU one does) but has no x2 special case
    cuda = torch.device("cuda")
    assert rau_conv._nearest_ratio(3, 3, 1.2, cuda) == 1.0
    assert rau_conv._nearest_ratio(3, 6, 2.2, cuda) == float(np.float32(1 / 2.2))
    assert rau_conv._nearest_ratio(3, 7, None, cuda) == float(np.float32(3) / np.float32(7))


@pytest.mark.parametrize("upsample", [False, True])
def test_launcher_refuses_images_past_int32(upsample):
    x = torch.empty_strided((1, 3, 1, 4), (2**33, 2**30, 4, 1), device="meta")  # channel 2 starts at 2**31
    w = torch.empty(2, 3, 3, 3, device="meta")
    with pytest.raises(ValueError, match="x .* spans 2\\*\\*31"):
        rau_conv._launch(x, w, None, (1, 4) if upsample else (1, 1), (1.0, 1.0), upsample)


@requires_interpreter
@pytest.mark.parametrize("op", ["down", "up"])
def test_weight_channels_last(op):
    """A channels-last weight makes F.conv2d's output channels-last; ours follows the same rule."""
    x, w, b = make_inputs(1, 6, 5, 7, 5, torch.float32, False, True)
    w = w.to(memory_format=torch.channels_last)
    if op == "down":
        out, expected = hidiff_kernels.rau_downsample_conv(x, w, b), reference.rau_downsample_conv(x, w, b)
    else:
        out, expected = hidiff_kernels.upsample_conv(x, w, b, size=(9, 9)), reference.upsample_conv(x, w, b, size=(9, 9))
    assert out.stride() == expected.stride()
    assert relative_error(out, expected) < 1e-5


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setattr(_common, "interpreter_enabled", lambda: False)
    x, w, b = make_inputs(2, 4, 6, 5, 6, torch.float32, False, True)
    x, w, b = x.cpu(), w.cpu(), b.cpu()
    torch.testing.assert_close(hidiff_kernels.rau_downsample_conv(x, w, b), reference.rau_downsample_conv(x, w, b), rtol=0, atol=0)
    torch.testing.assert_close(
        hidiff_kernels.upsample_conv(x, w, b, scale_factor=2), reference.upsample_conv(x, w, b, scale_factor=2), rtol=0, atol=0
    )


OPS = {"down": (hidiff_kernels.rau_downsample_conv, reference.rau_downsample_conv),
       "up": (hidiff_kernels.upsample_conv, reference.upsample_conv)}
BAD_INPUTS = [  # op, change to valid arguments, error, message
    ("down", dict(weight=torch.randn(4, 6, 5, 5)), ValueError, r"\[Co, Ci, 3, 3\]"),
    ("down", dict(weight=torch.randn(4, 3, 3, 3)), ValueError, "grouped"),
    ("down", dict(weight=torch.randn(4, 5, 3, 3)), ValueError, "input channels"),
    ("down", dict(x=torch.randn(6, 8, 8)), ValueError, r"\[B, C, H, W\]"),
    ("down", dict(x=torch.randn(0, 6, 8, 8)), ValueError, "empty"),
    ("down", dict(weight=torch.randn(4, 6, 3, 3, dtype=torch.float16)), TypeError, "dtype"),
    ("down", dict(x=torch.randint(0, 5, (1, 6, 8, 8))), TypeError, "dtype"),
    ("down", dict(weight=torch.randn(4, 6, 3, 3, device="meta")), ValueError, "meta"),
    ("down", dict(bias=torch.randn(5)), ValueError, "bias"),
    ("up", dict(x=torch.randn(1, 6, 8, 0), size=(4, 4)), ValueError, "empty"),
    ("up", dict(weight=torch.randn(4, 6, 1, 1), size=(4, 4)), ValueError, r"\[Co, Ci, 3, 3\]"),
    ("up", dict(bias=torch.randn(4).half(), size=(4, 4)), TypeError, "dtype"),
    ("up", dict(), ValueError, "exactly one"),
    ("up", dict(size=(16, 16), scale_factor=2), ValueError, "exactly one"),
    ("up", dict(size=(0, 16)), ValueError, "positive"),
    ("up", dict(size=-3), ValueError, "positive"),
    ("up", dict(size=(2.5, 16)), TypeError, "size must be a pair of ints"),
    ("up", dict(scale_factor=0.0), ValueError, "positive"),
    ("up", dict(scale_factor=float("inf")), ValueError, "finite"),
    ("up", dict(scale_factor="2"), TypeError, "scale_factor"),
    ("up", dict(scale_factor=0.1), ValueError, "empty output"),
]


@pytest.mark.parametrize("op,change,error,match", BAD_INPUTS, ids=[f"{c[0]}-{c[3]}" for c in BAD_INPUTS])
def test_rejects_bad_input(op, change, error, match):
    args = {**dict(x=torch.randn(1, 6, 8, 8), weight=torch.randn(4, 6, 3, 3), bias=torch.randn(4)), **change}
    for fn in OPS[op]:  # the reference validates the same way
        with pytest.raises(error, match=match):
            fn(**args)


@pytest.mark.parametrize("which", ["x", "w", "b"])
def test_requires_grad_raises(which):
    x, w, b = make_inputs(1, 4, 3, 6, 6, torch.float32, False, True)
    {"x": x, "w": w, "b": b}[which].requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        hidiff_kernels.rau_downsample_conv(x, w, b)
    with pytest.raises(RuntimeError, match="inference-only"):
        hidiff_kernels.upsample_conv(x, w, b, scale_factor=2)
    with torch.no_grad():  # fine without autograd
        assert hidiff_kernels.rau_downsample_conv(x, w, b).shape == (1, 3, 2, 2)


@requires_interpreter
def test_torch_compile_fullgraph():
    """Both ops trace as opaque custom ops: RAD-conv down, then the x4 upsampler back to the skip size."""
    x = torch.randn(2, 6, 9, 7, device=DEVICE).to(memory_format=torch.channels_last)
    wd, bd, wu, bu = (torch.randn(*s, device=DEVICE) for s in ((8, 6, 3, 3), (8,), (5, 8, 3, 3), (5,)))

    def unet_path(x):
        h = hidiff_kernels.rau_downsample_conv(x, wd, bd)
        return hidiff_kernels.upsample_conv(h, wu, bu, size=x.shape[-2:])

    torch._dynamo.reset()
    out = torch.compile(unet_path, fullgraph=True)(x)
    h = F.conv2d(x.double(), wd.double(), bd.double(), stride=4, padding=2, dilation=2)
    expected = F.conv2d(F.interpolate(h, size=(9, 7)), wu.double(), bu.double(), padding=1)
    assert out.stride() == expected.stride()
    assert relative_error(out, expected) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_realistic_channels(dtype):
    """Autotuned GPU path at SD-like channel counts (multiples of every tile) and odd skip sizes."""
    x, w, b = make_inputs(2, 320, 320, 33, 29, dtype, True, True)
    check_parity(hidiff_kernels.rau_downsample_conv(x, w, b), reference.rau_downsample_conv, x, w, b)
    check_parity(hidiff_kernels.upsample_conv(x, w, b, size=(131, 115)),
                 lambda *t: reference.upsample_conv(*t, size=(131, 115)), x, w, b)
