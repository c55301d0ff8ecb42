"""MSW-MSA: a diffusers attention processor for attn1 that attends inside the 2x2 shifted windows."""
import math

import torch
from diffusers.models.attention_processor import (
    AttnProcessor2_0, PAGCFGIdentitySelfAttnProcessor2_0, PAGIdentitySelfAttnProcessor2_0,
)

from hidiff_kernels import msw_attention
from hidiff_kernels.ops.window_gather import window_ordered_attention, window_token_order

from .ops import is_wrapped, uses_triton


class WindowAttnProcessor:
    """Self-attention of each token with the tokens of its window (MSW-MSA).

    The projections are the attention module's own (so LoRA layers on them keep working); only the
    softmax attention is windowed (see ``window_attention``). ``feature_size`` is the (h, w) token map,
    recorded before every call by a pre-hook on the enclosing Transformer2DModel.

    diffusers' loaders (``load_ip_adapter``, ``unload_ip_adapter``) rebuild every attention processor from its
    class with no arguments: such an unbound instance stands in for the site's own processor, which the patched
    UNet puts back at its next call (``remove_hidiffusion`` puts back the original one). A processor of a patch
    removed since, which a copy of the processors taken while patched can bring back, runs stock attention
    (AttnProcessor2_0; diffusers' own copy, for ``unfuse_qkv_projections``, gets the originals back).
    """

    def __init__(self, state=None):
        self.state = state  # None: unbound
        self.phase = None  # this block's window phase drawn for the UNet call in progress (see state.phase)
        self.scores_skip_hooked = False  # for the UNet call in progress: see scores_skip_hooked()
        self.feature_size = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if self.state is None:
            raise RuntimeError("this HiDiffusion window-attention processor is not bound to a UNet (diffusers "
                               "re-created it from its class); call apply_hidiffusion on the UNet that runs it")
        if self.state.retired:
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("HiDiffusion window attention is self-attention without a mask; "
                             "got encoder_hidden_states or attention_mask")
        if hidden_states.ndim != 3 or self.feature_size is None:
            raise RuntimeError("HiDiffusion window attention expects [B, h*w, C] tokens of a recorded feature map")
        batch, tokens, _ = hidden_states.shape
        h, w = self.feature_size
        if h * w != tokens:
            raise RuntimeError(f"HiDiffusion window attention: feature map {h}x{w} does not match {tokens} tokens")

        shift = shift_for_phase(h, w, self.state.phase(self))
        fused = uses_triton(self.state.backend, hidden_states.device) and not (
            self.scores_skip_hooked or _attention_scores_skipped())
        out = window_attention(attn, hidden_states, (h, w), shift, fused)
        out = attn.to_out[1](out)  # dropout
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def register_for_layer_skip():
    """diffusers' layer-skip hooks (``apply_layer_skip``; the PAG and skip-layer guiders of modular pipelines) look
    up how to skip an attention by its processor's class: a window block skips as the AttnProcessor2_0 it replaced
    (its attention's output is its input). No-op on a diffusers without them."""
    try:
        from diffusers.hooks._helpers import AttentionProcessorRegistry

        AttentionProcessorRegistry.register(WindowAttnProcessor, AttentionProcessorRegistry.get(AttnProcessor2_0))
    except Exception:  # an optional feature: a diffusers whose registry changed just goes without it
        pass


def scores_skip_hooked(attn):
    """Whether a diffusers layer-skip hook on ``attn`` replaces its attention scores (the PAG guider's identity
    attention): it intercepts F.scaled_dot_product_attention, which the torch path calls per window and the fused
    kernel does not. Read eagerly before each UNet call, so that a compiled forward guards on the answer."""
    registry = getattr(attn, "_diffusers_hook", None)
    return any(getattr(hook, "skip_attention_scores", False) for hook in getattr(registry, "hooks", {}).values())


def _attention_scores_skipped():
    """Whether a score skip's function mode is active around this call (the layer-skip hook's, or one pushed by
    hand): seen eagerly only, not while torch.compile traces."""
    if torch.compiler.is_compiling():
        return False
    modes = torch.overrides._get_current_function_mode_stack()
    return any(type(mode).__name__ == "AttentionScoreSkipFunctionMode" for mode in modes)


# diffusers' PAG processors of UNet self-attention, by the number of chunks in the batch they perturb the last of
PAG_CHUNKS = {PAGCFGIdentitySelfAttnProcessor2_0: 3, PAGIdentitySelfAttnProcessor2_0: 2}


class PerturbedWindowAttnProcessor:
    """A window site under perturbed-attention guidance (diffusers' PAG pipelines): MSW-MSA for the guided part
    of the batch, PAG's identity self-attention (each token's own value) for its last, perturbed chunk.

    PAG sets its identity processors on the layers it perturbs for a whole pipeline call; at a window site the
    patched UNet runs this composition in their place for each UNet call and puts PAG's processor back after.
    """

    def __init__(self, window_processor, chunks):
        self.window_processor = window_processor
        self.chunks = chunks  # 3: [uncond, cond, perturbed] (PAG with CFG), 2: [cond, perturbed]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        *guided, perturbed = hidden_states.chunk(self.chunks)
        guided = self.window_processor(attn, torch.cat(guided), encoder_hidden_states, attention_mask, temb)
        identity = attn.to_out[1](attn.to_out[0](attn.to_v(perturbed)))
        if attn.residual_connection:
            identity = identity + perturbed
        return torch.cat([guided, identity / attn.rescale_output_factor])


def window_attention(attn, hidden_states, size, shift, fused):
    """attn1's projections around MSW-MSA, up to its output projection (no dropout or residual).

    fused: the msw_attention kernel on the tokens in place (Triton backend). Otherwise (torch backend) the
    tokens are gathered in window order, attend per window with SDPA, and are scattered back. The projections
    act per token, so the map is gathered before them and scattered after the output projection: two copies of
    the map where the original's roll/partition makes four. Where a hook wraps a projection it may read the
    tokens as a map (Smoothed Energy Guidance blurs the query), so they run on the tokens in map order.
    """
    if fused:
        q, k, v = _project_qkv(attn, hidden_states)
        out = msw_attention(q, k, v, size, shift, scale=attn.scale)
        return attn.to_out[0](out.flatten(2).to(q.dtype))
    order, counts = window_token_order(size, shift, hidden_states.device)
    if not any(is_wrapped(p) for p in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])):
        q, k, v = _project_qkv(attn, hidden_states.index_select(1, order))
        out = attn.to_out[0](window_ordered_attention(q, k, v, counts, attn.scale).flatten(2).to(q.dtype))
        return _unorder(out, order)
    q, k, v = (t.index_select(1, order) for t in _project_qkv(attn, hidden_states))
    out = window_ordered_attention(q, k, v, counts, attn.scale).flatten(2).to(q.dtype)
    return attn.to_out[0](_unorder(out, order))


def _project_qkv(attn, x):
    """q, k, v [B, N, heads, head_dim] of tokens x [B, N, C], with the attention's q/k norms."""
    q, k, v = (proj(x).reshape(*x.shape[:-1], attn.heads, -1) for proj in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


def _unorder(tokens, order):
    """Tokens [B, N, ...] in window order back in map order."""
    return torch.empty_like(tokens).index_copy_(1, order, tokens)


def shift_for_phase(h, w, phase):
    """The roll of the 2x2 window grid of an h x w map for phase k in {0, 1, 2, 3}: (sh, sw), or a tensor [2]
    on phase's device when phase is a 0-d tensor.

    As in the original implementation, a zero height shift (windows under 4 rows) skips the roll
    altogether, dropping the width shift too: it only happens on tiny maps, and keeps images identical.
    Branches only on the map size, never on ``phase``'s value.
    """
    unit_h, unit_w = math.ceil(h / 2) // 4, math.ceil(w / 2) // 4
    if unit_h == 0:
        return 0, 0
    if isinstance(phase, torch.Tensor):
        return torch.stack((phase * unit_h, phase * unit_w))
    return unit_h * phase, unit_w * phase
