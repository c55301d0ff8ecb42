"""MSW-MSA in plain PyTorch without rolls: list the tokens window by window, attend per window, put them back.

The original rolls the map, partitions it into windows, and reverses both afterwards: four copies of the
feature map per block. Listing the tokens in window order is one gather, and because attention projections
act per token, a caller can gather the block's input once and scatter its output once (two copies), with
every window a contiguous run of tokens in between. Everything here traces under torch.compile with a
shift tensor or symbolic ints (no host reads, no branches on the shift).
"""
import math

import torch
import torch.nn.functional as F

from .._common import autocast_inputs, check_msw_args, check_no_grad


def window_token_order(size, shift, device=None):
    """Token indices of an H x W map listed window by window, and the four windows' token counts.

    Windows of the map rolled by (-sh, -sw), split at ceil(H/2), ceil(W/2): top left, top right, bottom left,
    bottom right, each in row-major order. ``x.index_select(1, order)`` puts [B, N, ...] tokens in that order.
    ``shift``: two ints, or an integer tensor [2] (used on its device, never read to the host).
    """
    (H, W), (sh, sw) = size, shift
    wh, ww = math.ceil(H / 2), math.ceil(W / 2)
    rows = (torch.arange(H, device=device) + sh) % H  # original row of rolled row p
    cols = (torch.arange(W, device=device) + sw) % W
    token = rows[:, None] * W + cols[None, :]
    order = torch.cat([token[:wh, :ww].flatten(), token[:wh, ww:].flatten(),
                       token[wh:, :ww].flatten(), token[wh:, ww:].flatten()])
    counts = (wh * ww, wh * (W - ww), (H - wh) * ww, (H - wh) * (W - ww))
    return order, counts


def window_ordered_attention(q, k, v, counts, scale):
    """Attention within each window of window-ordered q, k, v [B, N, heads, head_dim]; same order out."""
    if len(set(counts)) == 1:  # four equal windows (even H and W): one batched call
        def windows(t):  # [4B, heads, n, d]: 4-D, or CPU SDPA falls back to its slow math path
            return t.reshape(-1, counts[0], *t.shape[2:]).transpose(1, 2)

        out = F.scaled_dot_product_attention(windows(q), windows(k), windows(v), scale=scale)
        return out.transpose(1, 2).reshape(q.shape)
    out = torch.empty_like(q)
    start = 0
    for count in counts:
        if count:  # H or W == 1 leaves two windows empty
            window = slice(start, start + count)
            heads_first = [t[:, window].transpose(1, 2) for t in (q, k, v)]
            out[:, window] = F.scaled_dot_product_attention(*heads_first, scale=scale).transpose(1, 2)
            start += count
    return out


def msw_attention_gathered(q, k, v, size, shift, scale=None):
    """The same function as ``hidiff_kernels.msw_attention``, computed by gathering tokens in window order."""
    q, k, v = autocast_inputs(q, k, v)
    size, shift, scale = check_msw_args("msw_attention_gathered", q, k, v, size, shift, scale)
    check_no_grad("msw_attention_gathered", q, k, v)
    order, counts = window_token_order(size, shift, q.device)
    attended = window_ordered_attention(*(t.index_select(1, order) for t in (q, k, v)), counts, scale)
    return torch.empty_like(attended).index_copy_(1, order, attended)
