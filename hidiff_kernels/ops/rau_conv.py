"""RAU-Net 3x3 convolutions as one implicit-GEMM Triton kernel.

RAD-conv (stride 4, padding 2, dilation 2) and the upsampler's nearest-upsample + 3x3 conv (padding 1)
are the same GEMM: M = output pixels (B * Ho * Wo), N = Co, K = 9 taps x Ci. They differ only in
which input pixel a tap reads, chosen by the UPSAMPLE constexpr. Input pixels are gathered straight
from x through its strides (NCHW or channels-last), so neither an im2col buffer nor the enlarged
map is ever written.
"""
import functools
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format

from .. import reference
from .._common import (
    TRITON_DTYPES, KernelBuild, autocast_inputs, autotune_enabled, check_conv_args, check_int32_span, check_no_grad,
    interpreter_enabled, launch_device, triton_runs_on, without_autocast,
)


# Pixel counts and map sizes only enter index arithmetic (no loads are aligned by them): no variant per size.
@triton.jit(do_not_specialize=["M", "H", "W", "Ho", "Wo"])
def _conv3x3_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, Ci, Co, H, W, Ho, Wo,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    ratio_h, ratio_w,
    UPSAMPLE: tl.constexpr, X_CHANNELS_LAST: tl.constexpr, Y_CHANNELS_LAST: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # N varies fastest over programs: neighbouring programs share the gathered A rows in L2.
    pid = tl.program_id(0)
    num_n = tl.cdiv(Co, BLOCK_N)
    offs_m = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < Co
    # Tail rows gather the last pixel again (their results are never stored): no M mask on the loads.
    pix = tl.minimum(offs_m, M - 1)
    ox = pix % Wo
    oy = (pix // Wo) % Ho
    x_pix = x_ptr + (pix // (Wo * Ho)).to(tl.int64) * sxb
    w_cols = w_ptr + offs_n[None, :]
    if UPSAMPLE:
        y0 = oy - 1  # enlarged-map row/column of tap (0, 0), padding 1
        x0 = ox - 1
    else:
        y0 = oy * 4 - 2  # input row/column of tap (0, 0): stride 4, padding 2
        x0 = ox * 4 - 2

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_chunks = tl.cdiv(Ci, BLOCK_K)
    # One flat loop over (tap, channel chunk) so the software pipeline never restarts per tap.
    for kk in range(9 * k_chunks):
        tap = kk // k_chunks
        ci = (kk % k_chunks) * BLOCK_K + offs_k
        ci_ok = ci < Ci
        if UPSAMPLE:
            # Enlarged pixel r is input pixel min(floor(r * ratio), size - 1) in float32, like
            # F.interpolate; the enlarged map (Ho x Wo) is zero-padded by the conv.
            ey = y0 + tap // 3
            ex = x0 + tap % 3
            inside = (ey >= 0) & (ey < Ho) & (ex >= 0) & (ex < Wo)
            iy = tl.minimum((ey.to(tl.float32) * ratio_h).to(tl.int32), H - 1)
            ix = tl.minimum((ex.to(tl.float32) * ratio_w).to(tl.int32), W - 1)
        else:
            iy = y0 + (tap // 3) * 2  # dilation 2
            ix = x0 + (tap % 3) * 2
            inside = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        pix_ptrs = x_pix + iy * sxh + ix * sxw
        if X_CHANNELS_LAST:  # each pixel's channels are contiguous: vector loads along K
            a = tl.load(pix_ptrs[:, None] + ci[None, :] * sxc, mask=inside[:, None] & ci_ok[None, :], other=0.0)
        else:
            # NCHW: load [K, M] so threads run along the pixels of one channel plane (nearby inputs)
            # and each thread keeps only a few rows' gather state in registers.
            a = tl.load(pix_ptrs[None, :] + ci[:, None] * sxc, mask=ci_ok[:, None] & inside[None, :], other=0.0)
            a = tl.trans(a)
        # The weight is a row-major [9 * Ci, Co] matrix: row tap * Ci + ci.
        b = tl.load(w_cols + (tap * Ci + ci)[:, None] * Co, mask=ci_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter gets bf16 arithmetic wrong
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        # "ieee" keeps fp32 products exact; fp16/bf16 operands go to the tensor cores either way.
        acc = tl.dot(a, b, acc, input_precision="ieee")

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = acc.to(y_ptr.dtype.element_ty)
    y_pix = y_ptr + (pix // (Wo * Ho)).to(tl.int64) * syb + oy * syh + ox * syw
    m_ok = offs_m < M
    if Y_CHANNELS_LAST:
        tl.store(y_pix[:, None] + offs_n[None, :] * syc, out, mask=m_ok[:, None] & n_ok[None, :])
    else:  # NCHW: store [N, M] so threads write along output rows
        tl.store(y_pix[None, :] + offs_n[:, None] * syc, tl.trans(out), mask=n_ok[:, None] & m_ok[None, :])


def _config(block_m, block_n, block_k, num_warps):
    return triton.Config(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k), num_warps=num_warps, num_stages=3)


# Autotune candidates by (element size, channels-last input), each compiled spill-free for sm_90a and
# sm_80 with triton 3.6 and 3.9. fp16/bf16: wgmma takes 64-row tiles per warpgroup of 4 warps, so
# BLOCK_M is a multiple of 64. NCHW: a thread keeps the gather state of several rows, so smaller tiles
# or more warps. fp32: "ieee" FMA dots hold their operand slices in registers, so thin K chunks.
CONFIGS = {
    (2, True): [_config(bm, bn, bk, 8 if bm * bn == 128 * 128 else 4) for bm in (64, 128) for bn in (64, 128) for bk in (32, 64)],
    (2, False): [_config(64, 64, 32, 4), _config(64, 128, 32, 8), _config(64, 128, 64, 8), _config(128, 64, 32, 8)],
    (4, True): [_config(64, 64, 16, 4), _config(64, 128, 32, 4), _config(128, 128, 16, 8)],
    (4, False): [_config(64, 64, 16, 4), _config(64, 128, 16, 8), _config(128, 64, 16, 8)],
}
# The interpreter pays per operation, not per element: one fixed tile, few programs per test shape.
INTERPRETER_CONFIG = _config(64, 64, 32, 4)

@functools.cache
def _conv3x3_autotuned():
    """Built on first use: triton 3.3's Autotuner asks the GPU driver for a benchmarker when it is created,
    which fails at import on a machine without a GPU."""
    return triton.autotune(
        configs=[c for configs in CONFIGS.values() for c in configs],
        key=["M", "Ci", "Co", "UPSAMPLE", "X_CHANNELS_LAST", "Y_CHANNELS_LAST"],
        prune_configs_by={
            "early_config_prune":
                lambda configs, nargs, **kw: CONFIGS[nargs["x_ptr"].element_size(), kw["X_CHANNELS_LAST"]]
        },
    )(_conv3x3_kernel)


def _alloc_output(shape, like, memory_format):
    """The output buffer (a separate function so tests can poison it)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


def _output_format(x, weight):
    """F.conv2d's rule: channels-last output when the input's or the weight's strides suggest channels-last.

    suggest_memory_format reads the strides, which also settles the ambiguous cases (C == 1, H == W == 1).
    """
    cl = torch.channels_last
    return cl if cl in (suggest_memory_format(x), suggest_memory_format(weight)) else torch.contiguous_format


def _nearest_ratio(in_size, out_size, factor, device):
    """The float32 source/destination ratio of PyTorch's nearest upsample on this device.

    ATen's kernels copy an axis whose size stays the same, and the CPU kernel halves indices when out == 2 * in,
    whatever the scale factor said; otherwise they use the ratio, which is 1 / scale_factor when one was given.
    """
    if factor is None or out_size == in_size or (device.type == "cpu" and out_size == 2 * in_size):
        return float(np.float32(in_size) / np.float32(out_size))
    return float(np.float32(1.0 / factor))


def _launch(x, weight, bias, out_size, ratios, upsample, config=None):
    """Run the kernel: ``config`` (a triton.Config) if given, else the interpreter's config, the class's
    default under HIDIFF_AUTOTUNE=0, or the autotuner's pick."""
    B, Ci, H, W = x.shape
    Co = weight.shape[0]
    Ho, Wo = out_size
    y = _alloc_output((B, Co, Ho, Wo), x, _output_format(x, weight))
    check_int32_span("upsample_conv" if upsample else "rau_downsample_conv", x=x, out=y)
    # GEMM B operand: [3, 3, Ci, Co] contiguous, Co fastest; a small copy next to the conv itself.
    w = weight.permute(2, 3, 1, 0).contiguous()
    M = B * Ho * Wo
    # Without a bias the kernel never reads b_ptr; x stands in so the signature stays the same.
    args = (x, w, x if bias is None else bias.contiguous(), y, M, Ci, Co, H, W, Ho, Wo, *x.stride(), *y.stride(), *ratios)
    flags = dict(
        UPSAMPLE=upsample, X_CHANNELS_LAST=x.stride(1) == 1, Y_CHANNELS_LAST=y.stride(1) == 1,
        HAS_BIAS=bias is not None, UPCAST=interpreter_enabled() and x.dtype == torch.bfloat16,
    )
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(Co, meta["BLOCK_N"]),)
    if config is None and interpreter_enabled():
        config = INTERPRETER_CONFIG
    elif config is None and not autotune_enabled():
        config = CONFIGS[x.element_size(), flags["X_CHANNELS_LAST"]][0]
    with launch_device(x):
        if config is None:
            _conv3x3_autotuned()[grid](*args, **flags)
        else:
            _conv3x3_kernel[grid](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                                  num_stages=config.num_stages)
    return y


def _fake_output(x, weight, out_size):
    return torch.empty((x.shape[0], weight.shape[0], *out_size), dtype=x.dtype, device=x.device,
                       memory_format=_output_format(x, weight))


@torch.library.custom_op("hidiff::rau_downsample_conv", mutates_args=())
def _downsample_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    out_size, _ = check_conv_args("hidiff::rau_downsample_conv", x, weight, bias)
    if not triton_runs_on(x.device):
        with without_autocast(x.device):
            return reference.rau_downsample_conv(x, weight, bias)
    return _launch(x, weight, bias, out_size, (0.0, 0.0), upsample=False)


@_downsample_op.register_fake
def _(x, weight, bias):
    return _fake_output(x, weight, check_conv_args("hidiff::rau_downsample_conv", x, weight, bias)[0])


@torch.library.custom_op("hidiff::upsample_conv", mutates_args=())
def _upsample_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    size: Optional[list[int]], scale_factor: Optional[list[float]],
) -> torch.Tensor:
    op = "hidiff::upsample_conv"
    out_size, factors = check_conv_args(op, x, weight, bias, upsample=True, size=size, scale_factor=scale_factor)
    if not triton_runs_on(x.device):
        with without_autocast(x.device):
            return reference.upsample_conv(x, weight, bias, size=size, scale_factor=scale_factor)
    ratios = [_nearest_ratio(n, o, None if factors is None else f, x.device)
              for n, o, f in zip(x.shape[2:], out_size, factors or (None, None))]
    return _launch(x, weight, bias, out_size, ratios, upsample=True)


@_upsample_op.register_fake
def _(x, weight, bias, size, scale_factor):
    out_size, _ = check_conv_args("hidiff::upsample_conv", x, weight, bias, upsample=True, size=size, scale_factor=scale_factor)
    return _fake_output(x, weight, out_size)


def rau_downsample_conv(x, weight, bias=None):
    """RAD-conv: ``F.conv2d(x, weight, bias, stride=4, padding=2, dilation=2)`` for 3x3 weights.

    x: [B, Ci, H, W] (NCHW or channels-last), weight: [Co, Ci, 3, 3], bias: [Co] or None.
    Returns [B, Co, ceil(H/4), ceil(W/4)] in x's dtype, channels-last when x or weight is (as F.conv2d).
    Inference only. Under torch.autocast the inputs are cast as F.conv2d's are (so are upsample_conv's).
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_conv_args("rau_downsample_conv", x, weight, bias)
    check_no_grad("rau_downsample_conv", x, weight, bias)
    return _downsample_op(x, weight, bias)


def upsample_conv(x, weight, bias=None, size=None, scale_factor=None):
    """``F.conv2d(F.interpolate(x, size, scale_factor, mode="nearest"), weight, bias, padding=1)``, fused.

    The nearest-neighbour gather happens inside the conv, so the enlarged map is never stored. Give
    exactly one of size (int or pair) and scale_factor (float or pair). Inference only.
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    out_size, factors = check_conv_args("upsample_conv", x, weight, bias, upsample=True, size=size, scale_factor=scale_factor)
    check_no_grad("upsample_conv", x, weight, bias)
    return _upsample_op(x, weight, bias, None if factors else list(out_size), list(factors) if factors else None)


def _signature(dtype, x_channels_last, y_channels_last):
    """Argument types and the unit strides that become constants, as the JIT specializes an SD launch.

    SD/SDXL channel counts (320, 640, 1280) make Ci, Co and the non-unit strides multiples of 16.
    """
    ptr = "*" + TRITON_DTYPES[dtype]
    unit = ("sxc" if x_channels_last else "sxw", "syc" if y_channels_last else "syw")
    strides = [s for s in ("sxb", "sxc", "sxh", "sxw", "syb", "syc", "syh", "syw") if s not in unit]
    signature = {**dict.fromkeys(["x_ptr", "w_ptr", "b_ptr", "y_ptr"], ptr), "M": "i32", "Ci": "i32:16", "Co": "i32:16",
                 **dict.fromkeys(["H", "W", "Ho", "Wo"], "i32"), **dict.fromkeys(strides, "i32:16"),
                 "ratio_h": "fp32", "ratio_w": "fp32"}
    return signature, dict.fromkeys(unit, 1)


# (input, output) memory formats the launcher meets: F.conv2d's rule makes the output channels-last when the
# input or the weight is, so an NCHW input with a channels-last weight gives the mixed pair.
_FORMATS = {"nchw": (False, False), "channels_last": (True, True), "nchw->channels_last": (False, True)}


def build_configs():
    """Every GPU config the launcher can pick, per gather mode, dtype and memory formats (with bias: the superset)."""
    builds = []
    for upsample in (False, True):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for formats, (x_channels_last, y_channels_last) in _FORMATS.items():
                signature, unit_strides = _signature(dtype, x_channels_last, y_channels_last)
                for c in CONFIGS[dtype.itemsize, x_channels_last]:
                    tile = "x".join(str(c.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                    builds.append(KernelBuild(
                        name=f"{'upsample' if upsample else 'rau_downsample'}_conv {str(dtype)[6:]} "
                             f"{formats} {tile} w{c.num_warps} s{c.num_stages}",
                        fn=_conv3x3_kernel,
                        signature=signature,
                        constexprs=dict(UPSAMPLE=upsample, X_CHANNELS_LAST=x_channels_last,
                                        Y_CHANNELS_LAST=y_channels_last, HAS_BIAS=True, UPCAST=False,
                                        **unit_strides, **c.kwargs),
                        num_warps=c.num_warps,
                        num_stages=c.num_stages,
                        uses_tensor_cores=dtype != torch.float32,
                    ))
    return builds
