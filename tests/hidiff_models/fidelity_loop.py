"""Denoising loop and inputs shared by the fidelity fixture generator and the fidelity test.

The generator runs this beside diffusers 0.29.2 and the original hidiffusion package; the test runs it
beside the project's diffusers. So it uses only torch and diffusers APIs present in both versions, and
loads hidiff_models/configs.py by file path (importing the hidiff_models package would pull in the
adapter, which the old environment cannot import).
"""
import contextlib
import importlib.util
import pathlib

import torch

NUM_STEPS = 10
GUIDANCE = 7.5
SEED = 0
# Explicit DDIM config (Stable Diffusion's), so both diffusers versions build the same schedule.
DDIM_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
# (model, latent height, latent width, window shift k). Every (model, size) also gets a vanilla run.
# All latents are below the profiles' size thresholds (sd15, sd21 -> sd15_1024; sdxl -> sdxl_2048 aggressive;
# sdxl_turbo has one profile), as 64x64 would be, at a quarter of the cost; non-square sizes reach odd sizes
# deep in the UNet (x3).
CASES = [
    (model, h, w, k)
    for model in ("sd15", "sd21", "sdxl")
    for (h, w, ks) in ((32, 32, (0, 2)), (32, 24, (1, 3)), (24, 32, (2,)))
    for k in ks
] + [("sdxl_turbo", 32, 32, 1), ("sdxl_turbo", 32, 24, 3)]
# SDXL-Turbo runs the SDXL layout (named as the original's official Turbo checkpoint, it gets Turbo's schedule).
ARCHITECTURE = {"sdxl_turbo": "sdxl"}
SIZES = sorted({(model, h, w) for model, h, w, _ in CASES})
# The profiles for 2048-px SD1.5 (RAD-pool too, from T2) and 4096-px SDXL (not aggressive) need latents of 256 /
# 512 and more. A profile is only its (T1, T2) ratios and, for SDXL, whether it is aggressive, so these cases
# run small latents with the small profile made the large one, on both sides; 32x32 keeps every map even (odd
# ones make the original resize them).
LARGE_PROFILE = {"sd15": "sd15_2048", "sd21": "sd15_2048", "sdxl": "sdxl_4096"}
LARGE_PROFILE_CASES = [("sd15", 32, 32, 1), ("sd21", 32, 32, 3), ("sdxl", 32, 32, 2)]

_REPO = pathlib.Path(__file__).resolve().parents[2]


def _load_configs():
    spec = importlib.util.spec_from_file_location("_hidiff_configs", _REPO / "hidiff_models" / "configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


configs = _load_configs()


@contextlib.contextmanager
def single_thread():
    # One intra-op thread: the same float rounding whatever the core count (matmul blocking can depend on
    # it), and no thread oversubscription on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_unet(model: str):
    """The tiny built-in UNet with seeded weights, fp32, eval mode (a fresh one per run: the original
    keeps per-module state on the UNet)."""
    return configs.build_unet(ARCHITECTURE.get(model, model), "tiny", seed=SEED)


def case_name(model, h, w, k=None):
    return f"{model}_{h}x{w}_" + ("vanilla" if k is None else f"k{k}")


def make_inputs(model: str, h: int, w: int):
    """Seeded initial latents [1, 4, h, w] and CFG conditioning for a batch of 2 ([uncond, cond])."""
    architecture = ARCHITECTURE.get(model, model)
    gen = torch.Generator().manual_seed(1234 + 100 * h + w + (1 if architecture == "sdxl" else 0))
    cfg = configs.unet_config(architecture, "tiny")
    inputs = dict(
        latents=torch.randn(1, 4, h, w, generator=gen),
        encoder_hidden_states=torch.randn(2, 77, cfg["cross_attention_dim"], generator=gen),
    )
    if cfg.get("addition_embed_type") == "text_time":
        inputs["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(2, configs.POOLED_TEXT_DIM["tiny"], generator=gen),
            time_ids=torch.randn(2, 6, generator=gen),
        )
    return inputs


@torch.no_grad()
def denoise(unet, inputs, step_context=None):
    """NUM_STEPS of DDIM (eta 0) with classifier-free guidance; one UNet call per step on the batch-2
    concatenation. step_context(i) wraps the UNet call of step i. The sample is passed positionally:
    the original reads the latent size from the forward's positional args."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**DDIM_CONFIG)
    scheduler.set_timesteps(NUM_STEPS)
    assert len(scheduler.timesteps) == NUM_STEPS
    latents = inputs["latents"].clone()
    extra = {"added_cond_kwargs": inputs["added_cond_kwargs"]} if "added_cond_kwargs" in inputs else {}
    with single_thread():
        for i, t in enumerate(scheduler.timesteps):
            latent_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            with step_context(i) if step_context else contextlib.nullcontext():
                noise = unet(latent_in, t, encoder_hidden_states=inputs["encoder_hidden_states"],
                             return_dict=False, **extra)[0]
            uncond, cond = noise.chunk(2)
            noise = uncond + GUIDANCE * (cond - uncond)
            latents = scheduler.step(noise, t, latents, eta=0.0, return_dict=False)[0]
    return latents


def rel_err(a, b):
    """Relative error in float64: |a - b| / |b|."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# rel_err of a match with a recorded generation: float32 rounding differs across CPUs (up to 5e-6 seen between
# instruction sets); a schedule or window error is > 0.3
FIXTURE_TOL = 1e-4
