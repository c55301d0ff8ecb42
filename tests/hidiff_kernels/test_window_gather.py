"""The gather-based MSW-MSA (hidiff_kernels.ops.window_gather, the torch backend's path) against the reference."""
import math

import pytest
import torch

from hidiff_kernels import reference
from hidiff_kernels.ops.window_gather import msw_attention_gathered, window_token_order

from conftest import relative_error
from test_reference import CASES, masked_softmax_attention, window_ids


@pytest.mark.parametrize("H,W,shift", [(4, 4, (1, 1)), (7, 5, (2, 4)), (1, 9, (0, 5)), (6, 1, (3, 0)), (9, 12, (8, 0))])
def test_order_lists_each_token_once_window_by_window(H, W, shift):
    order, counts = window_token_order((H, W), shift)
    assert sorted(order.tolist()) == list(range(H * W))
    assert sum(counts) == H * W
    ids = window_ids(H, W, *shift)[order]  # window of each listed token
    assert ids.tolist() == sorted(ids.tolist())  # windows are contiguous runs, in window order
    assert [int((ids == i).sum()) for i in range(4)] == list(counts)


@pytest.mark.parametrize("B,H,W,heads,head_dim", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_gathered_matches_reference(B, H, W, heads, head_dim, dtype, tol):
    q, k, v = (torch.randn(B, H * W, heads, head_dim, dtype=dtype) for _ in range(3))
    shifts = [(math.ceil(H / 2) // 4 * p, math.ceil(W / 2) // 4 * p) for p in range(4)] + [(H - 1, W // 2)]
    for shift in shifts:
        out = msw_attention_gathered(q, k, v, (H, W), shift)
        assert out.dtype == dtype and out.shape == q.shape
        expected = masked_softmax_attention(q, k, v, (H, W), shift, head_dim**-0.5)
        assert relative_error(out, expected) < tol, shift
        assert relative_error(out, reference.msw_attention(q, k, v, (H, W), shift)) < tol, shift


def test_gathered_rejects_bad_input():
    q = torch.randn(1, 12, 2, 8)
    with pytest.raises(ValueError, match="shift"):
        msw_attention_gathered(q, q, q, (3, 4), (3, 0))
    with pytest.raises(ValueError, match="does not match"):
        msw_attention_gathered(q, q, q, (3, 5), (0, 0))
