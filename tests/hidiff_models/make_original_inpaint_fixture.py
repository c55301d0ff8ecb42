"""Record the original HiDiffusion's results on SDXL's plain inpainting pipeline for test_inpaint_sdxl.py.

Runs beside the original package on diffusers 0.29.2 (see make_original_fixtures.py for the environment):

    /tmp/orig-env/bin/python tests/hidiff_models/make_original_inpaint_fixture.py

(from the repository root). The original tells an inpainting model by its checkpoint's name, not by the
pipeline: the same 4-channel tiny SDXL UNet in a StableDiffusionXLInpaintPipeline runs SDXL's aggressive RAU-Net
mode when the pipeline is named as SDXL base, and not when named as the SDXL inpainting checkpoint. For each
name of NAMES it writes the final latents (tiny_sdxl_controlnet.generate_inpaint) with the original applied and
the window shift k pinned, and those of the plain pipeline, into
tests/hidiff_models/fixtures/original_sdxl_inpaint.pt.
"""
import pathlib
import sys
import warnings

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tiny_sdxl_controlnet as tiny  # noqa: E402
from make_original_fixtures import assert_counters_wrapped, pinned_shift, recorded_with, save_fixture  # noqa: E402

import diffusers  # noqa: E402
import hidiffusion.hidiffusion as original  # noqa: E402

PIPELINE = "StableDiffusionXLInpaintPipeline"
# case: the pipeline's name_or_path, and whether the original runs SDXL's aggressive RAU-Net mode for it
NAMES = {"base": ("stabilityai/stable-diffusion-xl-base-1.0", True),
         "inpainting": ("diffusers/stable-diffusion-xl-1.0-inpainting-0.1", False)}
K = 2  # the window shift of both cases: they differ by the mode alone


def run_original(case):
    name_or_path, aggressive = NAMES[case]
    pipe = tiny.build_sdxl_pipeline(PIPELINE, name_or_path)
    original.apply_hidiffusion(pipe)
    # No ControlNet: the original leaves the pipeline's call as it is and patches the UNet's blocks only.
    assert type(pipe).__call__ is getattr(diffusers, PIPELINE).__call__
    with pinned_shift(K) as proxy:
        latents = tiny.generate_inpaint(pipe)
    assert pipe._num_timesteps == tiny.NUM_STEPS  # strength 1: the original's n is every step
    # 10 MSW-MSA blocks per UNet call: the patched blocks ran with pinned k, once per step.
    assert proxy.draws == tiny.NUM_STEPS * 10, proxy.draws
    assert pipe.unet.down_blocks[1].aggressive_raunet is aggressive
    assert_counters_wrapped(pipe.unet)
    return latents


def main():
    # Odd feature maps make the original resize them bicubically; the cases must not go there.
    warnings.filterwarnings("error", message="HiDiffusion Warning")
    vanilla = tiny.generate_inpaint(tiny.build_sdxl_pipeline(PIPELINE))
    out = {"vanilla": vanilla, "original": {}}
    for case in NAMES:
        latents = run_original(case)
        assert torch.isfinite(latents).all()
        diff = tiny.rel_err(latents, vanilla)
        print(f"{case} k={K}: |orig - vanilla| / |vanilla| = {diff:.3f}", flush=True)
        assert diff > 1e-2, "HiDiffusion had no visible effect: the test could not fail"
        out["original"][case] = latents
    diff = tiny.rel_err(out["original"]["base"], out["original"]["inpainting"])
    print(f"|base - inpainting| / |inpainting| = {diff:.3f}", flush=True)
    assert diff > 1e-2, "the aggressive mode had no visible effect: the test could not fail"
    out["meta"] = dict(recorded_with(), **tiny.recorded_settings(), pipeline=PIPELINE, names=NAMES, window_shift=K)
    save_fixture(out, "original_sdxl_inpaint.pt")


if __name__ == "__main__":
    main()
