"""MSW-MSA: a diffusers attention processor for attn1 that attends inside the 2x2 shifted windows."""
import math

from .ops import kernel_op


class WindowAttnProcessor:
    """Self-attention of each token with the tokens of its window (MSW-MSA), via the msw_attention op.

    The projections are the attention module's own (so LoRA layers on them keep working); only the
    softmax attention is windowed. ``feature_size`` is the (h, w) token map, recorded before every call by
    a pre-hook on the enclosing Transformer2DModel.
    """

    def __init__(self, state):
        self.state = state
        self.feature_size = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("HiDiffusion window attention is self-attention without a mask; "
                             "got encoder_hidden_states or attention_mask")
        if hidden_states.ndim != 3 or self.feature_size is None:
            raise RuntimeError("HiDiffusion window attention expects [B, h*w, C] tokens of a recorded feature map")
        batch, tokens, _ = hidden_states.shape
        h, w = self.feature_size
        if h * w != tokens:
            raise RuntimeError(f"HiDiffusion window attention: feature map {h}x{w} does not match {tokens} tokens")

        q, k, v = (proj(hidden_states).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        msw_attention = kernel_op("msw_attention", self.state.backend, q.device)
        out = msw_attention(q, k, v, (h, w), self.state.window_shift(h, w), scale=attn.scale)
        out = attn.to_out[0](out.flatten(2).to(q.dtype))
        out = attn.to_out[1](out)  # dropout
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def shift_for_phase(h, w, phase):
    """The roll of the 2x2 window grid of an h x w map for phase k in {0, 1, 2, 3}.

    As in the original implementation, a zero height shift (windows under 4 rows) skips the roll
    altogether, dropping the width shift too: it only happens on tiny maps, and keeps images identical.
    """
    shift_h, shift_w = math.ceil(h / 2) // 4 * phase, math.ceil(w / 2) // 4 * phase
    return (shift_h, shift_w) if shift_h > 0 else (0, 0)
