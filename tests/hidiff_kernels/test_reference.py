"""The reference ops against direct float64 computations of the same functions."""
import math

import pytest
import torch

from hidiff_kernels import reference

from conftest import relative_error


def window_ids(H, W, sh, sw):
    """Window index (0..3) of every token of an H x W map, in original row-major order."""
    rows = (torch.arange(H) - sh) % H >= math.ceil(H / 2)
    cols = (torch.arange(W) - sw) % W >= math.ceil(W / 2)
    return (rows[:, None].long() * 2 + cols[None, :].long()).flatten()


def masked_softmax_attention(q, k, v, size, shift, scale):
    """Global attention in float64 with a same-window mask: an independent statement of MSW-MSA."""
    ids = window_ids(*size, *shift)
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, heads, N, d]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(ids[:, None] != ids[None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


CASES = [  # (B, H, W, heads, head_dim)
    (1, 4, 4, 1, 8),
    (2, 7, 5, 2, 40),
    (1, 1, 9, 3, 16),
    (1, 6, 1, 2, 64),
    (2, 9, 12, 1, 80),
    (1, 1, 1, 1, 8),
]


@pytest.mark.parametrize("B,H,W,heads,head_dim", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_msw_reference_matches_masked_softmax(B, H, W, heads, head_dim, dtype, tol):
    q, k, v = (torch.randn(B, H * W, heads, head_dim, dtype=dtype) for _ in range(3))
    scale = head_dim**-0.5
    for phase in range(4):  # every shift phase of MSW-MSA, plus arbitrary shifts below
        wh, ww = math.ceil(H / 2), math.ceil(W / 2)
        shift = (wh // 4 * phase, ww // 4 * phase)
        out = reference.msw_attention(q, k, v, (H, W), shift)
        assert out.dtype == dtype and out.shape == q.shape
        assert relative_error(out, masked_softmax_attention(q, k, v, (H, W), shift, scale)) < tol
    shift = (H - 1, W // 2)
    out = reference.msw_attention(q, k, v, (H, W), shift, scale=0.3)
    assert relative_error(out, masked_softmax_attention(q, k, v, (H, W), shift, 0.3)) < tol


def test_msw_reference_accepts_strided_views():
    B, H, W, heads, d = 2, 6, 5, 2, 16
    qkv = torch.randn(B, H * W, 3 * heads * d)
    q, k, v = (t.view(B, H * W, heads, d) for t in qkv.chunk(3, dim=-1))
    assert not q.is_contiguous()
    expected = masked_softmax_attention(q, k, v, (H, W), (2, 3), d**-0.5)
    assert relative_error(reference.msw_attention(q, k, v, (H, W), (2, 3)), expected) < 1e-5


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(q=torch.randn(2, 12, 16)), ValueError, r"q must be \[B, N, heads, head_dim\]"),
        (dict(size=(3, 5)), ValueError, "N=12"),
        (dict(shift=(3, 0)), ValueError, "shift"),
        (dict(shift=(0, -1)), ValueError, "shift"),
        (dict(k=torch.randn(1, 12, 4, 4)), ValueError, "same shape"),
        (dict(v=torch.randn(1, 12, 2, 8, dtype=torch.float16)), TypeError, "dtype"),
        (dict(q=torch.ones(1, 12, 2, 8, dtype=torch.int32)), TypeError, "dtype"),
        (dict(size=12), TypeError, "size"),
        (dict(scale="big"), TypeError, "scale"),
    ],
)
def test_msw_reference_rejects_bad_input(change, error, match):
    args = dict(q=torch.randn(1, 12, 2, 8), k=torch.randn(1, 12, 2, 8), v=torch.randn(1, 12, 2, 8),
                size=(3, 4), shift=(1, 1), scale=None)
    args.update(change)
    with pytest.raises(error, match=match):
        reference.msw_attention(**args)
