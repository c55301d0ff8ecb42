"""Where a UNet call sits in the denoising loop: (step, n), read from the pipeline's scheduler or given explicitly.

Nothing here counts calls: an interrupted generation, an extra UNet call, or two pipelines sharing one UNet
cannot shift the schedule. A patched pipeline's ``__call__`` publishes itself in a context variable for the
duration of the call; the patched UNet's ``__call__`` reads the scheduler of that pipeline (eagerly, outside
any torch.compile'd forward).
"""
import contextlib
import contextvars
import functools
import inspect
import warnings
from dataclasses import dataclass

import torch

STATE_ATTR = "_hidiffusion"  # a patched UNet's attribute holding its HiDiffusion state (adapter.py)
_explicit_steps = contextvars.ContextVar("hidiff_explicit_steps", default=())
_pipeline_call = contextvars.ContextVar("hidiff_pipeline_call", default=None)


@dataclass(eq=False)
class PipelineCall:
    """One call of a patched pipeline; a fresh object per call, so the UNet can tell generations apart."""

    pipeline: object
    controlnet_text_to_image: bool
    denoising_end: object  # the call's argument (SDXL pipelines): where the run stops
    blocks_before: int  # denoising_step blocks open when the call began: not the call's
    # Where the run may start in the scheduler's timesteps, where neither _num_timesteps nor begin_index tells (no n
    # published, or a denoising_end cut): found at the call's first UNet (or ControlNet) call; two starts only
    # where that call's timestep is one PNDM runs twice in a row, until its next step tells which (_run_span)
    starts: tuple = ()
    end: int | None = None  # where a denoising_end cut ends it: found once (a device sync)


@contextlib.contextmanager
def denoising_step(unet, step: int, num_steps: int):
    """Run ``unet`` (or ``pipe.unet``) calls inside this block as 0-based ``step`` of ``num_steps``.

    For a patched UNet (and the SDXL ControlNet feeding it) driven by hand: outside a pipeline call, or from
    one's callback.
    """
    unet = uncompiled(getattr(unet, "unet", unet))
    for name, value in (("step", step), ("num_steps", num_steps)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"denoising_step: {name} must be an int, got {value!r}")
    if not 0 <= step < num_steps:
        raise ValueError(f"denoising_step: need 0 <= step < num_steps, got step={step}, num_steps={num_steps}")
    token = _explicit_steps.set(_explicit_steps.get() + ((unet, step, num_steps),))
    try:
        yield
    finally:
        _explicit_steps.reset(token)


def pipeline_call():
    """The PipelineCall in progress, or None."""
    return _pipeline_call.get()


def explicit_step(unet):
    """(step, n) of the innermost denoising_step block over ``unet``'s calls, or None."""
    for owner, step, n in reversed(_explicit_steps.get()):
        if owner is unet:
            return step, n
    return None


def uncompiled(module):
    """The module a torch.compile wrapper holds (its calls reach it), or ``module`` itself."""
    return getattr(module, "_orig_mod", module)


def is_patched(unet):
    """Whether HiDiffusion is applied to ``unet`` (compiled by torch.compile or not)."""
    return STATE_ATTR in getattr(uncompiled(unet), "__dict__", ())


def controlnet_step(timestep):
    """(step, n) of a ControlNet call feeding a patched UNet: of the innermost denoising_step block opened since the
    pipeline call in progress began (any open block when no pipeline call is in progress), or of that pipeline
    call; None where the UNet it feeds is not patched (that block's, or that pipeline's: set after apply, or
    HiDiffusion removed), so the ControlNet runs as without HiDiffusion. RuntimeError where neither tells."""
    call = _pipeline_call.get()
    blocks = _explicit_steps.get()
    if len(blocks) > (call.blocks_before if call else 0):
        owner, step, n = blocks[-1]
        return (step, n) if is_patched(owner) else None
    if call is None:
        raise RuntimeError(
            "HiDiffusion's SDXL ControlNet schedule needs the denoising step of each ControlNet call: call it through "
            "a pipeline passed to apply_hidiffusion (a pipeline made since with from_pipe needs its own "
            "apply_hidiffusion), or inside the `with hidiff_models.denoising_step(unet, step, n):` block of the UNet "
            "call it feeds. A pipeline sharing this ControlNet with an applied one needs its own apply_hidiffusion, "
            "or a ControlNet of its own.")
    return _pipeline_step(call, timestep) if is_patched(getattr(call.pipeline, "unet", None)) else None


def current_step(unet, timestep):
    """(step, n, pipeline_call) for a call of ``unet`` with ``timestep``; pipeline_call is None for denoising_step."""
    explicit = explicit_step(unet)
    if explicit is not None:
        return *explicit, None
    call = _pipeline_call.get()
    if call is None:
        raise RuntimeError(
            "HiDiffusion's RAU-Net needs the denoising step of each UNet call: call the UNet through a pipeline "
            "passed to apply_hidiffusion (a pipeline made since with from_pipe needs its own apply_hidiffusion), "
            "or wrap the call in `with hidiff_models.denoising_step(unet, step, n):`. Pipeline methods other than "
            "__call__ (an inversion's invert(): run it before apply_hidiffusion, or apply with apply_raunet=False) "
            "and modular pipeline blocks called on their own (call a pipeline of them, applied) are not tracked"
        )
    step, n = _pipeline_step(call, timestep)
    return step, n, call


def _pipeline_step(call, timestep):
    """Step index and number of steps of the pipeline's current run, from its scheduler state; ValueError for a
    call whose samples are at different timesteps."""
    t = torch.as_tensor(timestep)
    if t.numel() > 1 and not bool((t == t.flatten()[0]).all()):  # one sync, only for per-sample timesteps
        raise ValueError(
            "HiDiffusion: this UNet call denoises its samples at different timesteps (a pipeline that runs several "
            "denoising steps in one call, as ParaDiGMS does): RAU-Net needs one step per call; "
            "apply_hidiffusion(..., apply_raunet=False) runs MSW-MSA alone with it"
        )
    scheduler = call.pipeline.scheduler
    timesteps = scheduler.timesteps
    start, n = _run_span(call, timestep)
    step_index = getattr(scheduler, "step_index", None)
    if step_index is not None:
        # step_index counts from the start of scheduler.timesteps (or from begin_index, which is then the start)
        step = step_index - start
    elif _is_pndm(scheduler):
        # PNDM runs one timestep twice (so a timestep is no position) and counts its step calls of this run
        step = scheduler.counter
    else:
        # A scheduler without step_index (DDIM), or one that sets it at its first step() (DPM-Solver, UniPC, LCM):
        # then no step of this run was taken yet.
        step = _timestep_position(timesteps, start, n, timestep, first=hasattr(type(scheduler), "step_index"))
    if not 0 <= step < n:
        # Seen with custom timesteps that repeat their first one: the scheduler's own index lookup skips a step,
        # and diffusers then fails the same way without HiDiffusion.
        raise RuntimeError(f"HiDiffusion: derived step {step} is outside the {n} steps of this pipeline run (the "
                           "scheduler went past its timesteps: custom timesteps that repeat a value, or a UNet call "
                           "from a callback after the last step? Such a call takes its step from "
                           "hidiff_models.denoising_step(unet, step, n))")
    return step, n


def _is_pndm(scheduler):
    from diffusers import PNDMScheduler

    return isinstance(scheduler, PNDMScheduler)


def _run_span(call, timestep):
    """(start, n): where the pipeline's run starts in its scheduler's timesteps and how many steps it runs.

    n comes from the pipeline's ``_num_timesteps``, which counts the steps to a ``denoising_end`` cut in SDXL
    pipelines but past it in SDXL ControlNet ones. Where neither it nor begin_index tells the start (pipelines that
    publish no n: SDXL InstructPix2Pix, unCLIP, DiffEdit, LEdits++; a denoising_end cut), the timestep of the run's
    first UNet (or ControlNet) call does, and n is the steps from there to the end (or the cut).
    """
    scheduler, denoising_end = call.pipeline.scheduler, call.denoising_end
    n = getattr(call.pipeline, "_num_timesteps", None)
    timesteps = scheduler.timesteps
    end = len(timesteps)
    if isinstance(denoising_end, float) and 0 < denoising_end < 1:  # what the SDXL pipelines take as valid
        # The run ends at the last timestep >= their cutoff, whatever strength or denoising_start cut from its head.
        if call.end is None:
            total = scheduler.config.num_train_timesteps
            call.end = int((timesteps >= int(round(total - denoising_end * total))).sum())
        end = call.end
    begin = getattr(scheduler, "begin_index", None)
    if begin is not None:
        return begin, end - begin if n is None else min(n, end - begin)
    if n is not None and end == len(timesteps):
        # img2img strength truncation or denoising_start (pipelines that set no begin_index): the run ends at `end`
        return end - n, n
    if not call.starts:
        t = _call_timestep(timestep, timesteps)
        # n counted up to the cut, or past it (SDXL ControlNet pipelines): the start whose timestep is the first
        # call's; where both starts have it (a timestep PNDM repeats), the one the pipeline's own count gives
        starts = [] if n is None else [end - n, len(timesteps) - n]
        if "ControlNet" in untracked_class(type(call.pipeline)).__name__:
            starts.reverse()
        starts = [s for s in starts if 0 <= s < end]
        known = [s for s in starts if timesteps[s] == t]
        first = known[0] if known else _timestep_position(timesteps, 0, end, timestep, first=True)
        twice = not known and _is_pndm(scheduler) and first + 1 < end and timesteps[first + 1] == t
        call.starts = (first, first + 1) if twice else (first,)
    elif len(call.starts) > 1:
        # PNDM counts the run's steps: its call at count c is at timesteps[start + c]. Until a step tells the two
        # starts apart (the run's second), the first is taken: n one too large changes an op at step 0 only in a
        # run of under 7 steps (the smallest ratio, 8/50, takes int(n * ratio) from 0 to 1 at n = 7).
        t, c = _call_timestep(timestep, timesteps), scheduler.counter
        call.starts = tuple(s for s in call.starts if s + c < end and timesteps[s + c] == t) or call.starts
    return call.starts[0], end - call.starts[0]


def _call_timestep(timestep, timesteps):
    """A call's timestep (its first sample's: _pipeline_step checked they agree) as an element of ``timesteps``."""
    return torch.as_tensor(timestep).flatten()[0].to(timesteps.device, timesteps.dtype)


def _timestep_position(timesteps, start, n, timestep, first=False):
    """Position of ``timestep`` among the n timesteps run from ``start``.

    A timestep that repeats there (sigmas rounded to equal timesteps) has no one position, unless ``first``:
    the run's first UNet call, or a call before the scheduler's first step() of the run, is at the first one.
    """
    run = timesteps[start : start + n]
    t = _call_timestep(timestep, run)
    matches = (run == t).nonzero().flatten().tolist()
    if first and matches:
        return matches[0]
    if len(matches) != 1:
        raise RuntimeError(
            f"HiDiffusion: timestep {t.item()} is not found exactly once among the {n} timesteps of this "
            "pipeline run (a UNet call from a callback, or by another pipeline sharing the UNet without its own "
            "apply_hidiffusion?); wrap the UNet call in hidiff_models.denoising_step(unet, step, n)"
        )
    return matches[0]


_TRACKING_CLASSES = {}


def tracking_class(cls):
    """A subclass of pipeline class ``cls`` whose ``__call__`` publishes the call for its patched UNet's calls
    (``cls`` a tracking class already: that class)."""
    cls = untracked_class(cls)
    if cls not in _TRACKING_CLASSES:
        signature = inspect.signature(cls.__call__)
        var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        modular = is_modular(cls)

        @functools.wraps(cls.__call__)
        def __call__(self, *args, **kwargs):
            try:  # by keyword or by position
                arguments = dict(signature.bind_partial(self, *args, **kwargs).arguments)
            except TypeError:  # arguments the pipeline's own call refuses, with its own message
                arguments = {}
            if modular:  # its inputs come as **kwargs, or in the PipelineState it is given
                values = getattr(arguments.get("state"), "values", None)
                arguments = {**(values if isinstance(values, dict) else {}), **arguments.pop(var_keyword, {}),
                             **arguments}
            if not is_patched(getattr(self, "unet", None)):
                warnings.warn("HiDiffusion: this pipeline's UNet is not patched (set after apply_hidiffusion, or "
                              "HiDiffusion removed since, through the UNet or another pipeline sharing it): this call "
                              "runs without HiDiffusion. Call apply_hidiffusion(pipe) again, or "
                              "remove_hidiffusion(pipe) to run without it.", UserWarning, stacklevel=2)
            call = PipelineCall(self, controlnet_text_to_image=is_controlnet_text_to_image(self, arguments),
                                denoising_end=arguments.get("denoising_end"), blocks_before=len(_explicit_steps.get()))
            token = _pipeline_call.set(call)
            try:
                return cls.__call__(self, *args, **kwargs)
            finally:
                _pipeline_call.reset(token)

        tracking = same_named_subclass(cls, __call__)
        _TRACKING_CLASSES[cls] = tracking
    return _TRACKING_CLASSES[cls]


def same_named_subclass(cls, __call__):
    """A subclass of ``cls`` with this ``__call__``, and cls's name and module: config saving and repr see the
    user's class."""
    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, "_hidiff_base_class": cls})


def untracked_class(cls):
    """The user's pipeline class behind a tracking class (``cls`` itself when not tracking)."""
    return cls.__dict__.get("_hidiff_base_class", cls)


def is_modular(cls):
    """Whether pipeline class ``cls`` is a modular pipeline (diffusers.modular_pipelines)."""
    return any(c.__name__ == "ModularPipeline" for c in cls.__mro__)


def is_controlnet_text_to_image(pipe, arguments):
    """Whether a pipeline call is ControlNet text-to-image, the schedule variant a call decides (inpainting and
    Playground are the model's: HiDiffusionState).

    A pipeline's class tells its task, except a modular pipeline's (one class runs every task, chosen by the
    inputs of the call, ``arguments`` by name: images, or what its encoder blocks make of them).
    """
    cls = untracked_class(type(pipe))
    if is_modular(cls):
        def given(*names):
            return any(arguments.get(name) is not None for name in names)

        image_to_image = given("image", "image_latents")
        controlnet = given("control_image", "controlnet_cond")
    else:
        image_to_image = "Img2Img" in cls.__name__ or "Inpaint" in cls.__name__
        controlnet = getattr(pipe, "controlnet", None) is not None
    return controlnet and not image_to_image
