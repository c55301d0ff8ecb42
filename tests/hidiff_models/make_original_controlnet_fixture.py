"""Record the original HiDiffusion's SDXL ControlNet pipeline results for test_controlnet_sdxl.py.

Runs beside the original package on diffusers 0.29.2 (see make_original_fixtures.py for the environment):

    /tmp/orig-env/bin/python tests/hidiff_models/make_original_controlnet_fixture.py

(from the repository root). For each case of tiny_sdxl_controlnet.RECORDED it writes the final latents of the
plain pipeline and of the pipeline with the original applied (its SDXL ControlNet ``__call__``: the
ControlNet only for the first 60% of steps, on inputs resized to a 128-latent base; its UNet resizing the
residuals), with the window shift k pinned, into tests/hidiff_models/fixtures/original_sdxl_controlnet.pt.
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

# (case, window shift k)
CASES = [("text2img", 1), ("text2img_guess", 2), ("img2img", 3)]


def count_controlnet_calls(pipe):
    calls = []
    pipe.controlnet.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape[-2:])))
    return calls


def run_original(case, k):
    kind = tiny.CASES[case][0]
    pipe = tiny.build_pipeline(kind)
    assert pipe.name_or_path == tiny.NAME_OR_PATH
    original.apply_hidiffusion(pipe)
    calls = count_controlnet_calls(pipe)
    with pinned_shift(k) as proxy:
        latents = tiny.generate(pipe, case)
    n = tiny.NUM_STEPS if kind == "text2img" else int(tiny.NUM_STEPS * tiny.CASES[case][1]["strength"])
    # 10 MSW-MSA blocks per UNet call: the patched blocks ran with pinned k, once per step.
    assert proxy.draws == n * 10, proxy.draws
    # The ControlNet ran for the steps i < 0.6 n only, at the 128-latent base size.
    assert calls == [(128, 96)] * sum(i < 0.6 * n for i in range(n)), calls
    assert_counters_wrapped(pipe.unet)
    return latents


def main():
    # Odd feature maps make the original resize them bicubically; the cases must not go there.
    warnings.filterwarnings("error", message="HiDiffusion Warning")
    out = {"vanilla": {}, "original": {}}
    for case in tiny.RECORDED:
        out["vanilla"][case] = tiny.generate(tiny.build_pipeline(tiny.CASES[case][0]), case)
    for case, k in CASES:
        latents = run_original(case, k)
        assert torch.isfinite(latents).all()
        diff = tiny.rel_err(latents, out["vanilla"][case])
        print(f"{case} k={k}: |orig - vanilla| / |vanilla| = {diff:.3f}", flush=True)
        assert diff > 1e-2, "HiDiffusion had no visible effect: the test could not fail"
        out["original"][f"{case}_k{k}"] = latents
    out["meta"] = dict(recorded_with(), **tiny.recorded_settings(), cases=CASES,
                       call_cases={case: tiny.CASES[case] for case in tiny.RECORDED})
    save_fixture(out, "original_sdxl_controlnet.pt")


if __name__ == "__main__":
    main()
