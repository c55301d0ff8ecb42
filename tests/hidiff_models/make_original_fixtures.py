"""Record the original HiDiffusion's denoising results as fixtures for tests/hidiff_models/test_fidelity.py.

Runs in a separate environment with the original package (it imports only with diffusers <= 0.29):

    python3 -m venv /tmp/orig-env
    /tmp/orig-env/bin/pip install torch==2.13.0 diffusers==0.29.2 hidiffusion==0.1.10 \
        "huggingface_hub<0.26" "transformers<4.46" accelerate
    /tmp/orig-env/bin/python tests/hidiff_models/make_original_fixtures.py

(from the repository root). Writes tests/hidiff_models/fixtures/original_latents.pt: final latents of
each case in fidelity_loop.CASES with the original applied, the vanilla (unpatched) final latents per
(model, size), and metadata; and fixtures/original_large_profiles.pt: the same for
fidelity_loop.LARGE_PROFILE_CASES, run under the models' large profiles.
"""
import contextlib
import pathlib
import sys
import types
import warnings

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fidelity_loop as fl  # noqa: E402

import diffusers  # noqa: E402
import hidiffusion.hidiffusion as original  # noqa: E402
from importlib.metadata import version  # noqa: E402

# The tiny UNets lack one module name of the original's key lists (down_blocks.2.resnets.0.conv_shortcut:
# narrow channels need no shortcut), so its module-name detection fails; and a bare UNet has no
# name_or_path at all. Name the official checkpoints to select the model.
NAME_OR_PATH = {"sd15": "runwayml/stable-diffusion-v1-5", "sd21": "stabilityai/stable-diffusion-2-1-base",
                "sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "sdxl_turbo": "stabilityai/sdxl-turbo"}
# The original picks the window shift k from torch.rand(1) in {<=.25, <=.5, <=.75, else}.
RAND_FOR_SHIFT = {0: 0.1, 1: 0.3, 2: 0.6, 3: 0.9}


@contextlib.contextmanager
def pinned_shift(k):
    """Inside: the original module sees a stand-in `torch` whose rand always picks shift k; yields it (its
    ``draws`` counts the picks)."""
    proxy = types.ModuleType("torch_with_pinned_rand")
    proxy.__getattr__ = lambda name: getattr(torch, name)
    proxy.draws = 0

    def rand(*shape, **kwargs):
        proxy.draws += 1
        return torch.full(shape, RAND_FOR_SHIFT[k])

    proxy.rand = rand
    saved, original.torch = original.torch, proxy
    try:
        yield proxy
    finally:
        original.torch = saved


def assert_counters_wrapped(unet):
    """Every module the original patched counted its calls back to 0: exactly n calls each."""
    for name, module in unet.named_modules():
        if hasattr(module, "_parent") and hasattr(module, "timestep"):
            assert module.timestep == 0, (name, module.timestep)


def run_original(model, inputs, k):
    unet = fl.build_unet(model)
    unet.name_or_path = NAME_OR_PATH[model]
    unet._num_timesteps = fl.NUM_STEPS  # the original reads n from its "pipeline", here the UNet itself
    original.apply_hidiffusion(unet)
    with pinned_shift(k) as proxy:
        latents = fl.denoise(unet, inputs)
    # 5 (sd15, sd21) or 10 (sdxl, sdxl_turbo) MSW-MSA blocks per UNet call: the patched blocks ran with pinned k.
    assert proxy.draws == fl.NUM_STEPS * (10 if model.startswith("sdxl") else 5), proxy.draws
    assert_counters_wrapped(unet)
    return latents


def run_original_with_large_profile(model, inputs, k):
    """run_original with the small profile of the model made its large one (fidelity_loop.LARGE_PROFILE)."""
    ratios = original.switching_threshold_ratio_dict
    small = "sd15_1024" if model in ("sd15", "sd21") else "sdxl_2048"
    saved = ratios[small], original.is_aggressive_raunet
    ratios[small] = ratios[fl.LARGE_PROFILE[model]]  # both read at every call of the patched blocks
    original.is_aggressive_raunet = False  # the large profiles never are
    try:
        return run_original(model, inputs, k)
    finally:
        ratios[small], original.is_aggressive_raunet = saved


def recorded_with():
    """The versions a pipeline fixture is recorded with, and how the original's shift draws were pinned."""
    return dict(diffusers=diffusers.__version__, hidiffusion=version("hidiffusion"), transformers=version("transformers"),
                torch=str(torch.__version__), rand_for_shift=RAND_FOR_SHIFT)


def save_fixture(out, name):
    path = HERE / "fixtures" / name
    path.parent.mkdir(exist_ok=True)
    torch.save(out, path)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


def main():
    # Odd feature maps make the original resize them bicubically, which hidiff deliberately does not do
    # (../shared/docs/hidiffusion-method.md): the cases must not go there.
    warnings.filterwarnings("error", message="HiDiffusion Warning")
    out = {"vanilla": {}, "original": {}}
    for model, h, w in fl.SIZES:
        inputs = fl.make_inputs(model, h, w)
        out["vanilla"][fl.case_name(model, h, w)] = fl.denoise(fl.build_unet(model), inputs)
    for model, h, w, k in fl.CASES:
        inputs = fl.make_inputs(model, h, w)
        latents = run_original(model, inputs, k)
        vanilla = out["vanilla"][fl.case_name(model, h, w)]
        assert torch.isfinite(latents).all()
        diff = fl.rel_err(latents, vanilla)
        print(f"{fl.case_name(model, h, w, k)}: |orig - vanilla| / |vanilla| = {diff:.3f}", flush=True)
        assert diff > 1e-2, "HiDiffusion had no visible effect: the test could not fail"
        out["original"][fl.case_name(model, h, w, k)] = latents
    out["meta"] = dict(
        diffusers=diffusers.__version__,
        hidiffusion=version("hidiffusion"),
        torch=str(torch.__version__),
        cases=fl.CASES,
        num_steps=fl.NUM_STEPS,
        guidance=fl.GUIDANCE,
        seed=fl.SEED,
        ddim=fl.DDIM_CONFIG,
        name_or_path=NAME_OR_PATH,
        rand_for_shift=RAND_FOR_SHIFT,
    )
    save_fixture(out, "original_latents.pt")

    out = {"original": {}}
    for model, h, w, k in fl.LARGE_PROFILE_CASES:
        inputs = fl.make_inputs(model, h, w)
        latents = run_original_with_large_profile(model, inputs, k)
        diff = fl.rel_err(latents, run_original(model, inputs, k))
        print(f"{fl.case_name(model, h, w, k)}: |large profile - small| / |small| = {diff:.3f}", flush=True)
        assert diff > 1e-2, "the large profile had no visible effect: the test could not fail"
        out["original"][fl.case_name(model, h, w, k)] = latents
    out["meta"] = dict(diffusers=diffusers.__version__, hidiffusion=version("hidiffusion"), torch=str(torch.__version__),
                       cases=fl.LARGE_PROFILE_CASES, num_steps=fl.NUM_STEPS,
                       ratios={p: original.switching_threshold_ratio_dict[p] for p in set(fl.LARGE_PROFILE.values())})
    save_fixture(out, "original_large_profiles.pt")


if __name__ == "__main__":
    main()
