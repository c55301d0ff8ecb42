"""Plain PyTorch reference implementations of every hidiff op.

They are the oracle for the parity tests and the fallback where Triton cannot run. Each follows the
original HiDiffusion code path step by step (roll, partition, attention, merge, roll back; conv
calls with the RAU-Net arguments), except that odd feature maps use uneven windows instead of the
original's bicubic resize.
"""
import math

import torch
import torch.nn.functional as F
from einops import rearrange

from ._common import autocast_inputs, check_conv_args, check_msw_args, shift_ints


def msw_attention(q, k, v, size, shift, scale=None):
    """Attention of each token with the tokens of its window in the 2x2 grid of the shifted map.

    q, k, v: [B, N, heads, head_dim] with N == H * W tokens in row-major order. The map is rolled by
    (-sh, -sw), split at ceil(H/2) and ceil(W/2) into 4 windows, each attends within itself, and the
    result is rolled back. Returns [B, N, heads, head_dim] in q's dtype. A shift tensor is read to the host.
    """
    q, k, v = autocast_inputs(q, k, v)
    (H, W), shift, scale = check_msw_args("reference.msw_attention", q, k, v, size, shift, scale)
    sh, sw = shift_ints(shift, (H, W))
    rolled = [torch.roll(rearrange(t, "b (y x) h d -> b y x h d", y=H), (-sh, -sw), dims=(1, 2)) for t in (q, k, v)]
    out = torch.empty_like(rolled[0])
    wh, ww = math.ceil(H / 2), math.ceil(W / 2)
    for rows in (slice(0, wh), slice(wh, H)):
        for cols in (slice(0, ww), slice(ww, W)):
            window = [rearrange(t[:, rows, cols], "b y x h d -> b h (y x) d") for t in rolled]
            if window[0].shape[2] == 0:  # H or W == 1: the second row/column range is empty
                continue
            attended = F.scaled_dot_product_attention(*window, scale=scale)
            out[:, rows, cols] = rearrange(attended, "b h (y x) d -> b y x h d", y=rows.indices(H)[1] - rows.indices(H)[0])
    return rearrange(torch.roll(out, (sh, sw), dims=(1, 2)), "b y x h d -> b (y x) h d")


def rau_downsample_conv(x, weight, bias=None):
    """RAD-conv: the downsampler's 3x3 conv run with stride 4, padding 2, dilation 2 (ceil(H/4) x ceil(W/4))."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_conv_args("reference.rau_downsample_conv", x, weight, bias)
    return F.conv2d(x, weight, bias, stride=4, padding=2, dilation=2)


def upsample_conv(x, weight, bias=None, size=None, scale_factor=None):
    """RAU-upsample: nearest-neighbour upsample to `size` (or by `scale_factor`), then the 3x3 conv, padding 1."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_conv_args("reference.upsample_conv", x, weight, bias, upsample=True, size=size, scale_factor=scale_factor)
    return F.conv2d(F.interpolate(x, size=size, scale_factor=scale_factor, mode="nearest"), weight, bias, padding=1)
