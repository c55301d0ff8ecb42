"""apply_hidiffusion on bare tiny UNets: MSW-MSA and RAU-Net values, sizes, restoration, refusals."""
import copy
import functools
import io
import math
import re
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import (
    AttnProcessor2_0, PAGCFGIdentitySelfAttnProcessor2_0, PAGIdentitySelfAttnProcessor2_0,
)

import hidiff_models.adapter as adapter
import hidiff_models.raunet as raunet
from hidiff_kernels import _common, reference
from hidiff_kernels.ops import msw_attention as msw_module
from hidiff_kernels.ops import rau_conv as rau_module
from hidiff_models import apply_hidiffusion, denoising_step, remove_hidiffusion
from hidiff_models.configs import POOLED_TEXT_DIM, build_unet, seed_weights, unet_config
from hidiff_models.processors import PAG_CHUNKS, PerturbedWindowAttnProcessor, WindowAttnProcessor
from hidiff_models.schedule import ActiveOps

from conftest import relative_error, requires_interpreter

CONV = {"sd15": "down_blocks.0.downsamplers.0.conv", "sdxl": "down_blocks.1.downsamplers.0.conv"}
POOL = {"sd15": "down_blocks.1.attentions.0", "sdxl": "down_blocks.1.attentions.0"}
INTERP = {"sd15": "up_blocks.2.attentions.1", "sdxl": "up_blocks.1.attentions.1"}
WINDOW_TRANSFORMER = {"sd15": "down_blocks.0.attentions.0", "sdxl": "down_blocks.1.attentions.0"}
WINDOW_ATTN = WINDOW_TRANSFORMER["sd15"] + ".transformer_blocks.0.attn1"  # an SD1.5 window block's self-attention


@pytest.fixture(scope="module")
def built():
    return {model: build_unet(model, "tiny", seed=1) for model in ("sd15", "sd21", "sdxl")}


class FreshCopies(dict):
    """unets[model]: a copy of the built UNet, made on first use in a test."""

    def __init__(self, built):
        super().__init__()
        self.built = built

    def __missing__(self, model):
        self[model] = copy.deepcopy(self.built[model])
        return self[model]


@pytest.fixture
def unets(built):
    return FreshCopies(built)


def inputs(model, batch=1, size=(16, 16), seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, *size, generator=gen)
    kwargs = dict(encoder_hidden_states=torch.randn(batch, 7, 32, generator=gen))
    if model == "sdxl":
        kwargs["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, POOLED_TEXT_DIM["tiny"], generator=gen),
                                           time_ids=torch.randn(batch, 6, generator=gen))
    return sample, kwargs


def batch_rows(kwargs, rows):
    """The UNet keyword inputs of batch rows ``rows`` (an index list or slice)."""
    return {k: batch_rows(v, rows) if isinstance(v, dict) else v[rows] for k, v in kwargs.items()}


@torch.no_grad()
def run(unet, sample, kwargs, step=0, n=10):
    with denoising_step(unet, step, n):
        return unet(sample, 500, **kwargs).sample


def module(unet, name):
    return dict(unet.named_modules())[name]


def snapshot(unet):
    """Everything apply may touch, to compare after remove or a refused apply, and the UNet's output."""
    sample, kwargs = inputs("sdxl" if unet.config.addition_embed_type == "text_time" else "sd15", size=(16, 24))
    return dict(
        output=run(unet, sample, kwargs),
        state={k: v.clone() for k, v in unet.state_dict().items()},
        processors=dict(unet.attn_processors),
        hooks=[(name, len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__,
                "_conv_forward" in m.__dict__)
               for name, m in unet.named_modules()],
        num_upsamplers=unet.num_upsamplers,
        cls=type(unet),
        attrs=set(unet.__dict__),
    )


def assert_same_snapshot(unet, before):
    after = snapshot(unet)
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert after["processors"].keys() == before["processors"].keys()
    assert all(after["processors"][k] is v for k, v in before["processors"].items())
    for key in ("hooks", "num_upsamplers", "cls", "attrs"):
        assert after[key] == before[key], key
    assert torch.equal(after["output"], before["output"])


def count_kernel_launches(monkeypatch):
    """{"msw": n, "conv": n}: the Triton kernel launches from now on (a backend that quietly ran the torch
    path would launch none)."""
    launches = {"msw": 0, "conv": 0}
    for name, kernels in (("msw", msw_module), ("conv", rau_module)):
        def counted(*args, _name=name, _launch=kernels._launch, **kwargs):
            launches[_name] += 1
            return _launch(*args, **kwargs)
        monkeypatch.setattr(kernels, "_launch", counted)
    return launches


class PartitionReference:
    """Hand-written MSW-MSA for one attn1: roll the normed tokens by (-sh, -sw), run the stock processor
    inside each of the 2x2 windows (split at ceil(h/2), ceil(w/2)), merge, roll back."""

    def __init__(self, size, shift):
        self.size, self.shift = size, shift

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        (h, w), (sh, sw) = self.size, self.shift
        b, n, c = hidden_states.shape
        grid = torch.roll(hidden_states.view(b, h, w, c), (-sh, -sw), dims=(1, 2))
        out = torch.empty_like(grid)
        for rows in (slice(0, math.ceil(h / 2)), slice(math.ceil(h / 2), h)):
            for cols in (slice(0, math.ceil(w / 2)), slice(math.ceil(w / 2), w)):
                window = grid[:, rows, cols]
                out[:, rows, cols] = AttnProcessor2_0()(attn, window.reshape(b, -1, c)).view(window.shape)
        return torch.roll(out, (sh, sw), dims=(1, 2)).view(b, n, c)


# (model, feature map, phase k, expected shift = (ceil(h/2)//4 * k, ceil(w/2)//4 * k) worked out by hand)
@pytest.mark.parametrize("model, size, phase, shift", [
    ("sd15", (8, 8), 1, (1, 1)),
    ("sd15", (16, 12), 3, (6, 3)),
    ("sd15", (7, 9), 2, (2, 2)),
    ("sd15", (5, 6), 1, (0, 0)),
    ("sdxl", (9, 6), 3, (3, 0)),
])
@pytest.mark.parametrize("drawn", [False, True], ids=["pinned", "drawn"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_interpreter)])
def test_window_attention_matches_partition_reference(unets, monkeypatch, model, size, phase, shift, drawn, backend):
    unet = unets[model]
    reference = module(copy.deepcopy(unet), WINDOW_TRANSFORMER[model])
    for block in reference.transformer_blocks:
        block.attn1.set_processor(PartitionReference(size, shift))
    apply_hidiffusion(unet, backend=backend, apply_raunet=False, window_shift=None if drawn else phase)
    launches = count_kernel_launches(monkeypatch)
    patched = module(unet, WINDOW_TRANSFORMER[model])
    x = torch.randn(2, patched.config.in_channels, *size)
    context = torch.randn(2, 7, 32)
    if drawn:  # the phases a UNet call draws, every one `phase` here: they reach the processors as a tensor
        monkeypatch.setattr(torch, "randint", lambda high, size, generator: torch.full(size, phase))
        unet._hidiffusion.before_unet(unet, (x,), {})
    with torch.no_grad():
        # return_dict=False: the output class a Transformer2DModel returns by default is deprecated in diffusers
        expected = reference(x, encoder_hidden_states=context, return_dict=False)[0]
        got = patched(x, encoder_hidden_states=context, return_dict=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert launches["msw"] == (len(reference.transformer_blocks) if backend == "triton" else 0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_interpreter)])
def test_window_attention_keeps_attention_options(unets, backend):
    # Options of diffusers' Attention that SD and SDXL leave off, applied as its stock processor does: query/key
    # norms, a residual connection, an output rescale.
    unet = unets["sd15"]
    for block in module(unet, WINDOW_TRANSFORMER["sd15"]).transformer_blocks:
        attn = block.attn1
        attn.norm_q, attn.norm_k = (torch.nn.LayerNorm(attn.inner_dim // attn.heads) for _ in range(2))
        for norm in (attn.norm_q, attn.norm_k):
            torch.nn.init.normal_(norm.weight, 1.0, 0.5), torch.nn.init.normal_(norm.bias)
        attn.residual_connection, attn.rescale_output_factor = True, 2.0
    size, shift = (7, 9), (2, 2)  # phase 2
    reference = module(copy.deepcopy(unet), WINDOW_TRANSFORMER["sd15"])
    for block in reference.transformer_blocks:
        block.attn1.set_processor(PartitionReference(size, shift))
    apply_hidiffusion(unet, backend=backend, apply_raunet=False, window_shift=2)
    patched = module(unet, WINDOW_TRANSFORMER["sd15"])
    x, context = torch.randn(2, patched.config.in_channels, *size), torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = reference(x, encoder_hidden_states=context, return_dict=False)[0]
        got = patched(x, encoder_hidden_states=context, return_dict=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("skip", ["skip_attention", "skip_attention_scores"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_interpreter)])
def test_layer_skip_hooks_set_after_apply_skip_window_attention(built, skip, backend):
    # diffusers' layer-skip hooks (the PAG and skip-layer guiders of modular pipelines set them on every guided
    # step) look the skip up by processor class, and PAG's identity attention intercepts SDPA, which the fused
    # kernel does not call. A skipped attention does not depend on its windows: the vanilla block's result.
    layer_skip = pytest.importorskip("diffusers.hooks.layer_skip")
    config = dict(indices=[0], fqn="transformer_blocks", skip_ff=False, skip_attention=skip == "skip_attention",
                  skip_attention_scores=skip == "skip_attention_scores")
    channels = module(built["sd15"], WINDOW_TRANSFORMER["sd15"]).config.in_channels
    x, context = torch.randn(2, channels, 8, 8), torch.randn(2, 7, 32)
    outputs = {}
    for patched, skipped in ((False, True), (True, False), (True, True)):
        unet = copy.deepcopy(built["sd15"])
        if patched:
            apply_hidiffusion(unet, backend=backend, apply_raunet=False, window_shift=1)
        transformer = module(unet, WINDOW_TRANSFORMER["sd15"])
        if skipped:
            layer_skip.apply_layer_skip(transformer, layer_skip.LayerSkipConfig(**config))
        with torch.no_grad():
            outputs[patched, skipped] = transformer(x, encoder_hidden_states=context, return_dict=False)[0]
    torch.testing.assert_close(outputs[True, True], outputs[False, True], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outputs[True, True], outputs[True, False], atol=1e-3)


def test_pyramid_attention_broadcast_recomputes_at_a_rau_net_size_change(built):
    # Pyramid Attention Broadcast replays each attention's cached output on the steps it skips; at a RAU-Net phase
    # change the deep maps change size, so the adapter resets diffusers' stateful hooks there (it was a shape
    # error). Skipping 2 of every 3 steps, step 4 (SD1.5's RAD-conv ends at int(10 * 0.4)) would replay step 3's.
    pab = pytest.importorskip("diffusers.hooks.pyramid_attention_broadcast")
    n = 10
    config = pab.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=3,
                                                 spatial_attention_timestep_skip_range=(-1, 1000),
                                                 current_timestep_callback=lambda: 500)
    x, context = torch.randn(1, 4, 16, 16), torch.randn(1, 7, 32)
    outputs = {}
    for broadcast in (False, True):
        unet = copy.deepcopy(built["sd15"])
        apply_hidiffusion(unet, backend="torch", window_shift=0)
        if broadcast:
            pab.apply_pyramid_attention_broadcast(unet, config)
        for step in range(n):
            with denoising_step(unet, step, n), torch.no_grad():
                outputs[broadcast, step] = unet(x, 999 - 99 * step, context, return_dict=False)[0]
    for step in (0, 4):  # the first call, and the first after the size change: computed, not replayed
        torch.testing.assert_close(outputs[True, step], outputs[False, step], atol=1e-5, rtol=1e-5)
    for step in (1, 5):  # replayed
        assert not torch.allclose(outputs[True, step], outputs[False, step], atol=1e-4)


@pytest.mark.parametrize("wrap", ["forward hook", "instance forward"])
def test_torch_backend_projections_see_tokens_in_map_order_under_a_hook(wrap):
    # A hook on a projection may read the tokens as a map (Smoothed Energy Guidance blurs the query, through
    # diffusers' HookRegistry, which sets the instance's forward): the torch backend, which otherwise projects
    # the tokens in window order, projects them in map order then. The hook here shifts each query one token on.
    from diffusers.models.attention_processor import Attention

    from hidiff_models.processors import shift_for_phase, window_attention

    attn = Attention(query_dim=24, heads=3, dim_head=8).eval()
    hw, shift = (8, 12), shift_for_phase(8, 12, 1)
    x = torch.randn(2, hw[0] * hw[1], 24)
    with torch.no_grad():
        q, k, v = (proj(x).unflatten(-1, (3, 8)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        expected = attn.to_out[0](reference.msw_attention(q.roll(1, 1), k, v, hw, shift, attn.scale).flatten(2))
        unhooked = window_attention(attn, x, hw, shift, fused=False)
        if wrap == "forward hook":
            attn.to_q.register_forward_hook(lambda module, args, out: out.roll(1, 1))
        else:
            attn.to_q.forward = functools.partial(lambda forward, x: forward(x).roll(1, 1), attn.to_q.forward)
        hooked = window_attention(attn, x, hw, shift, fused=False)
    torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hooked, unhooked, atol=1e-3)


# The transformers are called with diffusers' default return_dict=True so that the wrappers' output-object path is
# covered (the UNet itself takes the tuple path); that default output class is deprecated in diffusers.
@pytest.mark.filterwarnings("ignore:`Transformer2DModelOutput` is deprecated:FutureWarning")
@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_rau_modules_values_while_active_and_inactive(unets, model):
    unet = unets[model]
    original = copy.deepcopy(unet)
    apply_hidiffusion(unet, backend="torch", apply_window_attn=False)
    state = unet._hidiffusion
    conv, pool, interp = (module(unet, names[model]) for names in (CONV, POOL, INTERP))
    context = torch.randn(1, 7, 32)
    x = torch.randn(1, conv.in_channels, 13, 18)
    with torch.no_grad():
        state.ops = ActiveOps(rad_conv=True, rad_pool=False)
        out = conv(x)
        assert out.shape[-2:] == (4, 5)  # ceil(13/4), ceil(18/4)
        torch.testing.assert_close(out, F.conv2d(x, conv.weight, conv.bias, stride=4, padding=2, dilation=2))
        feature = torch.randn(1, pool.config.in_channels, 7, 10)
        assert torch.equal(pool(feature, encoder_hidden_states=context).sample,
                           module(original, POOL[model])(feature, encoder_hidden_states=context).sample)

        state.ops = ActiveOps(rad_conv=False, rad_pool=True)
        assert torch.equal(conv(x), module(original, CONV[model])(x))
        pooled = pool(feature, encoder_hidden_states=context).sample
        unpooled = module(original, POOL[model])(feature, encoder_hidden_states=context).sample
        assert pooled.shape[-2:] == (4, 5)  # ceil(7/2), ceil(10/2)
        assert torch.equal(pooled, F.avg_pool2d(unpooled, 2, ceil_mode=True))
        assert state.pre_pool_size == (7, 10)
        up_feature = torch.randn(1, interp.config.in_channels, 4, 5)
        resized = interp(up_feature, encoder_hidden_states=context).sample
        plain = module(original, INTERP[model])(up_feature, encoder_hidden_states=context).sample
        assert torch.equal(resized, F.interpolate(plain, size=(7, 10), mode="bicubic"))


def test_upsamplers_match_diffusers_bit_for_bit(unets, monkeypatch):
    unet = unets["sd15"]
    original = copy.deepcopy(unet)
    apply_hidiffusion(unet, backend="torch")
    fused_calls = []
    real_upsample_conv = reference.upsample_conv

    def counted_upsample_conv(*args, **kwargs):
        fused_calls.append(1)
        return real_upsample_conv(*args, **kwargs)

    monkeypatch.setattr(reference, "upsample_conv", counted_upsample_conv)
    names = [name for name, m in unet.named_modules() if type(m).__name__ == "Upsample2D"]
    assert names == ["up_blocks.0.upsamplers.0", "up_blocks.1.upsamplers.0", "up_blocks.2.upsamplers.0"]
    sizes = (None, (6, 10), (12, 20), (7, 9))
    with torch.no_grad():
        for name in names:
            x = torch.randn(2, module(unet, name).channels, 3, 5)
            for size in sizes:
                assert torch.equal(module(unet, name)(x, size), module(original, name)(x, size))
        assert len(fused_calls) == len(names) * len(sizes)
        # A hook on the conv must see its call (an offload hook brings the weights in): diffusers' own path runs.
        name = names[0]
        seen = []
        module(unet, name).conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
        x = torch.randn(2, module(unet, name).channels, 3, 5)
        assert torch.equal(module(unet, name)(x, (7, 9)), module(original, name)(x, (7, 9)))
        assert seen == [(2, x.shape[1], 7, 9)] and len(fused_calls) == len(names) * len(sizes)


def test_upsampler_forward_wrapped_before_apply_still_runs(unets):
    # An Upsample2D instance with a forward wrapper set before apply (as hook libraries set them) gets no fused
    # override: the wrapper runs, and with it diffusers' own path.
    unet = unets["sd15"]
    name = "up_blocks.1.upsamplers.0"
    upsampler = module(unet, name)
    seen = []

    def wrapper(forward, hidden_states, *args, **kwargs):
        seen.append(hidden_states.shape)
        return forward(hidden_states, *args, **kwargs)

    upsampler.forward = functools.partial(wrapper, upsampler.forward)
    original = copy.deepcopy(unet)
    apply_hidiffusion(unet, backend="torch")
    x = torch.randn(2, upsampler.channels, 3, 5)
    with torch.no_grad():
        assert torch.equal(upsampler(x, (7, 9)), module(original, name)(x, (7, 9)))
    assert seen == [x.shape] * 2


def feature_sizes(unet, names):
    """Register hooks recording the spatial sizes of each named down block's skip outputs."""
    sizes = {}
    for name in names:
        module(unet, name).register_forward_hook(
            lambda m, a, out, name=name: sizes.__setitem__(name, [tuple(t.shape[-2:]) for t in out[1]]))
    return sizes


# Real schedule, n = 10, 16x24 latents. SD1.5 (sd15_1024): RAD-conv for steps 0-3, no pooling.
# SDXL (sdxl_2048, aggressive): RAD-conv at step 0, RAD-pool for steps 1-3.
@pytest.mark.parametrize("model, step, expected", [
    ("sd15", 0, {"down_blocks.0": [(16, 24), (16, 24), (4, 6)], "down_blocks.1": [(4, 6), (4, 6), (2, 3)]}),
    ("sd15", 4, {"down_blocks.0": [(16, 24), (16, 24), (8, 12)], "down_blocks.1": [(8, 12), (8, 12), (4, 6)]}),
    ("sdxl", 0, {"down_blocks.1": [(8, 12), (8, 12), (2, 3)], "down_blocks.2": [(2, 3), (2, 3)]}),
    ("sdxl", 1, {"down_blocks.1": [(4, 6), (4, 6), (2, 3)], "down_blocks.2": [(2, 3), (2, 3)]}),
    ("sdxl", 4, {"down_blocks.1": [(8, 12), (8, 12), (4, 6)], "down_blocks.2": [(4, 6), (4, 6)]}),
])
def test_unet_feature_sizes_follow_schedule(unets, model, step, expected):
    unet = unets[model]
    original = copy.deepcopy(unet)
    apply_hidiffusion(unet, backend="torch", apply_window_attn=False)
    sizes = feature_sizes(unet, expected)
    sample, kwargs = inputs(model, size=(16, 24))
    out = run(unet, sample, kwargs, step=step)
    assert sizes == expected
    assert out.shape == sample.shape and torch.isfinite(out).all()
    if step == 4:  # nothing active: only the upsample path differs in code, not in value
        assert torch.equal(out, run(original, sample, kwargs))


@pytest.mark.parametrize("model", ["sd15", "sd21", "sdxl"])
def test_remove_restores_bit_for_bit(unets, model):
    unet = unets[model]
    before = snapshot(unet)
    sample, kwargs = inputs(model, size=(16, 24))
    expected = run(unet, sample, kwargs)
    apply_hidiffusion(unet, backend="torch")
    assert not torch.equal(run(unet, sample, kwargs, step=0), expected)
    assert remove_hidiffusion(unet) is unet
    assert_same_snapshot(unet, before)
    assert torch.equal(run(unet, sample, kwargs), expected)
    remove_hidiffusion(unet)  # removing twice is a no-op
    assert_same_snapshot(unet, before)


def test_remove_puts_back_an_instance_override_the_module_had_before_apply(unets):
    # RAD-conv overrides the conv's _conv_forward on the instance. Where the instance had its own already (another
    # library's wrapper), RAD-conv chains onto it, and remove must put it back, not delete it (which would
    # silently fall back to nn.Conv2d's).
    unet = unets["sd15"]
    conv = module(unet, CONV["sd15"])
    calls = []

    def own_conv_forward(self, x, weight, bias):
        calls.append(x.shape)
        return torch.nn.Conv2d._conv_forward(self, x, weight, bias)

    own = conv._conv_forward = own_conv_forward.__get__(conv)
    sample, kwargs = inputs("sd15")
    expected = run(unet, sample, kwargs)
    apply_hidiffusion(unet, backend="torch", apply_window_attn=False)
    calls.clear()
    run(unet, sample, kwargs, step=9)  # RAD-conv inactive: the previous _conv_forward, the instance's own, runs
    assert len(calls) == 1
    remove_hidiffusion(unet)
    assert conv.__dict__["_conv_forward"] is own
    calls.clear()
    assert torch.equal(run(unet, sample, kwargs), expected) and len(calls) == 1


@pytest.mark.parametrize("rebuilt", [False, True], ids=["ours", "rebuilt-from-class"])
def test_unfuse_after_remove_sets_back_the_original_processors(unets, rebuilt):
    # diffusers' unfuse_qkv_projections sets back the processors fuse_qkv_projections saw: ours, fused after apply
    unet = unets["sd15"]
    originals = dict(unet.attn_processors)
    apply_hidiffusion(unet, backend="torch")
    if rebuilt:  # as unload_ip_adapter leaves them: unbound until the next UNet call
        unet.set_attn_processor({name: type(p)() for name, p in unet.attn_processors.items()})
        window_sites = {f"{block}.attn1.processor" for block in adapter.LAYOUTS["sd15"].window_blocks}
        originals = {name: p for name, p in originals.items() if name in window_sites}  # the others are new
    unet.fuse_qkv_projections()
    remove_hidiffusion(unet)
    unet.unfuse_qkv_projections()
    assert all(unet.attn_processors[name] is processor for name, processor in originals.items())
    unet.set_default_attn_processor()  # which diffusers refuses on a processor class it does not list


def test_processors_brought_back_after_remove_run_stock_attention(unets):
    unet = unets["sd15"]
    sample, kwargs = inputs("sd15")
    expected = run(unet, sample, kwargs)
    apply_hidiffusion(unet, backend="torch", window_shift=1)
    run(unet, sample, kwargs, step=9)  # the window processors record their map size
    kept_by_the_user = dict(unet.attn_processors)
    remove_hidiffusion(unet)
    unet.set_attn_processor(kept_by_the_user)
    assert sum(isinstance(p, WindowAttnProcessor) for p in unet.attn_processors.values()) == 5
    assert torch.equal(run(unet, sample, kwargs), expected)


def test_apply_twice_and_reapply_equal_apply_once(unets, built):
    sample, kwargs = inputs("sdxl", size=(16, 16))

    def two_steps(unet):
        return [run(unet, sample, kwargs, step=s) for s in (0, 1)]

    once = two_steps(apply_hidiffusion(unets["sdxl"], backend="torch", generator=5))
    twice = copy.deepcopy(built["sdxl"])
    apply_hidiffusion(twice, backend="torch", generator=5)
    apply_hidiffusion(twice, backend="torch", generator=5)
    assert all(torch.equal(a, b) for a, b in zip(two_steps(twice), once))
    again = copy.deepcopy(built["sdxl"])
    apply_hidiffusion(again, backend="torch", generator=5)
    two_steps(again)
    remove_hidiffusion(again)
    apply_hidiffusion(again, backend="torch", generator=5)
    assert all(torch.equal(a, b) for a, b in zip(two_steps(again), once))


@pytest.mark.parametrize("replace", [
    lambda unet: unet.set_attn_processor(AttnProcessor2_0()),  # as fuse_qkv_projections does
    lambda unet: unet.set_default_attn_processor(),  # which diffusers refuses on processor classes it does not list
], ids=["set_attn_processor", "set_default_attn_processor"])
def test_replaced_window_processors_are_reported(unets, replace):
    unet = apply_hidiffusion(unets["sd15"], backend="torch", window_shift=1)
    sample, kwargs = inputs("sd15")
    windowed = run(unet, sample, kwargs, step=9)
    replace(unet)
    with pytest.warns(UserWarning, match="5 of the 5 window-attention processors were replaced"):
        global_attention = run(unet, sample, kwargs, step=9)
    apply_hidiffusion(unet, backend="torch", window_shift=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # (the cross-attention keeps the replacing processor: AttnProcessor rounds unlike AttnProcessor2_0)
        assert relative_error(run(unet, sample, kwargs, step=9), windowed) < 1e-6
    assert relative_error(global_attention, windowed) > 1e-3


def test_replaced_window_processors_are_reported_for_each_patch_at_the_unet_caller(unets):
    unet = unets["sd15"]
    sample, kwargs = inputs("sd15")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: once per line of code
        for _ in range(2):
            apply_hidiffusion(unet, backend="torch")
            unet.set_attn_processor(AttnProcessor2_0())
            run(unet, sample, kwargs, step=9)
            run(unet, sample, kwargs, step=9)  # the same UNet driven by hand: warned already
        exec("run(unet, sample, kwargs, step=9)", dict(run=run, unet=unet, sample=sample, kwargs=kwargs))
        apply_hidiffusion(unet, backend="torch")
        unet.set_attn_processor(AttnProcessor2_0())
        exec("with torch.no_grad(), denoising_step(unet, 9, 10): unet(sample, 500, **kwargs)",
             dict(torch=torch, denoising_step=denoising_step, unet=unet, sample=sample, kwargs=kwargs))
    replaced = [w for w in caught if "window-attention processors were replaced" in str(w.message)]
    assert len(replaced) == 3  # (the third from code without a module name)
    assert all(w.filename == __file__ for w in replaced[:2])  # run() calls the UNet


def test_gradient_checkpointing_recompute_needs_a_pinned_shift(unets):
    # Backward recomputes the checkpointed blocks after the UNet call, whose drawn window phases are gone.
    unet = copy.deepcopy(unets["sd15"]).requires_grad_(False).train()
    unet.enable_gradient_checkpointing()
    sample, kwargs = inputs("sd15")
    sample.requires_grad_(True)

    def loss():
        with denoising_step(unet, 9, 10):
            return unet(sample, 500, **kwargs).sample.square().mean()

    apply_hidiffusion(unet, backend="torch")
    with pytest.raises(RuntimeError, match="gradient checkpointing recomputing blocks in backward"):
        loss().backward()
    apply_hidiffusion(unet, backend="torch", window_shift=1)
    loss().backward()
    assert sample.grad is not None and torch.isfinite(sample.grad).all() and sample.grad.abs().sum() > 0


def test_residuals_passed_by_position_are_resized_as_by_name(unets):
    unet = apply_hidiffusion(unets["sd15"], backend="torch", window_shift=1)
    sample, kwargs = inputs("sd15")
    # ControlNet residuals at the vanilla UNet's maps (conv_in, then 3 per down block but the last's 2; the mid
    # block's): RAD-conv shrinks the UNet's maps at step 0, so each must be resized.
    gen = torch.Generator().manual_seed(3)
    shapes = [(32, 16)] * 3 + [(32, 8)] + [(64, 8)] * 2 + [(64, 4)] * 3 + [(64, 2)] * 3
    down = [0.1 * torch.randn(1, c, s, s, generator=gen) for c, s in shapes]
    mid = 0.1 * torch.randn(1, 64, 2, 2, generator=gen)
    with torch.no_grad(), denoising_step(unet, 0, 10):
        by_name = unet(sample, 500, **kwargs, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
        by_position = unet(sample, 500, kwargs["encoder_hidden_states"], None, None, None, None, None, down, mid)[0]
    assert torch.equal(by_position, by_name)
    assert relative_error(by_name, run(unet, sample, kwargs)) > 1e-3  # the residuals count


def test_unbound_window_processor_refuses_to_run():
    # What diffusers' IP-Adapter loaders make from the class; a patched UNet swaps it for its own at each call.
    with pytest.raises(RuntimeError, match="not bound to a UNet"):
        WindowAttnProcessor()(None, torch.randn(1, 4, 8))


def test_window_processor_refuses_what_it_cannot_window(unets):
    # Inputs no window-block call of the UNet makes: reached only by calling the attention module directly.
    unet = apply_hidiffusion(unets["sd15"], backend="torch")
    attn = module(unet, WINDOW_ATTN)
    processor, tokens = attn.processor, torch.randn(1, 16, attn.query_dim)
    processor.feature_size = (4, 4)
    with pytest.raises(ValueError, match="self-attention without a mask"):
        processor(attn, tokens, encoder_hidden_states=tokens)
    with pytest.raises(RuntimeError, match=r"expects \[B, h\*w, C\] tokens"):
        processor(attn, tokens.view(1, 16, attn.query_dim, 1))
    processor.feature_size = (4, 5)
    with pytest.raises(RuntimeError, match="feature map 4x5 does not match 16 tokens"):
        processor(attn, tokens)


def test_pickling_a_patched_unet_is_refused_clearly(unets):
    unet = apply_hidiffusion(unets["sd15"], backend="torch")
    with pytest.raises(TypeError, match="save its state_dict, or call remove_hidiffusion"):
        torch.save(unet, io.BytesIO())
    torch.save(remove_hidiffusion(unet), io.BytesIO())


def scaled_weights(unet, factor=1.1):
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(factor)
    return unet


def test_a_call_during_the_first_apply_waits_for_the_install(unets, built, monkeypatch):
    # Another thread calling the UNet as soon as its call is tracked, while apply still installs: the call waits
    # and runs patched (it once found no state there and recursed).
    unet = unets["sd15"]
    sample, kwargs = inputs("sd15")
    expected = run(apply_hidiffusion(copy.deepcopy(built["sd15"]), backend="torch", window_shift=1,
                                     apply_raunet=False), sample, kwargs)
    outcome, threads = [], []

    def call():
        try:
            with torch.no_grad():
                outcome.append(unet(sample, 500, **kwargs).sample)
        except BaseException as error:  # noqa: BLE001 - the test reports it
            outcome.append(error)

    def set_attribute(module, name, value):
        undo = real_set_attribute(module, name, value)
        if module is unet and name == "_call_impl":
            threads.append(threading.Thread(target=call))
            threads[0].start()
            threads[0].join(0.5)
        return undo

    real_set_attribute = raunet.set_attribute
    monkeypatch.setattr(raunet, "set_attribute", set_attribute)
    apply_hidiffusion(unet, backend="torch", window_shift=1, apply_raunet=False)
    threads[0].join(60)
    (got,) = outcome
    assert not isinstance(got, BaseException), repr(got)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_deepcopy_is_an_independent_patched_unet(unets, built, model):
    """copy.deepcopy of a patched UNet is patched on its own modules, state and weights; removing from the copy
    leaves the original patched (closures would have kept acting on the original's modules)."""
    sample, kwargs = inputs(model, size=(16, 24))
    steps = (0, 9)  # RAU-Net + MSW-MSA, then MSW-MSA only; the window phases are drawn

    def outputs(unet):
        return [run(unet, sample, kwargs, step=s) for s in steps]

    unet = apply_hidiffusion(unets[model], backend="torch", generator=5)
    twin = scaled_weights(copy.deepcopy(unet))
    scaled = apply_hidiffusion(scaled_weights(copy.deepcopy(built[model])), backend="torch", generator=5)
    assert all(torch.equal(a, b) for a, b in zip(outputs(twin), outputs(scaled)))

    remove_hidiffusion(twin)
    vanilla = snapshot(built[model])
    assert all(snapshot(twin)[key] == vanilla[key] for key in ("hooks", "num_upsamplers", "cls", "attrs"))
    remove_hidiffusion(scaled)
    assert all(torch.equal(a, b) for a, b in zip(outputs(twin), outputs(scaled)))
    fresh = apply_hidiffusion(copy.deepcopy(built[model]), backend="torch", generator=5)
    assert all(torch.equal(a, b) for a, b in zip(outputs(unet), outputs(fresh)))


def other_layout_unet():
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(model_type="sd3"), ValueError, "model_type"),
    (dict(model_type="sdxl"), ValueError, "does not match"),
    (dict(window_shift=4), ValueError, "window_shift"),
    (dict(generator="seed"), TypeError, "generator"),
    (dict(generator=2**64), ValueError, "generator: int seed .* outside torch's seed range"),
    (dict(apply_raunet="no"), TypeError, "apply_raunet must be True or False"),
    (dict(apply_window_attn=None), TypeError, "apply_window_attn must be True or False"),
])
def test_bad_arguments_are_refused_before_any_change(unets, kwargs, error, match):
    unet = unets["sd15"]
    before = snapshot(unet)
    with pytest.raises(error, match=match):
        apply_hidiffusion(unet, **kwargs)
    assert_same_snapshot(unet, before)


def test_unsupported_models_are_refused(unets):
    unet = other_layout_unet()
    before = snapshot(unet)
    with pytest.raises(ValueError, match="SD1.5/SD2.x and SDXL UNet layouts"):
        apply_hidiffusion(unet)
    assert_same_snapshot(unet, before)
    for thing in (torch.nn.Linear(2, 2), object(), "unet"):
        with pytest.raises(TypeError, match="UNet2DConditionModel"):
            apply_hidiffusion(thing)

    class MotionPipeline:  # as AnimateDiff's pipelines: a .unet of another class
        unet = torch.nn.Linear(2, 2)

        def __call__(self):
            pass

    with pytest.raises(TypeError, match=r"got MotionPipeline \(its .unet: Linear\)"):
        apply_hidiffusion(MotionPipeline())


class ProcessorWithWeights(torch.nn.Module):  # as IP-Adapter's processors: weights of their own
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def __call__(self, *args, **kwargs):
        return AttnProcessor2_0()(*args, **kwargs)


def set_module(unet, name, new):
    parent, _, child = name.rpartition(".")
    setattr(module(unet, parent), child, new)


@pytest.mark.parametrize("change, match", [
    (lambda u: set_module(u, CONV["sd15"], torch.nn.AvgPool2d(2)), "expected a Conv2d at"),
    (lambda u: set_module(u, CONV["sd15"], torch.nn.Conv2d(32, 32, 1, stride=2)),
     "not a 3x3 stride-2 downsampler conv"),
    (lambda u: setattr(module(u, WINDOW_ATTN), "is_cross_attention", True), "not a plain self-attention"),
    (lambda u: setattr(module(u, WINDOW_ATTN), "group_norm", torch.nn.GroupNorm(8, 32)), "group/spatial norm"),
    (lambda u: module(u, WINDOW_ATTN).set_processor(ProcessorWithWeights()), "processor with weights"),
], ids=["rad-conv-not-a-conv", "rad-conv-geometry", "cross-attention", "group-norm", "processor-weights"])
def test_layout_mismatches_are_refused_before_any_change(unets, change, match):
    # A UNet of the SD1.5 block layout whose modules HiDiffusion would patch are not what it expects.
    unet = unets["sd15"]
    change(unet)
    before = snapshot(unet)
    with pytest.raises(ValueError, match=match):
        apply_hidiffusion(unet, backend="torch")
    assert_same_snapshot(unet, before)


def test_triton_without_interpreter_on_cpu_is_refused(unets, monkeypatch):
    monkeypatch.setattr(_common, "interpreter_enabled", lambda: False)
    unet = unets["sd15"]
    before = snapshot(unet)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        apply_hidiffusion(unet, backend="triton")
    assert_same_snapshot(unet, before)


def test_refused_reapply_keeps_the_previous_patch(unets):
    unet = apply_hidiffusion(unets["sd15"], backend="torch", window_shift=1)
    state = unet._hidiffusion
    sample, kwargs = inputs("sd15")
    before = [run(unet, sample, kwargs, step=s) for s in (0, 9)]
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        apply_hidiffusion(unet, backend="nope")
    assert unet._hidiffusion is state and state.undo
    assert all(torch.equal(run(unet, sample, kwargs, step=s), out) for s, out in zip((0, 9), before))


def test_failure_in_the_middle_of_the_install_undoes_it(unets, monkeypatch):
    """An unexpected error part-way through patching (here at the second of SD1.5's three upsamplers, after
    the window processors, RAD-conv and the rest) leaves the UNet as it was."""
    unet = unets["sd15"]
    before = snapshot(unet)
    install = raunet.install_fused_upsample
    installed = []

    def fails_the_second_time(module, state):
        if installed:
            raise RuntimeError("install failed")
        installed.append(module)
        return install(module, state)

    monkeypatch.setattr(raunet, "install_fused_upsample", fails_the_second_time)
    with pytest.raises(RuntimeError, match="install failed"):
        apply_hidiffusion(unet, backend="torch")
    assert installed
    assert_same_snapshot(unet, before)


def test_random_window_shift_uses_own_generator(unets, built):
    sample, kwargs = inputs("sd15")
    apply_hidiffusion(unets["sd15"], backend="torch", generator=7, apply_raunet=False)
    rng = torch.get_rng_state()
    first = run(unets["sd15"], sample, kwargs)
    assert torch.equal(torch.get_rng_state(), rng)
    same_seed = apply_hidiffusion(copy.deepcopy(built["sd15"]), backend="torch",
                                  generator=torch.Generator().manual_seed(7), apply_raunet=False)
    assert torch.equal(run(same_seed, sample, kwargs), first)
    other_seed = apply_hidiffusion(copy.deepcopy(built["sd15"]), backend="torch", generator=8, apply_raunet=False)
    assert not torch.equal(run(other_seed, sample, kwargs), first)


def test_nested_denoising_steps_the_innermost_wins(unets):
    unet = apply_hidiffusion(unets["sd15"], backend="torch", apply_window_attn=False)
    sample, kwargs = inputs("sd15")
    late = run(unet, sample, kwargs, step=9)  # RAU-Net inactive
    with torch.no_grad(), denoising_step(unet, 0, 10):  # RAD-conv active
        outer = unet(sample, 500, **kwargs).sample
        with denoising_step(unet, 9, 10):
            inner = unet(sample, 500, **kwargs).sample
    assert not torch.equal(outer, late)
    assert torch.equal(inner, late)


def test_rad_conv_on_a_latent_divisible_by_a_large_power_of_two(unets):
    """diffusers passes the skip connection's size to the upsamplers only when 2**num_upsamplers does not divide
    the latent; RAU-Net needs it always (x4 after RAD-conv), hence the large num_upsamplers while patched."""
    unet = apply_hidiffusion(unets["sdxl"], backend="torch", apply_window_attn=False)
    assert 2 ** unet.num_upsamplers > 2048  # latents of images up to 16384 px
    sample, kwargs = inputs("sdxl", size=(64, 64))  # 2**(2 + 4) divides it
    out = run(unet, sample, kwargs, step=0)
    assert out.shape == sample.shape and torch.isfinite(out).all()


def test_unet_call_without_step_source_is_refused(unets):
    unet = apply_hidiffusion(unets["sd15"], backend="torch")
    sample, kwargs = inputs("sd15")
    with pytest.raises(RuntimeError, match="denoising_step"), torch.no_grad():
        unet(sample, 500, **kwargs)
    with pytest.raises(ValueError, match="0 <= step < num_steps"):
        with denoising_step(unet, 10, 10):
            pass


@pytest.mark.parametrize("step, num_steps, bad", [
    (1.0, 10, "step"), (0, 10.0, "num_steps"), (True, 10, "step"), (0, True, "num_steps"), ("0", 10, "step"),
    (torch.tensor(0), 10, "step"),  # a 0-d tensor (an index read off a tensor) is no int either
])
def test_denoising_step_refuses_non_int_steps(built, step, num_steps, bad):
    # bool is an int subclass: refused all the same (denoising_step(unet, True, 10) is a slip, not step 1)
    value = {"step": step, "num_steps": num_steps}[bad]
    with pytest.raises(TypeError, match=rf"{bad} must be an int, got {re.escape(repr(value))}"):
        with denoising_step(built["sd15"], step, num_steps):
            pass


@pytest.mark.parametrize("step, num_steps", [(-1, 10), (10, 10), (0, 0)])
def test_denoising_step_refuses_a_step_out_of_range_naming_it(built, step, num_steps):
    with pytest.raises(ValueError, match=rf"0 <= step < num_steps, got step={step}, num_steps={num_steps}$"):
        with denoising_step(built["sd15"], step, num_steps):
            pass


# each leaves the x4/x2 grid at some depth (a side not divisible by 4, or an odd side halved); 1xN, Nx1 at all
@pytest.mark.parametrize("size", [(20, 28), (18, 26), (17, 23), (1, 11), (11, 1)])
@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_odd_sizes_and_batches_run_with_every_op_active(unets, monkeypatch, model, size):
    monkeypatch.setattr(adapter, "active_ops", lambda *args, **kwargs: ActiveOps(rad_conv=True, rad_pool=True))
    unet = apply_hidiffusion(unets[model], backend="torch", window_shift=2)
    sample, kwargs = inputs(model, batch=2, size=size)
    out = run(unet, sample, kwargs)
    assert out.shape == sample.shape and torch.isfinite(out).all()
    # each batch element is computed on its own
    single = run(unet, sample[1:], batch_rows(kwargs, slice(1, None)))
    torch.testing.assert_close(out[1:], single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
@pytest.mark.parametrize("pag", [PAGCFGIdentitySelfAttnProcessor2_0, PAGIdentitySelfAttnProcessor2_0])
def test_pag_at_window_sites_composes_with_msw(unets, model, pag):
    # PAG perturbs the batch's last chunk. The UNet computes each sample on its own, so the guided samples must
    # get MSW-MSA exactly as without PAG, and the perturbed one diffusers' own identity self-attention.
    unet = apply_hidiffusion(unets[model], backend="torch", window_shift=1)
    chunks = PAG_CHUNKS[pag]
    sample, kwargs = inputs(model, batch=chunks)
    sites = [attn for attn, _ in unet._hidiffusion.window_sites][::2]  # some of the window blocks
    window_processors = [attn.processor for attn in sites]
    perturb = pag()
    for attn in sites:
        attn.processor = perturb  # as PAG's pipelines set it for their call
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "processors were replaced" warning
        out = run(unet, sample, kwargs)
    assert all(attn.processor is perturb for attn in sites)  # PAG's processor is back after the call

    for attn, processor in zip(sites, window_processors):
        attn.processor = processor
    guided = run(unet, sample[:-1], batch_rows(kwargs, slice(None, -1)))
    stock = type("StockPAG", (pag,), {})()  # diffusers' code under a class the adapter does not compose
    for attn in sites:
        attn.processor = stock
    last = [chunks - 1] * chunks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "processors were replaced": so they are, on purpose
        perturbed = run(unet, sample[last], batch_rows(kwargs, last))[-1:]
    assert relative_error(out[:-1], guided) < 1e-5
    assert relative_error(out[-1:], perturbed) < 1e-5


@pytest.mark.parametrize("pag", [PAGCFGIdentitySelfAttnProcessor2_0, PAGIdentitySelfAttnProcessor2_0])
def test_pag_identity_path_keeps_residual_connection_and_rescale(unets, pag):
    # The perturbed chunk's identity attention adds the residual and rescales itself (SD/SDXL leave both off, so
    # the pipeline tests never reach it): as diffusers' PAG processor on the same input, chunk for chunk.
    unet = apply_hidiffusion(unets["sd15"], backend="torch", apply_raunet=False, window_shift=1)
    attn = module(unet, WINDOW_ATTN)
    attn.residual_connection, attn.rescale_output_factor = True, 2.0
    window = attn.processor
    window.feature_size = (4, 4)
    chunks = PAG_CHUNKS[pag]
    x = torch.randn(chunks, 16, attn.query_dim)
    with torch.no_grad():
        composed = PerturbedWindowAttnProcessor(window, chunks)(attn, x)
        stock = pag()(attn, x)
        guided = window(attn, x[:-1])
    torch.testing.assert_close(composed[-1:], stock[-1:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(composed[:-1], guided, atol=0, rtol=0)


@requires_interpreter
@pytest.mark.parametrize("model, memory_format, size", [  # the interpreter is slow: small maps
    ("sd15", torch.contiguous_format, (8, 12)),
    ("sd15", torch.channels_last, (8, 12)),  # unet.to(memory_format=torch.channels_last): the usual deployment
    ("sd21", torch.contiguous_format, (8, 12)),  # linear projections, 2 heads in the top blocks
    ("sdxl", torch.contiguous_format, (8, 12)),
    ("sd15", torch.contiguous_format, (9, 7)),  # odd: uneven windows, RAD-conv and upsamples off the x4/x2 grid
])
def test_triton_backend_matches_torch_backend(built, monkeypatch, model, memory_format, size):
    sample, kwargs = inputs(model, size=size)
    launches = count_kernel_launches(monkeypatch)
    outputs = {}
    for backend in ("triton", "torch"):
        unet = copy.deepcopy(built[model])
        if backend == "triton":
            unet.to(memory_format=memory_format)
        apply_hidiffusion(unet, backend=backend, generator=3)
        x = sample.to(memory_format=memory_format) if backend == "triton" else sample
        outputs[backend] = [run(unet, x, kwargs, step=s) for s in (0, 1)]
        if backend == "triton":  # RAD-conv and the fused upsamplers at step 0, MSW-MSA at both steps
            assert launches["msw"] > 0 and launches["conv"] > 0, launches
            triton_launches = dict(launches)
    assert launches == triton_launches  # none by the torch backend
    for got, expected in zip(outputs["triton"], outputs["torch"]):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_pag_processor_is_not_put_back_once_pag_has_ended(unets):
    unet = apply_hidiffusion(unets["sd15"], backend="torch", window_shift=1)
    sample, kwargs = inputs("sd15", batch=2)
    attn, ours = unet._hidiffusion.window_sites[0]
    attn.processor = PAGIdentitySelfAttnProcessor2_0()  # during a PAG pipeline's call
    run(unet, sample, kwargs)
    attn.processor = ours  # PAG's call ends: it puts back what it found
    run(unet, sample[:1], batch_rows(kwargs, slice(0, 1)))  # a plain call
    assert attn.processor is ours


def test_reapply_with_another_window_shift_equals_a_fresh_apply(unets, built):
    sample, kwargs = inputs("sd15")
    unet = apply_hidiffusion(unets["sd15"], backend="torch", window_shift=1)
    apply_hidiffusion(unet, backend="torch", window_shift=2)
    fresh = apply_hidiffusion(copy.deepcopy(built["sd15"]), backend="torch", window_shift=2)
    assert torch.equal(run(unet, sample, kwargs, step=9), run(fresh, sample, kwargs, step=9))


@requires_interpreter
def test_reapply_with_another_backend_switches_to_it(unets, monkeypatch):
    unet = apply_hidiffusion(unets["sd15"], backend="torch", window_shift=1)
    apply_hidiffusion(unet, backend="triton", window_shift=1)
    launches = count_kernel_launches(monkeypatch)
    run(unet, *inputs("sd15", size=(8, 8)), step=9)
    assert launches["msw"] > 0


def test_same_settings_reapply_restarts_the_window_phases_of_bare_calls(unets):
    sample, kwargs = inputs("sd15")
    unet = apply_hidiffusion(unets["sd15"], backend="torch", generator=5, apply_raunet=False)
    first = run(unet, sample, kwargs)
    apply_hidiffusion(unet, backend="torch", generator=5, apply_raunet=False)
    assert torch.equal(run(unet, sample, kwargs), first)


@pytest.mark.parametrize("variant", ["inpainting", "inpainting_name", "playground", "turbo"])
def test_sdxl_variants_skip_the_aggressive_mode(monkeypatch, variant):
    """SDXL at 16x16 latents (the sdxl_2048 profile), step 0 of 10: aggressive RAD-conv without pooling, except
    for inpainting UNets (9 input channels, or named so), Playground and SDXL-Turbo (here given explicitly),
    which pool instead."""
    seen = []
    real = adapter.active_ops

    def logged(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(adapter, "active_ops", logged)
    config = unet_config("sdxl", "tiny")
    if variant == "inpainting":
        config["in_channels"] = 9
    unet = seed_weights(UNet2DConditionModel(**config), 1).eval()
    if variant == "inpainting_name":
        unet.register_to_config(_name_or_path="diffusers/stable-diffusion-xl-1.0-inpainting-0.1")
    if variant == "playground":
        unet.register_to_config(_name_or_path="playgroundai/playground-v2.5-1024px-aesthetic")
    apply_hidiffusion(unet, backend="torch", apply_window_attn=False,
                      model_type="sdxl_turbo" if variant == "turbo" else None)
    _, kwargs = inputs("sdxl", size=(16, 16))
    run(unet, torch.randn(1, unet.config.in_channels, 16, 16), kwargs, step=0)
    assert seen == [ActiveOps(rad_conv=False, rad_pool=True)]


@pytest.mark.parametrize("dtype, autocast", [(torch.float16, False), (torch.bfloat16, False), (torch.float16, True)],
                         ids=["fp16", "bf16", "fp16-autocast"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_interpreter)])
@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_half_precision_unet_matches_float32(built, model, backend, dtype, autocast):
    # Deployments run fp16/bf16 UNets, or a float32 one under torch.autocast (diffusers' training scripts'
    # validation). At step 0 (RAD-conv, the fused upsamplers and MSW-MSA active) the output comes in the half
    # dtype and is about as close to the float32 run as the plain UNet's is.
    sample, kwargs = inputs(model, size=(8, 12) if backend == "triton" else (16, 20))
    errors = {}
    for patched in (False, True):
        outputs = {}
        for half in (False, True):
            tensor_dtype = dtype if half and not autocast else torch.float32
            unet = copy.deepcopy(built[model]).to(tensor_dtype)
            if patched:
                apply_hidiffusion(unet, backend=backend if half else "torch", window_shift=1)
            cast = torch.utils._pytree.tree_map(lambda t: t.to(tensor_dtype), kwargs)  # added_cond_kwargs too
            with (denoising_step(unet, 0, 10), torch.no_grad(),
                  torch.autocast("cpu", dtype=dtype, enabled=half and autocast)):
                outputs[half] = unet(sample.to(tensor_dtype), 500, **cast).sample
        assert outputs[True].dtype == dtype
        errors[patched] = relative_error(outputs[True], outputs[False])
    assert errors[True] < 3 * errors[False], errors
