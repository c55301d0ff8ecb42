"""The original HiDiffusion on SDXL's plain inpainting pipeline: inpainting is the checkpoint's name's, not the
pipeline's.

fixtures/original_sdxl_inpaint.pt holds final latents of a tiny StableDiffusionXLInpaintPipeline (4-channel UNet,
10 DDIM steps with CFG, strength 1) named as SDXL base (the original runs SDXL's aggressive RAU-Net mode) and as
the SDXL inpainting checkpoint (it does not), with the original applied on diffusers 0.29.2, and without it;
recorded by make_original_inpaint_fixture.py. Here the same pipelines run on the project's diffusers with
apply_hidiffusion(backend="torch").
"""
import pathlib

import pytest
import torch

import tiny_sdxl_controlnet as tiny  # beside this file (pytest puts the test directory on sys.path)
from hidiff_models import apply_hidiffusion

HERE = pathlib.Path(__file__).resolve().parent

FIXTURES = torch.load(HERE / "fixtures" / "original_sdxl_inpaint.pt", weights_only=True)
META = FIXTURES["meta"]
TOL = tiny.FIXTURE_TOL


def build(name_or_path=tiny.NAME_OR_PATH):
    return tiny.build_sdxl_pipeline(META["pipeline"], name_or_path)


def test_fixture_matches_the_settings():
    assert META["num_steps"] == tiny.NUM_STEPS and META["ddim"] == tiny.DDIM_CONFIG and META["seeds"] == tiny.SEEDS
    assert set(FIXTURES["original"]) == set(META["names"])


def test_vanilla_matches_recorded_vanilla():
    # Guards the comparison: same weights, text encoders, masking and pipeline numerics on both versions.
    assert tiny.rel_err(tiny.generate_inpaint(build()), FIXTURES["vanilla"]) < TOL


@pytest.mark.parametrize("case", sorted(META["names"]))
def test_matches_original(case):
    name_or_path, _ = META["names"][case]
    pipe = apply_hidiffusion(build(name_or_path), backend="torch", window_shift=META["window_shift"])
    assert tiny.rel_err(tiny.generate_inpaint(pipe), FIXTURES["original"][case]) < TOL


def test_the_names_differ_clearly():
    # The aggressive mode changes the result: matching one name's result cannot pass for the other's.
    assert tiny.rel_err(FIXTURES["original"]["base"], FIXTURES["original"]["inpainting"]) > 0.1
