"""RAU-Net as hooks and instance-level forward overrides: module names and state_dict keys never change.

Every ``install_*`` returns an undo callable. The hooks read ``state.ops`` (the ActiveOps of the UNet call
in progress, set before the UNet's forward by its patched ``__call__``) and ``state.backend``.

Hooks, overrides and undos are ``patch``es (partials of module-level functions), never closures:
``copy.deepcopy`` keeps a function as it is, so a closure in a copied UNet would still act on the original's
modules and state, while a partial's arguments are copied along with the model.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .ops import is_wrapped, kernel_op

# Added to unet.num_upsamplers so that 2**num_upsamplers divides no latent size: the UNet then always
# forwards the skip connection's size to its upsamplers (RAU-upsample).
FORCE_UPSAMPLE_SIZE = 12


def patch(fn, *args):
    """``fn`` with its leading arguments bound, for a hook, override or undo: a deepcopy of the model copies the
    arguments memo-consistently, so the copy's patch holds the copy's modules and state."""
    return functools.partial(fn, *args)


def override_method(module, method, fn, *args):
    """Set ``module.<method> = patch(fn, *args, current method)`` on the instance; returns the undo."""
    return set_attribute(module, method, patch(fn, *args, getattr(module, method)))


def set_attribute(module, name, value):
    """Set ``module.<name> = value`` on the instance; returns the undo (the instance's own value again, or none)."""
    had_own, own = name in module.__dict__, module.__dict__.get(name)
    setattr(module, name, value)
    return patch(_restore_attribute, module, name, had_own, own)


def _restore_attribute(module, name, had_own, own):
    if had_own:
        setattr(module, name, own)
    else:
        delattr(module, name)


DOWNSAMPLER_GEOMETRY = ((2, 2), (1, 1), (1, 1))  # stride, padding, dilation of a 3x3 downsampler conv
_RAD_GEOMETRY = ((4, 4), (2, 2), (2, 2))


def install_rad_conv(conv, state):
    """RAD-conv: while active, the downsampler conv runs with stride 4, padding 2, dilation 2.

    The override replaces nn.Conv2d's ``_conv_forward(x, weight, bias)``, which its ``forward`` calls: whatever
    wraps that forward (accelerate's offload hooks, which bring the weights to the device) runs first, in
    either order of apply and offload, and hands over the weights it loaded.
    """
    return override_method(conv, "_conv_forward", _rad_conv_forward, state)


def _rad_conv_forward(state, previous, x, weight, bias):
    if state.ops.rad_conv:
        return kernel_op("rau_downsample_conv", state.backend, x.device)(x, weight, bias)
    return previous(x, weight, bias)


def set_lora_down_geometry(downsampler, conv, rad_conv):
    """RAD-conv's geometry (``rad_conv``) or the downsampler's for the 3x3 convs beside ``conv`` in ``downsampler``
    (the down projections of a LoRA on it, peft's lora_A, whose output is added to the conv's). They are found by
    either geometry: a deep copy taken while another thread ran a RAD-conv UNet call holds them widened."""
    for m in downsampler.modules():
        if (type(m) is nn.Conv2d and m is not conv and m.kernel_size == (3, 3)
                and (m.stride, m.padding, m.dilation) in (DOWNSAMPLER_GEOMETRY, _RAD_GEOMETRY)):
            m.stride, m.padding, m.dilation = _RAD_GEOMETRY if rad_conv else DOWNSAMPLER_GEOMETRY


def is_plain_upsampler(module) -> bool:
    """An Upsample2D that is exactly nearest-interpolate then a 3x3 conv (padding 1): the fused op's pattern. Not
    one with a forward wrapper set on the instance (as hook libraries set them): diffusers' path runs in it."""
    conv = getattr(module, "conv", None)
    return (
        type(module).__name__ == "Upsample2D" and "forward" not in module.__dict__
        and module.use_conv and not module.use_conv_transpose and module.interpolate and module.norm is None
        and type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
        and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
    )


def _bare_conv(conv):
    """Whether nothing wraps or hooks the conv (no LoRA layer, no offload hook bringing its weights in): only
    then may the fused op read its weights without calling it; otherwise diffusers' interpolate + conv runs."""
    return type(conv) is nn.Conv2d and not is_wrapped(conv)


def install_fused_upsample(upsampler, state):
    """RAU-upsample: the interpolate + conv of a plain Upsample2D run as one upsample_conv op."""
    return override_method(upsampler, "forward", _fused_upsample_forward, state, upsampler)


def _fused_upsample_forward(state, upsampler, previous, hidden_states, output_size=None, *args, **kwargs):
    conv = upsampler.conv
    if args or kwargs or not _bare_conv(conv):
        return previous(hidden_states, output_size, *args, **kwargs)
    upsample_conv = kernel_op("upsample_conv", state.backend, hidden_states.device)
    if output_size is None:
        return upsample_conv(hidden_states, conv.weight, conv.bias, scale_factor=2.0)
    return upsample_conv(hidden_states, conv.weight, conv.bias, size=tuple(output_size))


def _map_sample(output, fn):
    """Apply fn to the sample of a Transformer2DModel output (tuple or output dataclass)."""
    if isinstance(output, tuple):
        return (fn(output[0]),) + tuple(output[1:])
    output.sample = fn(output.sample)
    return output


def install_rad_pool(transformer, state):
    """RAD-pool: after the first (resnet, attention) pair of the down block, 2x2 average pool (ceil mode).

    The hook sits on that pair's attention, so the pooled map is also the block's first skip output.
    """
    return transformer.register_forward_hook(patch(_rad_pool_hook, state)).remove


def _rad_pool_hook(state, module, args, output):
    return _map_sample(output, lambda x: _rad_pool(state, x)) if state.ops.rad_pool else None


def _rad_pool(state, x):
    state.pre_pool_size = tuple(x.shape[-2:])
    return F.avg_pool2d(x, kernel_size=2, ceil_mode=True)


def install_rau_interp(transformer, state):
    """RAU-interp: after the second pair of the matching up block, bicubic resize back to the pre-pool size."""
    return transformer.register_forward_hook(patch(_rau_interp_hook, state)).remove


def _rau_interp_hook(state, module, args, output):
    if not state.ops.rad_pool:
        return None
    return _map_sample(output, lambda x: F.interpolate(x, size=state.pre_pool_size, mode="bicubic"))


def force_upsample_size(unet):
    unet.num_upsamplers += FORCE_UPSAMPLE_SIZE
    return patch(_add_upsamplers, unet, -FORCE_UPSAMPLE_SIZE)


def _add_upsamplers(unet, count):
    unet.num_upsamplers += count


class ResizedResidual:
    """A ControlNet residual that, when the UNet adds it to a feature map, first resizes itself (bicubic)
    to that map's size: RAU-Net shrinks the deep maps the ControlNet (run at the normal sizes) feeds.

    The UNet only adds the residuals (``sample + residual``), which reaches ``__torch_function__``.
    """

    def __init__(self, tensor):
        self.tensor = tensor

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func not in (torch.Tensor.add, torch.add, torch.Tensor.__add__) or len(args) != 2 or kwargs:
            raise TypeError(f"a HiDiffusion-resized ControlNet residual only supports `feature + residual`, got {func}")
        feature, residual = args
        if not isinstance(feature, torch.Tensor) or not isinstance(residual, cls):
            raise TypeError("a HiDiffusion-resized ControlNet residual must be added to a feature map on its right")
        tensor = residual.tensor
        if tensor.shape[-2:] != feature.shape[-2:]:
            tensor = F.interpolate(tensor, size=feature.shape[-2:], mode="bicubic")
        return feature + tensor
