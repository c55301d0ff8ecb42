"""apply_hidiffusion / remove_hidiffusion: patch a diffusers UNet (and its pipeline) with MSW-MSA and RAU-Net.

Everything is an attention processor, a hook, an instance-level method override (the UNet's call, forwards) or
``num_upsamplers``, each recorded with its undo in the UNet's ``_hidiffusion`` state, or the pipeline's class
(swapped per pipeline): remove restores the exact original objects. All checks run before the first change, so a
refused apply leaves the model as it was. Hooks, overrides and undos are ``raunet.patch`` partials or bound methods,
not closures: a deepcopy of the UNet (or pipeline) is patched on its own modules and state.
"""
import copy
import inspect
import sys
import threading
import types
import warnings
import weakref
from dataclasses import dataclass, replace

import torch
from torch import nn

from hidiff_kernels import triton_runs_on

from . import controlnet, raunet, steps
from .ops import BACKENDS
from .processors import (
    PAG_CHUNKS, PerturbedWindowAttnProcessor, WindowAttnProcessor, register_for_layer_skip, scores_skip_hooked,
)
from .schedule import MODEL_TYPES, ActiveOps, active_ops, checkpoint_name, named_model_type

STATE_ATTR = steps.STATE_ATTR
INACTIVE = ActiveOps(rad_conv=False, rad_pool=False)
_PATCHING = threading.RLock()  # one apply or remove at a time, whatever thread asks


@dataclass(frozen=True)
class Layout:
    """The modules HiDiffusion patches in one model family (those of the original implementation)."""

    down_block_types: tuple
    up_block_types: tuple
    text_time: bool  # SDXL's addition_embed_type
    window_blocks: tuple  # BasicTransformerBlocks whose attn1 becomes MSW-MSA
    rad_conv: str | None  # downsampler conv run with stride 4
    rad_pool: str  # attention of the first pair of the pooled down block
    rau_interp: str  # attention of the second pair of the matching up block


_SD15_WINDOWS = tuple(f"down_blocks.0.attentions.{i}.transformer_blocks.0" for i in range(2)) + tuple(
    f"up_blocks.3.attentions.{i}.transformer_blocks.0" for i in range(3))
_SDXL_WINDOWS = tuple(f"down_blocks.1.attentions.{i}.transformer_blocks.{j}" for i in range(2) for j in range(2)) + tuple(
    f"up_blocks.1.attentions.{i}.transformer_blocks.{j}" for i in range(3) for j in range(2))
_SD15 = Layout(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    text_time=False, window_blocks=_SD15_WINDOWS, rad_conv="down_blocks.0.downsamplers.0.conv",
    rad_pool="down_blocks.1.attentions.0", rau_interp="up_blocks.2.attentions.1")
_SDXL = Layout(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    text_time=True, window_blocks=_SDXL_WINDOWS, rad_conv="down_blocks.1.downsamplers.0.conv",
    rad_pool="down_blocks.1.attentions.0", rau_interp="up_blocks.1.attentions.1")
LAYOUTS = {"sd15": _SD15, "sdxl": _SDXL, "sdxl_turbo": replace(_SDXL, rad_conv=None)}


class HiDiffusionState:
    """Per-UNet settings, the per-call schedule, the window-shift generators and the undo list."""

    def __init__(self, model_type, backend, apply_raunet, apply_window_attn, window_shift, seed, inpainting,
                 playground):
        self.model_type = model_type
        self.backend = backend
        self.apply_raunet = apply_raunet
        self.apply_window_attn = apply_window_attn
        self.pinned_phase = window_shift
        self.seed = seed
        self.inpainting = inpainting
        self.playground = playground
        self.bare_generator = torch.Generator().manual_seed(seed)  # UNet driven by hand
        # One generator per pipeline call, restarted from the seed: equal inputs give equal images, even when
        # generations are interrupted or nested (another pipeline called from a callback).
        self.call_generators = weakref.WeakKeyDictionary()
        self.warned_replaced = weakref.WeakKeyDictionary()  # pipeline call (or self) -> replaced sites warned about
        self.window_sites = []  # (attention, its WindowAttnProcessor), in the order their window phases are drawn
        self.pag_sites = []  # (attention, PAG's processor) swapped for the UNet call in progress
        self.retired = False  # removed, or replaced by another apply: its processors run stock attention
        self.in_call = False
        self.ops = INACTIVE  # ActiveOps of the UNet call in progress
        self.previous_ops = INACTIVE  # of the UNet's last call: where they differ, the deep maps change size
        self.pre_pool_size = None
        self.rad_conv_site = None  # (downsampler, its conv) of RAD-conv, for LoRA convs beside the conv
        self.undo = []  # undos of the patches on modules and pipelines, undone last first
        # The UNet's call: the _call_impl before apply, and the undo of its override (which a new apply keeps).
        self.untracked_call = None
        self.call_tracking_undo = []
        # Held for a whole UNet call: the per-call fields above are the UNet's, and threads may share the UNet.
        self.call_lock = threading.RLock()

    def settings(self):
        """What apply_hidiffusion asked for, and derived from the model."""
        return (self.model_type, self.backend, self.apply_raunet, self.apply_window_attn, self.pinned_phase,
                self.seed, self.inpainting, self.playground)

    def replaced_window_sites(self):
        """How many window sites run another processor than theirs (set_attn_processor, ... since apply)."""
        return sum(not _runs_window_processor(attn, processor) for attn, processor in self.window_sites)

    def retire(self):
        """Undo the patches on modules and pipelines; processors of this state brought back later by a snapshot
        of the UNet's processors run stock attention."""
        _undo_all(self.undo)
        if self.rad_conv_site is not None:  # a deep copy taken during a RAD-conv call holds the LoRA convs widened
            raunet.set_lora_down_geometry(*self.rad_conv_site, rad_conv=False)
        self.retired = True

    def __reduce_ex__(self, protocol):
        raise TypeError("a UNet with HiDiffusion applied cannot be pickled (torch.save of the module): save its "
                        "state_dict, or call remove_hidiffusion before pickling")

    def __deepcopy__(self, memo):  # the usual deep copy, which would otherwise go through __reduce_ex__
        copied = memo[id(self)] = object.__new__(HiDiffusionState)
        copied.__dict__.update(copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "call_lock"}, memo))
        copied.call_lock = threading.RLock()
        return copied

    def phase(self, processor):
        """Window phase k in {0..3} of ``processor`` for the UNet call in progress: the pinned int, or the 0-d
        tensor on the UNet's device drawn for it (drawn values reach the kernels without a recompile or CUDA
        graph re-recording per draw; held by the processor, so the blocks that share code under regional
        compilation (``compile_repeated_blocks``) share its graph too)."""
        if self.pinned_phase is not None:
            return self.pinned_phase
        if not self.in_call:
            raise RuntimeError(
                "HiDiffusion window attention ran outside a call of its patched UNet: a UNet compiled before "
                "apply_hidiffusion (apply it before torch.compile), or gradient checkpointing recomputing blocks in "
                "backward (HiDiffusion is for inference: disable gradient checkpointing, or pin window_shift)")
        return processor.phase

    @torch.compiler.disable
    def before_unet(self, unet, args, kwargs):
        """Everything a UNet call needs from outside the UNet: step schedule, window phases, ControlNet residuals.

        Runs eagerly (never traced by torch.compile: it reads the pipeline's state from context variables);
        what it decides reaches the compiled forward as plain attributes that dynamo guards on.
        """
        if len(args) > 2:  # by name, where the residuals (ControlNet, T2I-Adapter) are looked for below
            args, kwargs = (), _by_name(unet, args, kwargs)
        call = steps.pipeline_call()
        by_pipeline = call is not None and steps.explicit_step(unet) is None  # not by hand, from a callback
        net = getattr(call.pipeline, "controlnet", None) if by_pipeline else None
        net_ran = all(kwargs.get(name) is not None for name in controlnet.RESIDUAL_KWARGS)  # its residuals are here
        if (net_ran and net is not None and self.model_type in controlnet.SDXL_MODEL_TYPES
                and not controlnet.runs_schedule(net)):
            raise ValueError("HiDiffusion: this pipeline's ControlNet ran without the SDXL ControlNet schedule "
                             "(it was set after apply_hidiffusion, or HiDiffusion was removed since from another "
                             "pipeline sharing it): call apply_hidiffusion(pipe) again")
        sample = args[0] if args else kwargs["sample"]
        for attn, processor in self.window_sites:
            processor.scores_skip_hooked = scores_skip_hooked(attn)
            if _is_unbound_window_processor(attn.processor):
                attn.set_processor(processor)
            elif type(attn.processor) in PAG_CHUNKS:  # a PAG pipeline perturbs this block: compose, put back after
                self.pag_sites.append((attn, attn.processor))
                attn.processor = PerturbedWindowAttnProcessor(processor, PAG_CHUNKS[type(attn.processor)])
        replaced = self.replaced_window_sites()
        warned_for = call if call is not None else self  # once per pipeline call, or per patch driven by hand
        if replaced and self.warned_replaced.get(warned_for) != replaced:
            _warn_unet_caller(f"HiDiffusion: {replaced} of the {len(self.window_sites)} window-attention processors "
                              "were replaced since apply_hidiffusion: those blocks attend over the whole map. After "
                              "set_attn_processor, fuse_qkv_projections and the like, call apply_hidiffusion again "
                              "to restore MSW-MSA; a pipeline that sets its own processors at every call (LEdits++) "
                              "runs without it.")
        self.warned_replaced[warned_for] = replaced
        self.in_call = True  # ops, phases and pre_pool_size are reset by after_unet, which ends every call
        kwargs = controlnet.unet_controlnet_kwargs(kwargs)
        if self.apply_raunet:  # before the window phases: a refused call draws none from its generation's generator
            self.ops = self.raunet_ops(unet, sample, args[1] if len(args) > 1 else kwargs.get("timestep"), kwargs)
            if self.ops != self.previous_ops:
                _reset_stateful_hooks(unet)
                self.previous_ops = self.ops
        if self.pinned_phase is None:
            # A call under denoising_step inside a pipeline call (from a callback) is the user's, not the generation's
            if not by_pipeline:
                generator = self.bare_generator
            elif call in self.call_generators:
                generator = self.call_generators[call]
            else:
                generator = self.call_generators[call] = torch.Generator().manual_seed(self.seed)
            phases = torch.randint(4, (len(self.window_sites),), generator=generator)
            # Pinned memory: the copy does not make the host wait for the work queued on the GPU.
            phases = (phases.pin_memory().to(sample.device, non_blocking=True) if sample.is_cuda
                      else phases.to(sample.device))
            for (_, processor), phase in zip(self.window_sites, phases.unbind()):
                processor.phase = phase
        return args, kwargs

    def raunet_ops(self, unet, sample, timestep, kwargs):
        """What RAU-Net runs in this UNet call, from its denoising step; refuses T2I-Adapter residuals it would
        shrink, and sets the RAD-conv LoRA's geometry to match."""
        step, n, step_call = steps.current_step(unet, timestep)  # step_call is None under denoising_step
        ops = active_ops(self.model_type, sample.shape[-2], sample.shape[-1], step, n,
                         controlnet=step_call is not None and step_call.controlnet_text_to_image,
                         inpainting=self.inpainting, playground=self.playground)
        if (ops.rad_conv or ops.rad_pool) and _has_adapter_residuals(kwargs):
            raise ValueError(T2I_ADAPTER_REFUSAL)
        if self.rad_conv_site is not None:  # every call sets their geometry: a deep copy may hold them widened
            raunet.set_lora_down_geometry(*self.rad_conv_site, ops.rad_conv)
        return ops

    @torch.compiler.disable
    def after_unet(self):
        if self.rad_conv_site is not None:
            raunet.set_lora_down_geometry(*self.rad_conv_site, rad_conv=False)
        for attn, pag_processor in self.pag_sites:
            attn.processor = pag_processor
        self.pag_sites = []
        self.in_call = False
        self.ops = INACTIVE
        for _, processor in self.window_sites:
            processor.phase = None
            processor.scores_skip_hooked = False
        self.pre_pool_size = None


@torch.compiler.disable(recursive=False)
def _tracked_call(unet, *args, **kwargs):
    """A call of the patched UNet: HiDiffusionState.before_unet prepares it and after_unet ends it, eagerly around
    the UNet's own ``_call_impl`` (hooks and forward).

    Bound to the instance as ``_call_impl`` (what ``unet(...)`` and ``unet.compile()`` run) and as ``__call__``
    (what ``torch.compile(unet)`` wraps). Compiling skips this frame but not the ones it calls
    (recursive=False), so the forward compiles and the preparation stays outside it. The UNet's class is left
    as it is: diffusers' ``from_pipe`` takes only components of the exact class its pipeline names.
    """
    state = unet.__dict__.get(STATE_ATTR)
    if state is None:  # removed since torch.compile took this call
        return unet._call_impl(*args, **kwargs)
    with state.call_lock:
        if unet.__dict__.get(STATE_ATTR) is state:
            try:
                args, kwargs = state.before_unet(unet, args, kwargs)
                return state.untracked_call(*args, **kwargs)
            finally:
                state.after_unet()
    return _tracked_call(unet, *args, **kwargs)  # removed or applied anew while this call waited


def apply_hidiffusion(pipe_or_unet, *, backend="auto", apply_raunet=True, apply_window_attn=True,
                      window_shift=None, generator=None, model_type=None):
    """Patch a diffusers pipeline (with ``.unet``) or a UNet2DConditionModel with HiDiffusion; returns it.

    backend: "triton" (fused kernels), "torch" (plain PyTorch: the reference convs, the window-gather
    MSW-MSA) or "auto" (Triton for CUDA tensors). window_shift: None draws the window phase k in {0..3} per
    block call from the adapter's own generator (seeded by ``generator``, an int or a torch.Generator,
    restarted for every pipeline call); an int pins k. model_type: "sd15" (also SD2.x), "sdxl",
    "sdxl_turbo", or None to detect (SDXL-Turbo only by "turbo" in the checkpoint's name: ``checkpoint_name``).

    Pipelines may share the UNet (``from_pipe``) and call it from several threads. Applying to a UNet already
    patched with the same settings only adds the pipeline; other settings patch the UNet anew, for every
    pipeline sharing it (after any UNet call in progress). Apply before other threads call the UNet: a call of the
    unpatched UNet in progress cannot be waited for.
    """
    pipe, unet = _split(pipe_or_unet)
    model_type = _resolve_model_type(pipe, unet, model_type)
    _check_backend(pipe, unet, backend)
    if window_shift is not None and (type(window_shift) is not int or not 0 <= window_shift <= 3):
        raise ValueError(f"window_shift must be None or an int in 0..3, got {window_shift!r}")
    for name, value in (("apply_raunet", apply_raunet), ("apply_window_attn", apply_window_attn)):
        if type(value) is not bool:
            raise TypeError(f"{name} must be True or False, got {value!r}")
    seed = _seed_of(generator)
    layout = LAYOUTS[model_type]
    _check_layout(unet, layout, model_type, apply_window_attn)
    controlnet.check_sdxl_controlnet(pipe, model_type)
    if apply_raunet and getattr(pipe, "adapter", None) is not None:
        raise ValueError(T2I_ADAPTER_REFUSAL)
    # By name: the deprecated pipeline's import path has moved between diffusers releases.
    if apply_raunet and any(c.__name__ == "StableDiffusionAttendAndExcitePipeline" for c in type(pipe).__mro__):
        raise ValueError(ATTEND_AND_EXCITE_REFUSAL)

    # SDXL's aggressive mode is off for inpainting and Playground models, which the original knows by their
    # checkpoint's name (not by the pipeline: SDXL base in an inpainting pipeline runs it); an inpainting UNet
    # (9 input channels) is known by its architecture too.
    name = checkpoint_name(_name_or_path(pipe, unet))
    state = HiDiffusionState(model_type, backend, apply_raunet, apply_window_attn, window_shift, seed,
                             inpainting="inpainting" in name or unet.config.in_channels == 9,
                             playground="playground" in name)
    with _PATCHING, state.call_lock:  # a call in another thread that finds the new state waits for its install
        current = unet.__dict__.get(STATE_ATTR)
        try:
            if current is not None and current.settings() == state.settings() and not current.replaced_window_sites():
                # Patched as asked already (applied twice, or through another pipeline sharing the UNet): the UNet
                # stays as it is, so its generations in progress in other threads go on undisturbed.
                current.bare_generator = state.bare_generator  # the window shifts of bare UNet calls restart
                state, pipes = current, [pipe]
            else:
                # Other pipelines sharing the UNet keep the ControlNet schedule their own apply gave them.
                pipes = [p for p, net in controlnet.scheduled_pipelines(current.undo if current else [])
                         if getattr(p, "controlnet", None) is net]
                pipes.append(pipe)
                _replace_state(unet, current, state)
                _install(unet, layout, state)
            _schedule_controlnets(state, pipes)
        except BaseException:
            # HiDiffusion off this UNet and pipeline, not the schedule another UNet's apply set on a shared ControlNet
            _remove(pipe_or_unet, unschedule_shared=False)
            raise
    if pipe is not None:
        # Tracking is per pipeline, not part of the UNet's state: pipelines sharing the UNet stay tracked
        # when another one re-applies.
        pipe.__class__ = steps.tracking_class(type(pipe))
    return pipe_or_unet


def remove_hidiffusion(pipe_or_unet):
    """Undo apply_hidiffusion on a pipeline or UNet (no-op when not patched), compiled since or not; returns it.

    A pipeline's ControlNet loses its SDXL ControlNet schedule even where it shares it with pipelines of other
    patched UNets (they then ask to be applied again)."""
    return _remove(pipe_or_unet, unschedule_shared=True)


def _remove(pipe_or_unet, unschedule_shared):
    pipe, unet = _split(pipe_or_unet, compiled_ok=True)
    with _PATCHING:
        state = unet.__dict__.get(STATE_ATTR)
        if state is not None:
            with state.call_lock:  # a UNet call in progress in another thread ends first
                state.retire()
                _undo_all(state.call_tracking_undo)  # last: calls that begin meanwhile wait for the lock
                delattr(unet, STATE_ATTR)
        if pipe is not None:
            pipe.__class__ = steps.untracked_class(type(pipe))
            if unschedule_shared and getattr(pipe, "controlnet", None) is not None:
                controlnet.unschedule(pipe.controlnet)
    return pipe_or_unet


def _undo_all(undo):
    while undo:
        undo.pop()()


def _replace_state(unet, current, state):
    """Make ``state`` the UNet's, its call tracked, with ``current``'s patches (if any) undone.

    A UNet call that begins meanwhile, in another thread, must not run half patched: the call override is
    kept from ``current`` rather than undone and set again (a call in that gap would run unguarded), and the
    caller holds ``state.call_lock`` until the install is done.
    """
    if current is None:
        state.untracked_call = unet._call_impl
        # The state first: a call that finds the override must find the state too (and wait for the install).
        setattr(unet, STATE_ATTR, state)
        # Bound methods (a deepcopy rebinds them to the copy), not partials: torch.compile must see a function frame.
        state.call_tracking_undo = [raunet.set_attribute(unet, name, types.MethodType(_tracked_call, unet))
                                    for name in ("_call_impl", "__call__")]
        return
    with current.call_lock:  # a UNet call in progress ends first
        current.retire()
        state.untracked_call, state.call_tracking_undo = current.untracked_call, current.call_tracking_undo
        setattr(unet, STATE_ATTR, state)


def _install(unet, layout, state):
    """Patch the UNet's modules for ``state`` (its call is tracked already)."""
    modules = dict(unet.named_modules())
    undo = state.undo
    if state.apply_window_attn:
        processors_by_transformer = {}
        for name in layout.window_blocks:
            attn = modules[name].attn1
            processor = WindowAttnProcessor(state)
            state.window_sites.append((attn, processor))
            undo.append(raunet.patch(_restore_processor, unet, f"{name}.attn1.processor", attn, attn.processor,
                                     processor))
            attn.set_processor(processor)
            processors_by_transformer.setdefault(_transformer_of(name), []).append(processor)
        for transformer_name, processors in processors_by_transformer.items():
            undo.append(modules[transformer_name].register_forward_pre_hook(
                raunet.patch(_record_feature_size, processors), with_kwargs=True).remove)
        undo.append(raunet.override_method(unet, "set_default_attn_processor", _set_default_attn_processor, unet))
        register_for_layer_skip()
    if state.apply_raunet:
        if layout.rad_conv is not None:
            conv = _lora_base(modules[layout.rad_conv])
            undo.append(raunet.install_rad_conv(conv, state))
            state.rad_conv_site = (modules[layout.rad_conv.rsplit(".", 1)[0]], conv)
        undo.append(raunet.install_rad_pool(modules[layout.rad_pool], state))
        undo.append(raunet.install_rau_interp(modules[layout.rau_interp], state))
        undo.append(raunet.force_upsample_size(unet))
        for module in unet.modules():
            if raunet.is_plain_upsampler(module):
                undo.append(raunet.install_fused_upsample(module, state))


def _set_default_attn_processor(unet, diffusers_method):
    """diffusers' set_default_attn_processor refuses processors of classes it does not list, as the window
    processors are: beside them only its cross-attention ones, it sets AttnProcessor everywhere, as diffusers would."""
    from diffusers.models.attention_processor import CROSS_ATTENTION_PROCESSORS, AttnProcessor

    if all(isinstance(p, WindowAttnProcessor) or type(p) in CROSS_ATTENTION_PROCESSORS
           for p in unet.attn_processors.values()):
        unet.set_attn_processor(AttnProcessor())
    else:
        diffusers_method()  # its own refusal


def _schedule_controlnets(state, pipes):
    """The original's SDXL ControlNet schedule (with or without RAU-Net) on each pipeline's ControlNet, once per
    ControlNet: from_pipe pipelines share theirs, and so may pipelines of other patched UNets (the schedule takes
    its step from the pipeline call that runs the ControlNet)."""
    if state.model_type not in controlnet.SDXL_MODEL_TYPES:
        return
    for pipe in pipes:
        net = getattr(pipe, "controlnet", None)
        if net is not None and not controlnet.runs_schedule(net):
            state.undo.append(controlnet.install_sdxl_controlnet(pipe))


def _lora_base(conv):
    """The conv a LoRA (peft) layer wraps, or the conv itself."""
    return getattr(conv, "base_layer", conv)


def _transformer_of(block_name):
    """The Transformer2DModel holding a transformer block: 'x.attentions.0.transformer_blocks.1' -> 'x.attentions.0'."""
    return block_name.rsplit(".transformer_blocks.", 1)[0]


T2I_ADAPTER_REFUSAL = (
    "HiDiffusion's RAU-Net shrinks the feature maps that T2I-Adapter residuals are added to, so it cannot run "
    "with a T2I-Adapter; apply_hidiffusion(..., apply_raunet=False) runs MSW-MSA alone with one")
# Attend-and-Excite also sets its own attention processors at every call, so MSW-MSA never runs with it either.
ATTEND_AND_EXCITE_REFUSAL = (
    "HiDiffusion's RAU-Net changes the sizes of the attention maps that Attend-and-Excite aggregates (attn_res), "
    "so it cannot run with that pipeline")


def _reset_stateful_hooks(unet):
    """Reset the state of diffusers' stateful hooks on the UNet's modules (Pyramid Attention Broadcast's cached
    attention outputs): what they cached was computed at the deep maps' other size."""
    for module in unet.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and hasattr(registry, "reset_stateful_hooks"):
            registry.reset_stateful_hooks()


def _by_name(unet, args, kwargs):
    """A UNet call's arguments all by name (bound to the UNet class's forward: a TypeError as the call would)."""
    bound = inspect.signature(type(unet).forward).bind(unet, *args, **kwargs)
    return dict(list(bound.arguments.items())[1:])  # without self


def _has_adapter_residuals(kwargs):
    """Whether a UNet call carries T2I-Adapter residuals (diffusers also takes them as down residuals alone)."""
    down, mid = (kwargs.get(name) for name in controlnet.RESIDUAL_KWARGS)
    return kwargs.get("down_intrablock_additional_residuals") is not None or (down is not None and mid is None)


def _restore_processor(unet, key, attn, original, ours):
    """Undo of a window site; ``key`` names its processor in ``unet.attn_processors``."""
    if _runs_window_processor(attn, ours):  # else the user has set another processor since: theirs stays
        attn.set_processor(original)
    # diffusers' fuse_qkv_projections keeps the processors it replaces, for unfuse_qkv_projections to set back
    snapshot = getattr(unet, "original_attn_processors", None)
    if isinstance(snapshot, dict) and key in snapshot:
        kept = snapshot[key]
        if kept is ours or _is_unbound_window_processor(kept):
            snapshot[key] = original


def _runs_window_processor(attn, ours):
    """Whether ``attn`` runs our processor ``ours`` (alone or composed with PAG), or an unbound copy of it, which the
    next UNet call rebinds."""
    processor = attn.processor
    return (processor is ours or _is_unbound_window_processor(processor)
            or isinstance(processor, PerturbedWindowAttnProcessor) and processor.window_processor is ours)


def _is_unbound_window_processor(processor):
    """What diffusers' IP-Adapter loaders leave in place of our processor: an instance made from its class alone."""
    return type(processor) is WindowAttnProcessor and processor.state is None


def _warn_unet_caller(message):
    """A UserWarning at the line that called the UNet (the first frame outside torch and this module), out of
    reach of Python's once-per-line memory, which would silence it for every later patch and pipeline call."""
    frame = sys._getframe(1)
    while frame.f_back is not None and (frame.f_globals.get("__name__") == __name__
                                        or frame.f_globals.get("__name__", "").partition(".")[0] == "torch"):
        frame = frame.f_back
    warnings.warn_explicit(message, UserWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__") or "<string>", registry=None)


def _record_feature_size(processors, module, args, kwargs):
    """Transformer2DModel pre-hook: the [B, C, h, w] input gives the token map size of its blocks."""
    hidden_states = args[0] if args else kwargs["hidden_states"]
    for processor in processors:
        processor.feature_size = tuple(hidden_states.shape[-2:])


def _split(pipe_or_unet, compiled_ok=False):
    """(pipeline or None, UNet2DConditionModel), or TypeError.

    torch.compile(unet) and unet.compile() bind the UNet's call when they run, so applying after compiling
    would leave HiDiffusion out of that call: a compiled UNet is refused unless it is patched (compiled after
    apply, which binds the patched call: applying again, or to another pipeline sharing it, is fine) or
    ``compiled_ok`` (removing).
    """
    from diffusers import UNet2DConditionModel

    is_pipeline = not isinstance(steps.uncompiled(pipe_or_unet), UNet2DConditionModel)
    unet = getattr(pipe_or_unet, "unet", None) if is_pipeline else pipe_or_unet
    compiled = isinstance(getattr(unet, "_orig_mod", None), UNet2DConditionModel)
    unet = unet._orig_mod if compiled else unet
    if not isinstance(unet, UNet2DConditionModel) or (is_pipeline and not callable(pipe_or_unet)):
        got = type(pipe_or_unet).__name__
        if is_pipeline and unet is not None and not isinstance(unet, UNet2DConditionModel):
            got += f" (its .unet: {type(unet).__name__})"
        raise TypeError(
            f"HiDiffusion needs a diffusers UNet2DConditionModel or a pipeline with one as `.unet`, got {got}")
    if not compiled_ok and STATE_ATTR not in unet.__dict__:
        if compiled:
            raise TypeError("this UNet is already compiled (torch.compile): apply HiDiffusion first, then compile")
        if unet._compiled_call_impl is not None:
            raise TypeError("this UNet is already compiled (unet.compile()): apply HiDiffusion first, then compile")
    return (pipe_or_unet if is_pipeline else None), unet


def _name_or_path(pipe, unet):
    return str(getattr(pipe, "name_or_path", None) or getattr(unet.config, "_name_or_path", None) or "")


def _detected_family(config):
    """'sd15' or 'sdxl' from a UNet config's block layout and addition_embed_type, else None."""
    for family in ("sd15", "sdxl"):
        layout = LAYOUTS[family]
        if (tuple(config.get("down_block_types") or ()) == layout.down_block_types
                and tuple(config.get("up_block_types") or ()) == layout.up_block_types
                and (config.get("addition_embed_type") == "text_time") == layout.text_time):
            return family
    return None


def detected_model_type(config, name_or_path=""):
    """The model type apply_hidiffusion takes, when not given one, for a UNet of this config (the UNet's
    ``config`` or its config.json as a dict): its family, SDXL-Turbo for an SDXL UNet with "turbo" in the
    checkpoint's name (``checkpoint_name(name_or_path)``). ValueError for a UNet HiDiffusion does not support."""
    from diffusers import UNet2DConditionModel

    # A config.json may leave out what equals UNet2DConditionModel's defaults: from_pretrained fills them in.
    defaults = {p.name: p.default for p in inspect.signature(UNet2DConditionModel.__init__).parameters.values()
                if p.default is not inspect.Parameter.empty}
    config = {**defaults, **config}
    family = _detected_family(config)
    if family is None:
        raise ValueError(
            "HiDiffusion supports the SD1.5/SD2.x and SDXL UNet layouts; this UNet has down blocks "
            f"{tuple(config.get('down_block_types') or ())}, up blocks {tuple(config.get('up_block_types') or ())}, "
            f"addition_embed_type {config.get('addition_embed_type')!r}"
        )
    return named_model_type(family, name_or_path)


def _resolve_model_type(pipe, unet, model_type):
    if model_type is not None and model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {MODEL_TYPES} or None")
    detected = detected_model_type(unet.config, _name_or_path(pipe, unet))
    if model_type is None:
        return detected
    if (model_type == "sd15") != (detected == "sd15"):
        family = "sd15" if detected == "sd15" else "sdxl"
        raise ValueError(f"model_type {model_type!r} does not match this UNet's {family} architecture")
    return model_type


def _check_backend(pipe, unet, backend):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "triton":
        device = getattr(pipe, "_execution_device", unet.device)  # offloaded pipelines run elsewhere
        if not triton_runs_on(device):
            raise ValueError(
                f"backend='triton' runs on CUDA, or on CPU only with TRITON_INTERPRET=1 set before hidiff is imported; "
                f"the model runs on {device}. "
                "Use backend='torch' or 'auto'."
            )


def _seed_of(generator):
    if generator is None:
        return 0
    if isinstance(generator, torch.Generator):
        return generator.initial_seed()
    if type(generator) is int:
        if not -2**63 <= generator < 2**64:
            raise ValueError(f"generator: int seed {generator} is outside torch's seed range -2**63 .. 2**64 - 1")
        return generator
    raise TypeError(f"generator must be None, an int seed or a torch.Generator, got {type(generator).__name__}")


def _check_layout(unet, layout, model_type, apply_window_attn):
    """Every module HiDiffusion touches exists with the expected type and settings."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    modules = dict(unet.named_modules())

    def require(name, cls):
        if not isinstance(modules.get(name), cls):
            raise ValueError(f"{model_type} UNet layout mismatch: expected a {cls.__name__} at {name!r}")
        return modules[name]

    if apply_window_attn:
        for name in layout.window_blocks:
            require(_transformer_of(name), Transformer2DModel)
            attn = require(name, BasicTransformerBlock).attn1
            if not isinstance(attn, Attention) or attn.is_cross_attention or modules[name].only_cross_attention:
                raise ValueError(f"{name}.attn1 is not a plain self-attention")
            if attn.group_norm is not None or attn.spatial_norm is not None:
                raise ValueError(f"{name}.attn1 has a group/spatial norm, which window attention does not support")
            if isinstance(attn.processor, nn.Module):
                raise ValueError(f"{name}.attn1 uses a processor with weights ({type(attn.processor).__name__}); "
                                 "window attention would drop it")
    require(layout.rad_pool, Transformer2DModel)
    require(layout.rau_interp, Transformer2DModel)
    if layout.rad_conv is not None:
        conv = _lora_base(modules.get(layout.rad_conv))
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{model_type} UNet layout mismatch: expected a Conv2d at {layout.rad_conv!r}")
        if (conv.kernel_size, (conv.stride, conv.padding, conv.dilation), conv.groups) != (
                (3, 3), raunet.DOWNSAMPLER_GEOMETRY, 1):
            raise ValueError(f"{layout.rad_conv} is not a 3x3 stride-2 downsampler conv")
