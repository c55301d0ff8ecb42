"""Fidelity to the original HiDiffusion (hidiffusion 0.1.10 on diffusers 0.29.2).

fixtures/original_latents.pt holds final latents of a 10-step DDIM + CFG loop on the tiny SD1.5 / SD2.1 /
SDXL UNets with the original applied (window shift k pinned), recorded by make_original_fixtures.py in an
environment with the original package. Here the same loop runs with hidiff's torch backend.
"""
import pathlib

import pytest
import torch

import fidelity_loop as fl  # beside this file (pytest puts the test directory on sys.path)
from hidiff_models import apply_hidiffusion, denoising_step, remove_hidiffusion, schedule

HERE = pathlib.Path(__file__).resolve().parent

FIXTURES = torch.load(HERE / "fixtures" / "original_latents.pt", weights_only=True)
LARGE_PROFILE_FIXTURES = torch.load(HERE / "fixtures" / "original_large_profiles.pt", weights_only=True)
TOL = fl.FIXTURE_TOL


def model_type(model):
    """SD2.1 has no model_type of its own: it is detected as the SD1.5 family from its layout."""
    return None if model == "sd21" else model


def run_hidiff(model, h, w, k):
    unet = fl.build_unet(model)
    apply_hidiffusion(unet, backend="torch", window_shift=k, model_type=model_type(model))
    latents = fl.denoise(unet, fl.make_inputs(model, h, w),
                         step_context=lambda i: denoising_step(unet, step=i, num_steps=fl.NUM_STEPS))
    return latents


def test_fixtures_cover_the_cases():
    # The recorded cases are the ones fidelity_loop defines (regenerate the fixtures after changing them).
    assert [tuple(c) for c in FIXTURES["meta"]["cases"]] == fl.CASES
    assert FIXTURES["meta"]["num_steps"] == fl.NUM_STEPS and FIXTURES["meta"]["ddim"] == fl.DDIM_CONFIG
    meta = LARGE_PROFILE_FIXTURES["meta"]
    assert [tuple(c) for c in meta["cases"]] == fl.LARGE_PROFILE_CASES and meta["num_steps"] == fl.NUM_STEPS
    assert {p: (r["T1_ratio"], r["T2_ratio"]) for p, r in meta["ratios"].items()} == {
        p: schedule.RATIOS[p] for p in set(fl.LARGE_PROFILE.values())}


@pytest.mark.parametrize("model,h,w,k", fl.CASES, ids=[fl.case_name(*c) for c in fl.CASES])
def test_matches_original(model, h, w, k):
    latents = run_hidiff(model, h, w, k)
    expected = FIXTURES["original"][fl.case_name(model, h, w, k)]
    assert latents.shape == expected.shape
    assert fl.rel_err(latents, expected) < TOL


@pytest.mark.parametrize("model,h,w", fl.SIZES, ids=[fl.case_name(*s) for s in fl.SIZES])
def test_vanilla_after_remove_matches_recorded_vanilla(model, h, w):
    # Guards the comparison itself (same configs, weights, schedule and UNet numerics on both diffusers
    # versions) and that remove_hidiffusion restores the plain UNet.
    unet = fl.build_unet(model)
    apply_hidiffusion(unet, backend="torch", window_shift=0, model_type=model_type(model))
    remove_hidiffusion(unet)
    latents = fl.denoise(unet, fl.make_inputs(model, h, w))
    assert fl.rel_err(latents, FIXTURES["vanilla"][fl.case_name(model, h, w)]) < TOL


@pytest.mark.parametrize("model,h,w,k", fl.LARGE_PROFILE_CASES, ids=[fl.case_name(*c) for c in fl.LARGE_PROFILE_CASES])
def test_matches_original_under_the_large_profiles(model, h, w, k, monkeypatch):
    # 2048-px SD1.5: RAD-pool and RAU-interp (steps < T2) beside RAD-conv (steps < T1); 4096-px SDXL: not
    # aggressive, RAD-conv (steps < T2) beside RAD-pool (steps < T1).
    monkeypatch.setattr(schedule, "profile", lambda model_type, height, width: fl.LARGE_PROFILE[model])
    latents = run_hidiff(model, h, w, k)
    assert fl.rel_err(latents, LARGE_PROFILE_FIXTURES["original"][fl.case_name(model, h, w, k)]) < TOL
