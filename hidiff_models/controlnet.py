"""SDXL ControlNet pipelines as the original HiDiffusion runs them, and ControlNet residuals for the UNet call.

The original (hidiffusion 0.1.10) replaces the ``__call__`` of every pipeline with a ControlNet by its own
SDXL ControlNet loop. Within it, at 0-based step ``i`` of the ``n`` steps run:

- ``i < 0.6 * n``: the ControlNet runs on its latent input nearest-resized so that the longer side matches a
  128-latent base (``controlnet_input_size``) and on the conditioning image(s) nearest-resized to 8x that;
  the UNet adds the (smaller or larger) residuals after a bicubic resize to its own feature maps.
- otherwise: the ControlNet does not run and the UNet gets no residuals.

Here the same happens without touching the pipeline's code: an instance-level forward override on
``pipe.controlnet`` resizes its inputs, or returns ``NO_RESIDUAL`` markers instead of running, and the
UNet's pre-call step (``unet_controlnet_kwargs``) turns the markers into ``None`` residuals and wraps real
residuals in ``raunet.ResizedResidual``. The step comes from the pipeline's scheduler, like RAU-Net's.
"""
import copy
import inspect
import sys

import torch
import torch.nn.functional as F

from . import raunet, steps

SDXL_MODEL_TYPES = ("sdxl", "sdxl_turbo")
# The ControlNet runs for the steps i < CONTROLNET_STEPS_RATIO * n (float product, as the original's).
CONTROLNET_STEPS_RATIO = 0.6
# Latent size the ControlNet's input is resized to fit (longer side first): SDXL's native 1024 px.
BASE_LATENT_SIZE = (128, 128)
RESIDUAL_KWARGS = ("down_block_additional_residuals", "mid_block_additional_residual")
# ControlNet classes whose forward takes (sample, timestep, ..., controlnet_cond, ...) and returns
# (down residuals, mid residual); matched by name along the MRO (their modules moved between diffusers versions).
_SINGLE = ("ControlNetModel", "ControlNetUnionModel")
_MULTI = ("MultiControlNetModel", "MultiControlNetUnionModel")


def controlnet_runs(step: int, n: int) -> bool:
    """Whether the ControlNet runs at 0-based ``step`` of ``n`` (the original's ``i < 0.6 * n``)."""
    return step < CONTROLNET_STEPS_RATIO * n


def controlnet_input_size(height: int, width: int) -> tuple:
    """Latent size the ControlNet runs at for a ``height x width`` latent: the original's rule, float for float
    (the longer side scaled to the 128 base, both sides then rounded down to multiples of 8)."""
    base_h, base_w = BASE_LATENT_SIZE
    factor = max(height / base_h, width / base_w)
    size = (int(height // factor) // 8 * 8, int(width // factor) // 8 * 8)
    if min(size) == 0:
        raise ValueError(f"HiDiffusion: a {height}x{width} latent is too elongated for the SDXL ControlNet "
                         f"schedule, which runs the ControlNet at {size[0]}x{size[1]} for it (the longer side scaled "
                         f"to {base_h}, both rounded down to multiples of 8): keep the sides within 16:1, or run "
                         "this size without HiDiffusion (remove_hidiffusion(pipe))")
    return size


class NoResidual:
    """Marker returned by a skipped ControlNet in place of each residual: "the UNet gets no residuals".

    Survives what diffusers' SDXL ControlNet pipelines do to residuals between the ControlNet and the UNet
    (guess mode's ``torch.cat([torch.zeros_like(d), d])``); anything else is a TypeError.
    """

    def __repr__(self):
        return "NO_RESIDUAL"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.zeros_like and len(args) == 1 and isinstance(args[0], cls) and not kwargs:
            return args[0]
        if func in (torch.cat, torch.concat, torch.concatenate):
            tensors = args[0] if args else kwargs.get("tensors")
            if tensors is not None and len(tensors) and all(isinstance(t, cls) for t in tensors):
                return tensors[0]
        raise TypeError(
            f"a ControlNet skipped by HiDiffusion (steps >= {CONTROLNET_STEPS_RATIO} n of an SDXL pipeline) returns "
            f"NO_RESIDUAL markers, which only support torch.zeros_like and torch.cat among themselves, got {func}"
        )


NO_RESIDUAL = NoResidual()


def unet_controlnet_kwargs(kwargs: dict) -> dict:
    """The UNet call's kwargs as the patched UNet must see them: NO_RESIDUAL markers -> both residual kwargs
    None; real ControlNet residuals -> wrapped in raunet.ResizedResidual (bicubic-resized to the UNet's maps
    when added); anything else unchanged."""
    down, mid = kwargs.get(RESIDUAL_KWARGS[0]), kwargs.get(RESIDUAL_KWARGS[1])
    down_markers = [isinstance(r, NoResidual) for r in down] if down is not None else []
    if isinstance(mid, NoResidual) or any(down_markers):
        if not (isinstance(mid, NoResidual) and down_markers and all(down_markers)):
            raise TypeError("HiDiffusion: the UNet got ControlNet residuals mixing NO_RESIDUAL markers and tensors")
        return dict(kwargs, **{name: None for name in RESIDUAL_KWARGS})
    if down is not None and mid is not None:
        return dict(kwargs, down_block_additional_residuals=tuple(raunet.ResizedResidual(r) for r in down),
                    mid_block_additional_residual=raunet.ResizedResidual(mid))
    return kwargs


def _class_names(module):
    return {cls.__name__ for cls in type(module).__mro__}


def check_sdxl_controlnet(pipe, model_type):
    """Refuse (ValueError) a pipeline whose ControlNet install_sdxl_controlnet cannot patch; no change."""
    controlnet = getattr(pipe, "controlnet", None)
    if model_type not in SDXL_MODEL_TYPES or controlnet is None:
        return
    model = steps.uncompiled(controlnet)
    if not _class_names(model) & set(_SINGLE + _MULTI):
        raise ValueError(f"HiDiffusion's SDXL ControlNet schedule supports {_SINGLE + _MULTI}; this pipeline's "
                         f"controlnet is a {type(model).__name__}")


def _resize_images(cond, size):
    """Nearest-resize every image tensor in a conditioning input (a tensor, or lists of them)."""
    if isinstance(cond, torch.Tensor):
        return F.interpolate(cond, size)
    if isinstance(cond, (list, tuple)):
        return type(cond)(_resize_images(c, size) for c in cond)
    return cond


def _no_residuals(model, multi, return_dict):
    """What ``model``'s forward returns, with a NO_RESIDUAL marker for each residual."""
    single = model.nets[0] if multi else model
    down = (NO_RESIDUAL,) * len(single.controlnet_down_blocks)
    if return_dict and not multi:  # Multi* models always return a tuple
        import diffusers

        output_class = sys.modules[diffusers.ControlNetModel.__module__].ControlNetOutput
        return output_class(down_block_res_samples=down, mid_block_res_sample=NO_RESIDUAL)
    return down, NO_RESIDUAL


def _replace(signature, args, kwargs, name, fn):
    """Apply fn to argument ``name`` of a call, positional or keyword, in place."""
    if name in kwargs:
        kwargs[name] = fn(kwargs[name])
    else:
        index = list(signature.parameters).index(name)
        args[index] = fn(args[index])


def install_sdxl_controlnet(pipe):
    """The original's SDXL ControlNet schedule on ``pipe.controlnet``; returns the undo.

    For pipelines of an SDXL-type UNet with a ControlNet (adapter._schedule_controlnets). During a call of a
    pipeline whose UNet is patched (or inside a ``denoising_step`` block of a patched UNet), the ControlNet runs on
    resized inputs for ``step < 0.6 n`` and otherwise returns NO_RESIDUAL markers without running; the UNet's
    pre-call step must apply ``unet_controlnet_kwargs``. For an unpatched UNet it runs as without HiDiffusion
    (steps.controlnet_step). The override holds no UNet: pipelines of several patched UNets may share the
    ControlNet. apply_hidiffusion has checked the ControlNet's class (check_sdxl_controlnet) before any change.
    """
    controlnet = pipe.controlnet
    model = steps.uncompiled(controlnet)
    multi = bool(_class_names(model) & set(_MULTI))
    # The signature of the ControlNet's own forward, read before the override takes the place of it.
    override = raunet.patch(_scheduled_controlnet_forward, model, multi, inspect.signature(model.forward),
                            controlnet.forward)
    controlnet.forward = override
    return _PipelineUndo(pipe, controlnet, override)


def _schedule_site(module):
    """(attribute, override) where ``module`` holds a schedule override: its own forward, or the forward that an
    accelerate hook set since wraps (its _old_forward, as offload hooks set after apply keep it); or None."""
    for name in ("forward", "_old_forward"):
        override = module.__dict__.get(name)
        if getattr(override, "func", None) is _scheduled_controlnet_forward:
            return name, override
    return None


def unschedule(net, override=None):
    """Take the SDXL ControlNet schedule off ControlNet ``net`` (compiled or not, hooked or not): ``override``, or
    whichever apply set it (remove_hidiffusion of any pipeline sharing the ControlNet)."""
    for module in (net, steps.uncompiled(net)):
        site = _schedule_site(module)
        if site is None or override not in (None, site[1]):
            continue
        name, found = site
        previous = found.args[-1]
        class_forward = getattr(previous, "__self__", None) is module and previous.__func__ is type(module).forward
        if name == "forward" and class_forward:
            del module.forward  # the class's own again
        else:
            setattr(module, name, previous)


def scheduled_pipelines(undo):
    """(pipeline, the ControlNet patched) of each install_sdxl_controlnet among the undo callables ``undo``."""
    return [(u.pipe, u.controlnet) for u in undo if isinstance(u, _PipelineUndo)]


def runs_schedule(net):
    """Whether ControlNet ``net`` (compiled before or after the patch, hooked or not) runs the SDXL ControlNet
    schedule."""
    return any(_schedule_site(m) for m in (net, steps.uncompiled(net)))


def _nothing_to_undo():
    pass


class _PipelineUndo:
    """The undo of a patch on a pipeline's ControlNet, kept in its UNet's state. A deepcopy of the pipeline
    copies it along; a deepcopy of the UNet alone leaves it, and the ControlNet, with the pipeline."""

    def __init__(self, pipe, controlnet, override):
        self.pipe = pipe
        self.controlnet = controlnet
        self.override = override

    def __call__(self):
        unschedule(self.controlnet, self.override)  # a no-op where remove_hidiffusion took it off already

    def __deepcopy__(self, memo):
        if id(self.pipe) not in memo:  # copy.deepcopy registers an object in memo before copying its contents
            return _nothing_to_undo
        return _PipelineUndo(*copy.deepcopy((self.pipe, self.controlnet, self.override), memo))


def _scheduled_controlnet_forward(model, multi, signature, previous, *args, **kwargs):
    arguments = signature.bind(*args, **kwargs).arguments
    step = steps.controlnet_step(arguments["timestep"])
    if step is None:  # it feeds an unpatched UNet (set after apply, or HiDiffusion removed): as without HiDiffusion
        return previous(*args, **kwargs)
    if not controlnet_runs(*step):
        return _no_residuals(model, multi, arguments.get("return_dict", signature.parameters["return_dict"].default))
    size = controlnet_input_size(*arguments["sample"].shape[-2:])
    # Replaced where the caller put them: diffusers' decorators read some arguments from kwargs only.
    args, kwargs = list(args), dict(kwargs)
    _replace(signature, args, kwargs, "sample", lambda sample: F.interpolate(sample, size))
    _replace(signature, args, kwargs, "controlnet_cond", lambda cond: _resize_images(cond, (size[0] * 8, size[1] * 8)))
    return previous(*args, **kwargs)
