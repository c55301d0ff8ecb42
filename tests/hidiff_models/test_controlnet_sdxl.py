"""The original HiDiffusion's SDXL ControlNet schedule (hidiff_models/controlnet.py) on tiny real pipelines.

fixtures/original_sdxl_controlnet.pt holds final latents of tiny SDXL ControlNet pipelines (text-to-image,
guess mode, img2img; 10 DDIM steps with CFG) with the original applied on diffusers 0.29.2 and without it,
recorded by make_original_controlnet_fixture.py. Here the same pipelines run on the project's diffusers
with apply_hidiffusion(backend="torch") and the SDXL ControlNet override.
"""
import copy
import gc
import pathlib
import types
import weakref

import diffusers
import pytest
import torch

import hidiff_models.adapter as adapter
import hidiff_models.controlnet as cn
import tiny_sdxl_controlnet as tiny  # beside this file (pytest puts the test directory on sys.path)
import hidiff_models.raunet as raunet
from hidiff_models import apply_hidiffusion, denoising_step, remove_hidiffusion

from conftest import modular_sdxl_pipeline

HERE = pathlib.Path(__file__).resolve().parent

FIXTURES = torch.load(HERE / "fixtures" / "original_sdxl_controlnet.pt", weights_only=True)
TOL = tiny.FIXTURE_TOL


def apply(pipe, **kwargs):
    return apply_hidiffusion(pipe, backend="torch", **kwargs)


def test_fixture_covers_the_cases():
    meta = FIXTURES["meta"]
    assert meta["num_steps"] == tiny.NUM_STEPS and meta["ddim"] == tiny.DDIM_CONFIG and meta["seeds"] == tiny.SEEDS
    assert {case for case, _ in meta["cases"]} == set(tiny.RECORDED) == set(FIXTURES["vanilla"])


@pytest.mark.parametrize("case", tiny.RECORDED)
def test_vanilla_matches_recorded_vanilla(case):
    # Guards the comparison: same weights, text encoders, schedule and pipeline numerics on both versions.
    latents = tiny.generate(tiny.build_pipeline(tiny.CASES[case][0]), case)
    assert tiny.rel_err(latents, FIXTURES["vanilla"][case]) < TOL


@pytest.mark.parametrize("case,k", [tuple(c) for c in FIXTURES["meta"]["cases"]],
                         ids=[f"{c}_k{k}" for c, k in FIXTURES["meta"]["cases"]])
def test_matches_original(case, k):
    pipe = apply(tiny.build_pipeline(tiny.CASES[case][0]), window_shift=k)
    latents = tiny.generate(pipe, case)
    assert tiny.rel_err(latents, FIXTURES["original"][f"{case}_k{k}"]) < TOL


# ----------------------------------------------------------------------------------------------- unit tests


def original_input_size(h, w):
    """The original's lines (hidiffusion 0.1.10, sdxl_contrtolnet_ppl.__call__)."""
    original_h, original_w = (128, 128)
    downsample_factor = max(h / original_h, w / original_w)
    return (int(h // downsample_factor) // 8 * 8, int(w // downsample_factor) // 8 * 8)


@pytest.mark.parametrize("size", [(32, 24), (128, 128), (256, 192), (200, 136), (96, 160), (300, 301), (129, 65),
                                  (512, 256), (24, 32), (1, 1)])
def test_input_size_is_the_originals(size):
    assert cn.controlnet_input_size(*size) == original_input_size(*size)


def test_too_elongated_latent_is_refused():
    assert cn.controlnet_input_size(7, 112) == (8, 128)  # 16:1, the most elongated the base leaves an input
    for size in ((8, 512), (8, 129), (113, 7)):
        with pytest.raises(ValueError, match=r"too elongated .* within 16:1"):
            cn.controlnet_input_size(*size)


@pytest.mark.parametrize("n", range(1, 31))
def test_runs_for_the_first_60_percent(n):
    assert [cn.controlnet_runs(s, n) for s in range(n)] == [i < 0.6 * n for i in range(n)]


def test_markers_survive_guess_mode_and_nothing_else():
    marker = cn.NO_RESIDUAL
    assert torch.cat([torch.zeros_like(marker), marker]) is marker
    assert torch.cat(tensors=[marker, marker], dim=0) is marker
    for op in (lambda: torch.cat([marker, torch.ones(1)]), lambda: torch.zeros_like(marker, dtype=torch.float16),
               lambda: torch.add(torch.ones(1), marker)):
        with pytest.raises(TypeError, match="NO_RESIDUAL"):
            op()
    # operators: torch turns the TypeError into NotImplemented, then Python raises its own
    for op in (lambda: marker + torch.ones(1), lambda: torch.ones(1) + marker, lambda: marker * 2):
        with pytest.raises(TypeError):
            op()


def test_resized_residual_refuses_anything_but_feature_plus_residual():
    feature, residual = torch.ones(1, 2, 4, 4), raunet.ResizedResidual(torch.rand(1, 2, 2, 2))
    bicubic = torch.nn.functional.interpolate(residual.tensor, size=(4, 4), mode="bicubic")
    assert torch.equal(feature + residual, feature + bicubic)  # what the UNet does
    assert torch.equal(residual + feature, feature + bicubic)  # Python's reflected add: torch swaps it back
    # other ops, or an add with extra arguments, would compute something else than the UNet's add: refused
    for op in (lambda: torch.mul(feature, residual), lambda: torch.add(feature, residual, alpha=2),
               lambda: feature.add_(residual), lambda: torch.sub(feature, residual)):
        with pytest.raises(TypeError, match=r"only supports `feature \+ residual`"):
            op()
    # torch.add with the residual first, or two residuals: no feature map to resize to
    for op in (lambda: torch.add(residual, feature), lambda: torch.add(residual, residual)):
        with pytest.raises(TypeError, match="added to a feature map on its right"):
            op()
    assert torch.equal(feature, torch.ones(1, 2, 4, 4))  # the refused in-place add changed nothing


def test_conditioning_resize_passes_non_tensors_through():
    # controlnet_cond as a ControlNet takes it: a tensor, or (Multi/Union ControlNets) lists and tuples of them;
    # anything else in there (an entry a ControlNet accepts but is no image tensor) goes through untouched.
    image, other = torch.rand(1, 3, 16, 16), object()
    resized = cn._resize_images([image, (image, other), other, None], (8, 4))
    assert type(resized) is list and type(resized[1]) is tuple
    assert [r.shape for r in (resized[0], resized[1][0])] == [(1, 3, 8, 4)] * 2
    assert resized[1][1] is other and resized[2] is other and resized[3] is None
    assert cn._resize_images(other, (8, 4)) is other


def test_unet_kwargs():
    down, mid = (torch.ones(1, 2, 4, 4), torch.ones(1, 2, 2, 2)), torch.ones(1, 2, 1, 1)
    out = cn.unet_controlnet_kwargs(dict(sample=1, down_block_additional_residuals=down, mid_block_additional_residual=mid))
    assert out["sample"] == 1 and isinstance(out["mid_block_additional_residual"], raunet.ResizedResidual)
    assert [r.tensor for r in out["down_block_additional_residuals"]] == list(down)
    markers = dict(sample=1, down_block_additional_residuals=[cn.NO_RESIDUAL] * 2, mid_block_additional_residual=cn.NO_RESIDUAL)
    assert cn.unet_controlnet_kwargs(markers) == dict(sample=1, down_block_additional_residuals=None,
                                                      mid_block_additional_residual=None)
    assert cn.unet_controlnet_kwargs(dict(sample=1)) == dict(sample=1)
    with pytest.raises(TypeError, match="mixing"):
        cn.unet_controlnet_kwargs(dict(down_block_additional_residuals=down, mid_block_additional_residual=cn.NO_RESIDUAL))


class Spy:
    """Per UNet call: the residual kwargs the UNet gets; per ControlNet run: (net index, latent size, image size)
    as the ControlNet's layers see them (hooks on pipe.controlnet itself would see the call before the override)."""

    def __init__(self, pipe):
        self.unet, self.samples, self.images = [], [], []
        pipe.unet.register_forward_pre_hook(self.unet_hook, with_kwargs=True)
        for index, net in enumerate(getattr(pipe.controlnet, "nets", [pipe.controlnet])):
            net.conv_in.register_forward_pre_hook(lambda m, args, i=index: self.samples.append((i, tuple(args[0].shape))))
            net.controlnet_cond_embedding.register_forward_pre_hook(
                lambda m, args, i=index: self.images.append((i, tuple(args[0].shape))))

    @property
    def controlnet(self):
        assert [i for i, _ in self.samples] == [i for i, _ in self.images]
        return [(i, sample, image) for (i, sample), (_, image) in zip(self.samples, self.images)]

    def unet_hook(self, module, args, kwargs):
        down, mid = kwargs["down_block_additional_residuals"], kwargs["mid_block_additional_residual"]
        if down is None:
            assert mid is None
            self.unet.append(None)
        else:
            assert all(isinstance(r, raunet.ResizedResidual) for r in (*down, mid))
            self.unet.append(tuple(tuple(r.tensor.shape[-2:]) for r in (*down, mid)))


def test_schedule_and_sizes_in_a_pipeline():
    pipe = apply(tiny.build_pipeline(), window_shift=0)
    spy = Spy(pipe)
    latents = tiny.generate(pipe, "text2img", num_inference_steps=3)
    assert torch.isfinite(latents).all()
    # n = 3: steps 0 and 1 (< 1.8) run the ControlNet at the 128-latent base (32x24 -> 128x96, image 8x).
    assert spy.controlnet == [(0, (2, 4, 128, 96), (2, 3, 1024, 768))] * 2
    residual_sizes = ((128, 96),) * 3 + ((64, 48),) * 3 + ((32, 24),) * 3 + ((32, 24),)
    assert spy.unet == [residual_sizes, residual_sizes, None]


@pytest.fixture
def small_base(monkeypatch):
    """A 16-latent base: 32x24 latents -> 16x8 ControlNet input, cheap (the real base is tested above)."""
    monkeypatch.setattr(cn, "BASE_LATENT_SIZE", (16, 16))


@pytest.fixture
def schedule_log(monkeypatch):
    """Every ControlNet schedule decision ("controlnet", step, n) and UNet one ("unet", step, n, flags), in order."""
    log = []
    real_runs, real_ops = cn.controlnet_runs, adapter.active_ops
    monkeypatch.setattr(cn, "controlnet_runs", lambda step, n: log.append(("controlnet", step, n)) or real_runs(step, n))
    monkeypatch.setattr(adapter, "active_ops", lambda model_type, h, w, step, n, **flags: log.append(
        ("unet", step, n, flags)) or real_ops(model_type, h, w, step, n, **flags))
    return log


def test_guess_mode_markers_pass_the_pipeline(small_base):
    pipe = apply(tiny.build_pipeline())
    spy = Spy(pipe)
    latents = tiny.generate(pipe, "text2img_guess", num_inference_steps=4)
    assert torch.isfinite(latents).all()
    # guess mode: the ControlNet sees the conditional half only; steps 0..2 (< 2.4)
    assert spy.controlnet == [(0, (1, 4, 16, 8), (1, 3, 128, 64))] * 3
    assert [s is None for s in spy.unet] == [False] * 3 + [True]


def test_multicontrolnet(small_base):
    pipe = apply(tiny.build_pipeline(multi=True))
    spy = Spy(pipe)
    latents = tiny.generate(pipe, "text2img", num_inference_steps=3, image=[tiny.control_image(), tiny.control_image(13)])
    assert torch.isfinite(latents).all()
    assert spy.controlnet == [(i, (2, 4, 16, 8), (2, 3, 128, 64)) for _ in range(2) for i in range(2)]
    assert [s is None for s in spy.unet] == [False, False, True]


def test_inpainting_with_euler(small_base):
    # Markers through the inpainting pipeline's guess mode; Euler: the step comes from scheduler.step_index.
    from diffusers import EulerDiscreteScheduler

    pipe = tiny.build_pipeline("inpaint")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    apply(pipe)
    spy = Spy(pipe)
    latents = tiny.generate(pipe, "inpaint", num_inference_steps=6, guess_mode=True)  # strength 0.7: n = 4
    assert torch.isfinite(latents).all()
    assert spy.controlnet == [(0, (1, 4, 16, 8), (1, 3, 128, 64))] * 3  # steps 0..2 (< 2.4)
    assert [s is None for s in spy.unet] == [False] * 3 + [True]


def test_without_raunet(small_base):
    # The original replaces the pipeline's call whatever apply_raunet says: the ControlNet schedule and the
    # residual resizing stay (the UNet's pre-call step must convert the residual kwargs before any RAU-Net check).
    pipe = apply(tiny.build_pipeline(), apply_raunet=False)
    spy = Spy(pipe)
    latents = tiny.generate(pipe, "text2img", num_inference_steps=3)
    assert torch.isfinite(latents).all()
    assert spy.unet[0][0] == (16, 8) and spy.unet[1:] == [spy.unet[0], None]


def direct_inputs(pipe):
    return dict(sample=torch.randn(2, 4, 32, 24), timestep=torch.tensor(500), encoder_hidden_states=torch.randn(2, 5, 32),
                controlnet_cond=tiny.control_image().repeat(2, 1, 1, 1),
                added_cond_kwargs=dict(text_embeds=torch.randn(2, 32), time_ids=torch.randn(2, 6)))


@pytest.mark.parametrize("return_dict", [True, False])
def test_direct_call_inside_denoising_step(small_base, return_dict):
    pipe = apply(tiny.build_pipeline())
    inputs = direct_inputs(pipe)
    with torch.no_grad(), denoising_step(pipe, step=0, num_steps=2):
        ran = pipe.controlnet(**inputs, return_dict=return_dict)
    with torch.no_grad(), denoising_step(pipe, step=2, num_steps=3):  # 2 >= 0.6 * 3
        skipped = pipe.controlnet(**inputs, return_dict=return_dict)
    with torch.no_grad():
        expected = type(pipe.controlnet).forward(
            pipe.controlnet, **dict(inputs, sample=torch.nn.functional.interpolate(inputs["sample"], (16, 8)),
                                    controlnet_cond=torch.nn.functional.interpolate(inputs["controlnet_cond"], (128, 64))),
            return_dict=False)
    if return_dict:
        assert type(ran).__name__ == type(skipped).__name__ == "ControlNetOutput"
        ran, skipped = (ran.down_block_res_samples, ran.mid_block_res_sample), (
            skipped.down_block_res_samples, skipped.mid_block_res_sample)
    assert all(torch.equal(a, b) for a, b in zip((*ran[0], ran[1]), (*expected[0], expected[1])))
    assert skipped == ((cn.NO_RESIDUAL,) * len(expected[0]), cn.NO_RESIDUAL)
    # outside a pipeline call and without denoising_step there is no step to decide with
    with pytest.raises(RuntimeError, match="denoising step"):
        pipe.controlnet(**inputs)


@pytest.mark.parametrize("case, scheduler, cut", [
    ("text2img", "DDIMScheduler", dict(denoising_end=0.6)), ("text2img", "EulerDiscreteScheduler", dict(denoising_end=0.6)),
    ("inpaint", "DDIMScheduler", dict(denoising_end=0.6)),
    # PNDM's timesteps 800 600 600 400 200 0: strength 0.6 starts the run on the second 600, 0.9 cuts the 0: the
    # first call's timestep is at both candidate starts, and this pipeline's n counts past the cut
    ("inpaint", "PNDMScheduler", dict(strength=0.6, denoising_end=0.9))])
def test_denoising_end_cuts_the_run(small_base, schedule_log, case, scheduler, cut):
    # These pipelines publish _num_timesteps before their denoising_end cut: the run is still steps 0..n-1 of the
    # n it runs, for the ControlNet and the UNet.
    pipe = tiny.build_pipeline(tiny.CASES[case][0])
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, skip_prk_steps=True)  # PNDM as SD sets it
    tiny.generate(apply(pipe), case, num_inference_steps=5, **cut)
    n = len(schedule_log) // 2
    steps = [entry[:3] for entry in schedule_log]
    assert n < 5 and steps == [(part, step, n) for step in range(n) for part in ("controlnet", "unet")]


def test_union_controlnet(small_base):
    # ControlNetUnionModel takes a list of conditioning images: each is resized.
    ControlNetUnionModel = getattr(diffusers, "ControlNetUnionModel", None)
    if ControlNetUnionModel is None:
        pytest.skip(f"diffusers {diffusers.__version__} has no ControlNetUnionModel (added in 0.32)")

    config = tiny.configs.unet_config("sdxl", "tiny")
    del config["up_block_types"], config["sample_size"]
    config.update(transformer_layers_per_block=1, conditioning_embedding_out_channels=(4, 4, 4, 4), num_control_type=2,
                  num_trans_channel=32, num_trans_head=2, num_proj_channel=32)
    pipe = tiny.build_pipeline()
    pipe.controlnet = tiny.configs.seed_weights(ControlNetUnionModel(**config), 3).eval()
    apply(pipe)
    spy = Spy(pipe)
    inputs = dict(direct_inputs(pipe), controlnet_cond=[direct_inputs(pipe)["controlnet_cond"]],
                  control_type=torch.tensor([[1.0, 0.0]] * 2), control_type_idx=[0])
    with torch.no_grad(), denoising_step(pipe, step=0, num_steps=3):
        pipe.controlnet(**inputs, return_dict=False)
    with torch.no_grad(), denoising_step(pipe, step=2, num_steps=3):
        skipped = pipe.controlnet(**inputs)
    assert spy.controlnet == [(0, (2, 4, 16, 8), (2, 3, 128, 64))]
    assert skipped.mid_block_res_sample is cn.NO_RESIDUAL and len(skipped.down_block_res_samples) == 9


def test_positional_arguments_are_resized(small_base):
    pipe = apply(tiny.build_pipeline())
    inputs = direct_inputs(pipe)
    spy = Spy(pipe)
    with torch.no_grad(), denoising_step(pipe, step=0, num_steps=2):
        pipe.controlnet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], inputs["controlnet_cond"],
                        added_cond_kwargs=inputs["added_cond_kwargs"], return_dict=False)
    assert spy.controlnet == [(0, (2, 4, 16, 8), (2, 3, 128, 64))]


def test_remove_and_reapply_restore_the_forward():
    pipe = tiny.build_pipeline()
    assert "forward" not in pipe.controlnet.__dict__
    apply(pipe)
    apply(pipe)  # re-applying replaces the override, never stacks it
    override = pipe.controlnet.__dict__["forward"]
    previous = override.args[-1]  # the forward it wraps
    assert previous.__func__ is type(pipe.controlnet).forward
    remove_hidiffusion(pipe)
    assert "forward" not in pipe.controlnet.__dict__


@pytest.mark.parametrize("settings", [dict(), dict(window_shift=2)], ids=["same_settings", "other_settings"])
def test_applying_to_another_pipeline_keeps_the_controlnet_schedule(small_base, settings):
    # from_pipe shares the UNet; applying HiDiffusion to the new pipeline, with the same settings (the UNet stays
    # as it is) or others (it is patched anew), leaves the ControlNet pipeline's schedule in place.
    pipe = apply(tiny.build_pipeline())
    other = apply(diffusers.StableDiffusionXLPipeline.from_pipe(pipe), **settings)
    spy = Spy(pipe)
    tiny.generate(pipe, "text2img", num_inference_steps=3)
    assert spy.controlnet == [(0, (2, 4, 16, 8), (2, 3, 128, 64))] * 2
    assert [s is None for s in spy.unet] == [False, False, True]
    remove_hidiffusion(other)
    assert "forward" not in pipe.controlnet.__dict__


def test_controlnet_set_after_apply_is_refused_until_applied_again(small_base):
    # A ControlNet swapped in after apply (a modular pipeline's update_components does that too) would run at
    # every step at full size: the UNet's first call refuses, and applying again schedules it.
    pipe = apply(tiny.build_pipeline())
    pipe.controlnet = tiny.tiny_controlnet(tiny.SEEDS["controlnet_2"])
    with pytest.raises(ValueError, match="ControlNet ran without the SDXL ControlNet schedule"):
        tiny.generate(pipe, "text2img", num_inference_steps=3)
    apply(pipe)
    spy = Spy(pipe)
    expected = tiny.generate(pipe, "text2img", num_inference_steps=3)
    assert spy.controlnet == [(0, (2, 4, 16, 8), (2, 3, 128, 64))] * 2
    pipe.controlnet = torch.compile(pipe.controlnet, backend="eager")  # compiled after apply: keeps its schedule
    assert torch.equal(tiny.generate(pipe, "text2img", num_inference_steps=3), expected)
    apply(pipe)  # and applying again does not patch it twice
    assert torch.equal(tiny.generate(pipe, "text2img", num_inference_steps=3), expected)


def test_modular_pipeline_given_a_controlnet_after_apply_is_refused_only_when_it_runs(small_base):
    # One modular pipeline runs every task: its ControlNet runs only for calls with a control image.
    classic = tiny.build_pipeline()
    modular = modular_sdxl_pipeline({k: v for k, v in classic.components.items() if k != "controlnet"})
    apply(modular)
    kwargs = dict(prompt=tiny.PROMPT, height=tiny.HEIGHT, width=tiny.WIDTH, num_inference_steps=2, output="latents")
    expected = modular(**kwargs, generator=torch.Generator().manual_seed(0))
    modular.update_components(controlnet=classic.controlnet)
    assert torch.equal(modular(**kwargs, generator=torch.Generator().manual_seed(0)), expected)
    with pytest.raises(ValueError, match="ControlNet ran without the SDXL ControlNet schedule"):
        modular(**kwargs, control_image=tiny.control_image())


@pytest.mark.parametrize("case", ["text2img", "img2img"])
def test_modular_pipeline_with_a_controlnet_runs_the_classic_pipelines_schedule(small_base, schedule_log, case):
    # The task comes from the call's inputs (a control image, and an image for img2img); the modular guider runs
    # CFG as two calls per step, each scheduled as the classic pipeline's one (ControlNet text-to-image flag too).
    classic = tiny.build_pipeline(tiny.CASES[case][0])
    modular = apply(modular_sdxl_pipeline(classic.components))
    tiny.generate(apply(classic), case, num_inference_steps=4)
    expected = [schedule_log[i:i + 2] for i in range(0, len(schedule_log), 2)]  # (controlnet, unet) per step
    schedule_log.clear()
    image = dict(image=tiny.control_image(seed=12), strength=tiny.CASES["img2img"][1]["strength"])
    modular(prompt=tiny.PROMPT, height=tiny.HEIGHT, width=tiny.WIDTH, num_inference_steps=4, output="latents",
            control_image=tiny.control_image(), **(image if case == "img2img" else {}))
    calls = [schedule_log[i:i + 2] for i in range(0, len(schedule_log), 2)]
    assert calls[::2] == calls[1::2] == expected


def test_another_unet_driven_by_hand_from_a_callback_is_not_checked_against_the_controlnet(small_base):
    pipe = apply(tiny.build_pipeline())
    other = apply(tiny.build_pipeline()).unet  # patched with no pipeline of its own: its ControlNet is not in it
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(encoder_hidden_states=torch.randn(1, 7, 32, generator=gen), added_cond_kwargs=dict(
        text_embeds=torch.randn(1, 32, generator=gen), time_ids=torch.randn(1, 6, generator=gen)))
    other_calls = []

    def preview(pipe, step, timestep, callback_kwargs):
        with torch.no_grad(), denoising_step(other, 0, 1):
            other_calls.append(other(torch.randn(1, 4, 8, 8, generator=gen), 500, **kwargs).sample)
        return callback_kwargs

    tiny.generate(pipe, "text2img", num_inference_steps=2, callback_on_step_end=preview)
    assert len(other_calls) == 2


def test_one_controlnet_shared_by_pipelines_of_two_unets(small_base):
    # One ControlNet loaded once for two UNets (a base model and a fine-tune): scheduled once, by the first apply,
    # holding neither UNet; each call takes the step of the generation it runs for.
    expected = tiny.generate(apply(tiny.build_pipeline()), "text2img", num_inference_steps=3)
    vanilla = tiny.generate(tiny.build_pipeline(), "text2img", num_inference_steps=3)
    first, second = tiny.build_pipeline(), tiny.build_pipeline()
    second.controlnet = first.controlnet
    apply(first)
    apply(second)
    for pipe in (first, second, first):
        assert torch.equal(tiny.generate(pipe, "text2img", num_inference_steps=3), expected)
    with torch.no_grad(), denoising_step(second, step=2, num_steps=3):  # driven by hand through the other UNet
        assert second.controlnet(**direct_inputs(second), return_dict=False)[1] is cn.NO_RESIDUAL
    # Removing HiDiffusion from either takes the schedule off the ControlNet: that one runs as without it, the
    # other refuses until applied again.
    for removed, other in ((second, first), (first, second)):
        remove_hidiffusion(removed)
        assert "forward" not in removed.controlnet.__dict__
        assert torch.equal(tiny.generate(removed, "text2img", num_inference_steps=3), vanilla)
        with pytest.raises(ValueError, match="removed since from another pipeline sharing it"):
            tiny.generate(other, "text2img", num_inference_steps=3)
        apply(other)
        assert torch.equal(tiny.generate(other, "text2img", num_inference_steps=3), expected)
        apply(removed)
    remove_hidiffusion(first)
    with torch.no_grad(), denoising_step(first, step=2, num_steps=3):  # a block of an unpatched UNet: plain
        assert second.controlnet(**direct_inputs(second), return_dict=False)[1].shape[-2:] == (8, 6)


def test_pipeline_called_inside_a_block_of_another_unet_keeps_its_steps(small_base):
    pipe = apply(tiny.build_pipeline())
    expected = tiny.generate(pipe, "text2img", num_inference_steps=3)
    other = apply(tiny.build_pipeline()).unet
    with denoising_step(other, step=2, num_steps=3):  # the other UNet's block, not this pipeline's
        assert torch.equal(tiny.generate(pipe, "text2img", num_inference_steps=3), expected)


def test_a_shared_controlnet_keeps_no_unet_alive(small_base):
    first, second = tiny.build_pipeline(), tiny.build_pipeline()
    second.controlnet = first.controlnet
    apply(first)  # schedules the ControlNet
    apply(second)
    first_unet = weakref.ref(first.unet)
    del first
    gc.collect()
    assert first_unet() is None
    assert torch.isfinite(tiny.generate(second, "text2img", num_inference_steps=3)).all()


def test_unet_set_after_apply_runs_the_controlnet_pipeline_without_hidiffusion(small_base):
    vanilla = tiny.generate(tiny.build_pipeline(), "text2img", num_inference_steps=3)
    pipe = apply(tiny.build_pipeline())
    pipe.unet = tiny.build_pipeline().unet
    with pytest.warns(UserWarning, match="UNet is not patched"):
        assert torch.equal(tiny.generate(pipe, "text2img", num_inference_steps=3), vanilla)
    remove_hidiffusion(pipe)
    assert torch.equal(tiny.generate(pipe, "text2img", num_inference_steps=3), vanilla)


@pytest.mark.parametrize("apply_first", [True, False], ids=["apply-then-offload", "offload-then-apply"])
def test_model_cpu_offload_keeps_the_schedule_and_remove_restores(small_base, apply_first):
    # Offload hooks set after apply wrap the schedule's override (accelerate keeps it as _old_forward).
    expected = tiny.generate(apply(tiny.build_pipeline()), "text2img", num_inference_steps=3)
    vanilla = tiny.generate(tiny.build_pipeline(), "text2img", num_inference_steps=3)
    pipe = tiny.build_pipeline()
    if apply_first:
        apply(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    if not apply_first:
        apply(pipe)
    assert torch.equal(tiny.generate(pipe, "text2img", num_inference_steps=3), expected)
    remove_hidiffusion(pipe)
    assert not cn.runs_schedule(pipe.controlnet) and hasattr(pipe.controlnet, "_hf_hook")  # the hook stays
    assert torch.equal(tiny.generate(pipe, "text2img", num_inference_steps=3), vanilla)


def test_a_failed_apply_leaves_a_shared_controlnet_scheduled(small_base, monkeypatch):
    first, second = tiny.build_pipeline(), tiny.build_pipeline()
    second.controlnet = first.controlnet
    apply(first)
    expected = tiny.generate(first, "text2img", num_inference_steps=3)

    def failing_install(*args):
        raise RuntimeError("install failed")

    monkeypatch.setattr(adapter, "_install", failing_install)
    with pytest.raises(RuntimeError, match="install failed"):
        apply(second)
    assert torch.equal(tiny.generate(first, "text2img", num_inference_steps=3), expected)


def test_sd15_type_and_no_controlnet_are_untouched():
    controlnet = torch.nn.Linear(1, 1)
    for model_type, pipe in (("sd15", types.SimpleNamespace(controlnet=controlnet, unet=None)),
                             ("sdxl", types.SimpleNamespace(controlnet=None, unet=None))):
        state = types.SimpleNamespace(model_type=model_type, undo=[])
        adapter._schedule_controlnets(state, [pipe])
        assert state.undo == []
        assert "forward" not in controlnet.__dict__


def test_unsupported_controlnet_is_refused():
    pipe = types.SimpleNamespace(controlnet=torch.nn.Linear(1, 1), unet=None)
    with pytest.raises(ValueError, match="Linear"):
        cn.check_sdxl_controlnet(pipe, "sdxl")
    cn.check_sdxl_controlnet(pipe, "sd15")


def test_deepcopy_of_the_pipeline_is_patched_on_its_own():
    pipe = apply(tiny.build_pipeline(), window_shift=1)
    twin = copy.deepcopy(pipe)
    expected = FIXTURES["original"]["text2img_k1"]
    assert tiny.rel_err(tiny.generate(twin, "text2img"), expected) < TOL
    remove_hidiffusion(twin)
    assert "forward" not in twin.controlnet.__dict__
    assert tiny.rel_err(tiny.generate(twin, "text2img"), FIXTURES["vanilla"]["text2img"]) < TOL
    assert tiny.rel_err(tiny.generate(pipe, "text2img"), expected) < TOL


def test_deepcopy_of_the_unet_alone_leaves_the_controlnet_behind():
    pipe = apply(tiny.build_pipeline())
    memo = {}
    twin = copy.deepcopy(pipe.unet, memo)
    assert id(pipe.controlnet) not in memo  # its patch's undo stays with the pipeline
    remove_hidiffusion(twin)
    assert "forward" in pipe.controlnet.__dict__
    remove_hidiffusion(pipe)
    assert "forward" not in pipe.controlnet.__dict__


def test_skipped_multicontrolnet_returns_a_tuple_as_its_forward_does(small_base):
    # MultiControlNetModel.forward returns a tuple whatever return_dict says
    pipe = apply(tiny.build_pipeline(multi=True))
    inputs = dict(direct_inputs(pipe), controlnet_cond=[tiny.control_image().repeat(2, 1, 1, 1)] * 2,
                  conditioning_scale=[1.0, 1.0])
    with torch.no_grad(), denoising_step(pipe, step=2, num_steps=3):
        skipped = pipe.controlnet(**inputs)
    assert type(skipped) is tuple and skipped[1] is cn.NO_RESIDUAL


def test_sdxl_turbo_gets_the_controlnet_schedule(small_base):
    pipe = apply(tiny.build_pipeline(), model_type="sdxl_turbo")
    spy = Spy(pipe)
    tiny.generate(pipe, "text2img", num_inference_steps=3)
    assert spy.controlnet == [(0, (2, 4, 16, 8), (2, 3, 128, 64))] * 2
    assert [s is None for s in spy.unet] == [False, False, True]
