"""When each RAU-Net operation is active: a pure function of the model, the latent size and the step.

Follows the original implementation's tables (megvii-research/HiDiffusion; written down in
../shared/docs/hidiffusion-method.md beside this repository). ``T = int(n * ratio)`` and an operation is
active while ``step < T``; the float products are the original implementation's (e.g. ``int(90 * 0.7) == 62``).
"""
from dataclasses import dataclass

MODEL_TYPES = ("sd15", "sdxl", "sdxl_turbo")

# profile -> (T1 ratio, T2 ratio)
RATIOS = {
    "sd15_1024": (0.4, 0.0),
    "sd15_2048": (0.7, 0.3),
    "sdxl_2048": (0.4, 0.0),
    "sdxl_4096": (0.7, 0.3),
    "sdxl_turbo_1024": (0.5, 0.0),
}
CONTROLNET_SDXL_2048_T1 = 0.5
# Aggressive mode: the deep-block shrinking starts at step int(8/50 * n), and RAD-conv stops there.
AGGRESSIVE_STEP_FRACTION = 8 / 50


@dataclass(frozen=True)
class ActiveOps:
    """Which RAU-Net operations run in one UNet call."""

    rad_conv: bool  # the downsampler conv runs with stride 4 (RAU-upsample follows via upsample_size)
    rad_pool: bool  # RAD-pool in the down block, and RAU-interp in the matching up block


def profile(model_type: str, height: int, width: int) -> str:
    """The schedule profile for a latent of height x width entering the UNet."""
    if model_type == "sd15":
        return "sd15_1024" if height < 256 or width < 256 else "sd15_2048"
    if model_type == "sdxl":
        return "sdxl_2048" if height < 512 or width < 512 else "sdxl_4096"
    if model_type == "sdxl_turbo":
        return "sdxl_turbo_1024"
    raise ValueError(f"unknown model_type {model_type!r}; expected one of {MODEL_TYPES}")


def active_ops(model_type, height, width, step, n, *, controlnet=False, inpainting=False, playground=False) -> ActiveOps:
    """RAU-Net operations active at 0-based ``step`` of ``n`` denoising steps.

    controlnet: text-to-image ControlNet pipeline (SDXL 2048 profile uses T1 0.5).
    inpainting / playground: turn off SDXL's aggressive mode.
    """
    name = profile(model_type, height, width)
    t1_ratio, t2_ratio = RATIOS[name]
    if name == "sdxl_2048" and controlnet:
        t1_ratio = CONTROLNET_SDXL_2048_T1
    t1, t2 = int(n * t1_ratio), int(n * t2_ratio)

    if model_type == "sd15":
        return ActiveOps(rad_conv=step < t1, rad_pool=step < t2)
    if model_type == "sdxl_turbo":
        return ActiveOps(rad_conv=False, rad_pool=step < t1)
    if name == "sdxl_2048" and not inpainting and not playground:
        aggressive_start = int(AGGRESSIVE_STEP_FRACTION * n)
        return ActiveOps(rad_conv=step < aggressive_start, rad_pool=aggressive_start <= step < t1)
    return ActiveOps(rad_conv=step < t2, rad_pool=step < t1)


def checkpoint_name(name_or_path: str) -> str:
    """The lowercase name of a checkpoint from its hub id or local path, where SDXL-Turbo, Playground and
    inpainting models are known by "turbo" / "playground" / "inpainting": the last part (the folder above a unet/
    folder), or in a Hugging Face cache snapshot (.../models--org--name/snapshots/<revision>) models--org--name.
    The other folders of a local path are not the model's name."""
    parts = [p for p in name_or_path.replace("\\", "/").lower().split("/") if p not in ("", ".")]
    if parts and parts[-1] == "unet":
        parts.pop()
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3]
    return parts[-1] if parts else ""


def named_model_type(family: str, name_or_path: str) -> str:
    """The model type of a UNet of ``family`` ('sd15' or 'sdxl') loaded from ``name_or_path``: SDXL-Turbo has
    SDXL's architecture and is known by its name only."""
    return "sdxl_turbo" if family == "sdxl" and "turbo" in checkpoint_name(name_or_path) else family
