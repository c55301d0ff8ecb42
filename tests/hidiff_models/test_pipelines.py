"""apply_hidiffusion on tiny real diffusers pipelines, built offline: step derivation, sharing, variants."""
import contextlib
import copy
import functools
import inspect
import json
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import accelerate
import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL, ControlNetModel, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
    LEditsPPPipelineStableDiffusion, PNDMScheduler,
    StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
    StableDiffusionAdapterPipeline, StableDiffusionPAGPipeline, StableDiffusionPanoramaPipeline,
    StableDiffusionPipeline, StableDiffusionSAGPipeline, StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline, StableDiffusionXLInstructPix2PixPipeline, StableDiffusionXLPipeline, T2IAdapter, UNet2DConditionModel,
)
from transformers import (
    CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
)

import hidiff_models.adapter as adapter
import hidiff_models.processors as processors
import hidiff_models.raunet as raunet
import hidiff_models
from hidiff_models import apply_hidiffusion, denoising_step, remove_hidiffusion
from hidiff_models.configs import build_unet, seed_weights
from hidiff_models.schedule import active_ops

from conftest import modular_sdxl_pipeline

PROMPT = "a photo of a cat"


def tiny_tokenizer(directory):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({f"{word}</w>": i + 2 for i, word in enumerate(["a", "photo", "of", "cat"])})
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=16)


def tiny_text_encoder(hidden, projection_dim=None):
    config = CLIPTextConfig(vocab_size=8, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=projection_dim or hidden)
    torch.manual_seed(0)
    return (CLIPTextModelWithProjection if projection_dim else CLIPTextModel)(config).eval()


def tiny_vae():
    """Four blocks: the usual 8x latent scale, so 64x64 px are 8x8 latents."""
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                         layers_per_block=1, sample_size=64).eval()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    return dict(tokenizer=tokenizer, vae=tiny_vae(), sd15_unet=build_unet("sd15", seed=2), sdxl_unet=build_unet("sdxl", seed=2),
                sd15_text=tiny_text_encoder(32), sdxl_text=tiny_text_encoder(16), sdxl_text_2=tiny_text_encoder(16, 32))


def sd15_pipe(parts, cls=StableDiffusionPipeline, scheduler=DDIMScheduler, unet=None, **extra):
    return cls(vae=parts["vae"], text_encoder=parts["sd15_text"], tokenizer=parts["tokenizer"],
               unet=unet or copy.deepcopy(parts["sd15_unet"]), scheduler=scheduler(), safety_checker=None,
               feature_extractor=None, requires_safety_checker=False, **extra)


def sdxl_pipe(parts):
    return StableDiffusionXLPipeline(
        vae=parts["vae"], text_encoder=parts["sdxl_text"], text_encoder_2=parts["sdxl_text_2"],
        tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer"], unet=copy.deepcopy(parts["sdxl_unet"]),
        scheduler=EulerDiscreteScheduler())


def generate(pipe, steps=4, seed=0, **kwargs):
    kwargs = dict(dict(prompt=PROMPT, height=64, width=64, output_type="latent", guidance_scale=5.0), **kwargs)
    return pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture
def schedule_log(monkeypatch):
    """Every (step, n, flags) the adapter schedules, in call order."""
    log = []
    real = adapter.active_ops

    def logged(model_type, height, width, step, n, **flags):
        log.append((step, n, flags))
        return real(model_type, height, width, step, n, **flags)

    monkeypatch.setattr(adapter, "active_ops", logged)
    return log


def test_apply_and_remove_on_pipeline(parts, schedule_log):
    pipe = sd15_pipe(parts)
    expected = generate(pipe)
    assert apply_hidiffusion(pipe, backend="torch") is pipe
    assert type(pipe).__name__ == "StableDiffusionPipeline" and isinstance(pipe, StableDiffusionPipeline)
    assert type(pipe.unet) is UNet2DConditionModel  # from_pipe keeps only components of the exact class
    patched = generate(pipe)
    assert not torch.equal(patched, expected)
    assert [(s, n) for s, n, _ in schedule_log] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    remove_hidiffusion(pipe)
    assert type(pipe) is StableDiffusionPipeline
    assert torch.equal(generate(pipe), expected)


def test_applying_twice_to_a_pipeline_and_remove(parts):
    pipe = sd15_pipe(parts)
    apply_hidiffusion(pipe, backend="torch")
    tracking = type(pipe)
    apply_hidiffusion(pipe, backend="torch")  # same settings
    apply_hidiffusion(pipe, backend="torch", window_shift=2)  # other settings
    assert type(pipe) is tracking and type(pipe).__mro__[1] is StableDiffusionPipeline
    remove_hidiffusion(pipe)
    assert type(pipe) is StableDiffusionPipeline


@pytest.mark.parametrize("bad_call", [
    lambda pipe: pipe(PROMPT, prompt=PROMPT),  # prompt twice
    lambda pipe: pipe(*[None] * 60),  # more positional arguments than __call__ takes
], ids=["argument-twice", "too-many-positional"])
def test_a_call_the_pipeline_refuses_raises_the_pipelines_own_type_error(parts, bad_call):
    # The tracking __call__ reads the arguments by binding them to the pipeline's signature; where they do not
    # bind, the pipeline's own __call__ must refuse them, with its own message (not inspect's), and the refused
    # call must leave no pipeline call published.
    with pytest.raises(TypeError) as unpatched:
        bad_call(sd15_pipe(parts))
    pipe = apply_hidiffusion(sd15_pipe(parts), backend="torch")
    with pytest.raises(TypeError) as patched:
        bad_call(pipe)
    assert str(patched.value) == str(unpatched.value)
    assert "StableDiffusionPipeline.__call__()" in str(patched.value)
    assert hidiff_models.steps.pipeline_call() is None


class Interrupt(Exception):
    pass


def interrupt_at_step_2(pipe, step, timestep, callback_kwargs):
    if step == 2:
        raise Interrupt
    return callback_kwargs


def stop_after_step_2(pipe, step, timestep, callback_kwargs):
    if step == 2:
        pipe._interrupt = True  # diffusers' own way: the loop skips the remaining steps and returns
    return callback_kwargs


@pytest.mark.parametrize("scheduler", [DDIMScheduler, EulerDiscreteScheduler])
@pytest.mark.parametrize("interrupt, raised", [(interrupt_at_step_2, Interrupt), (stop_after_step_2, None)])
def test_interrupted_generation_does_not_shift_the_next(parts, schedule_log, scheduler, interrupt, raised):
    pipe = apply_hidiffusion(sd15_pipe(parts, scheduler=scheduler), backend="torch")
    fresh = generate(pipe)
    with pytest.raises(raised) if raised else contextlib.nullcontext():
        generate(pipe, callback_on_step_end=interrupt)
    assert torch.equal(generate(pipe), fresh)
    assert [s for s, _, _ in schedule_log] == [0, 1, 2, 3] + [0, 1, 2] + [0, 1, 2, 3]


def test_error_inside_the_unet_leaks_nothing(parts, schedule_log):
    # An error in the middle of a UNet call (the mid block, while RAD-conv widens the conv LoRA's down
    # projection) leaves no geometry, step or phase behind for the next generation.
    pipe = apply_hidiffusion(sd15_pipe(parts), backend="torch")
    add_lora(pipe.unet, ["down_blocks.0.downsamplers.0.conv"])
    fresh = generate(pipe)

    def fail(module, args, output):
        raise Interrupt

    handle = pipe.unet.mid_block.register_forward_hook(fail)
    with pytest.raises(Interrupt):
        generate(pipe)
    handle.remove()
    assert schedule_log[4][:2] == (0, 4) and active_ops("sd15", 8, 8, 0, 4).rad_conv  # it failed inside RAD-conv
    assert pipe.unet.down_blocks[0].downsamplers[0].conv.lora_A["default"].stride == (2, 2)
    assert torch.equal(generate(pipe), fresh)


def test_pipelines_sharing_a_unet_keep_their_own_steps(parts):
    first = apply_hidiffusion(sd15_pipe(parts), backend="torch")
    second = apply_hidiffusion(sd15_pipe(parts, scheduler=EulerDiscreteScheduler, unet=first.unet), backend="torch")
    solo_first, solo_second = generate(first, steps=4), generate(second, steps=3)
    # alternating calls, and the second pipeline run from inside the first one's loop
    assert torch.equal(generate(second, steps=3), solo_second)
    nested = []

    def run_second(pipe, step, timestep, callback_kwargs):
        if step == 1:
            nested.append(generate(second, steps=3))
        return callback_kwargs

    assert torch.equal(generate(first, steps=4, callback_on_step_end=run_second), solo_first)
    assert torch.equal(nested[0], solo_second)


def test_unet_call_by_hand_in_a_callback_leaves_the_generation_alone(parts, schedule_log):
    pipe = apply_hidiffusion(sd15_pipe(parts), backend="torch")
    fresh = generate(pipe)

    def preview(pipe, step, timestep, callback_kwargs):  # e.g. a look-ahead denoise of the latents
        latents, text = callback_kwargs["latents"], torch.ones(1, 7, 32)
        with torch.no_grad(), denoising_step(pipe.unet, 0, 4):
            pipe.unet(latents, timestep, encoder_hidden_states=text)
        with torch.no_grad(), pytest.raises(RuntimeError, match="not found exactly once"):
            pipe.unet(latents, 7, encoder_hidden_states=text)  # no step given, nor one of the run's timesteps
        return callback_kwargs

    assert torch.equal(generate(pipe, callback_on_step_end=preview), fresh)
    assert [s for s, _, _ in schedule_log] == [0, 1, 2, 3] + [0, 0, 1, 0, 2, 0, 3, 0]


def test_unet_call_by_hand_after_the_last_step_is_refused(parts):
    pipe = apply_hidiffusion(sd15_pipe(parts, scheduler=EulerDiscreteScheduler), backend="torch")

    def preview(pipe, step, timestep, callback_kwargs):  # Euler's step_index is past the last step here
        if step == 3:
            pipe.unet(callback_kwargs["latents"], timestep, encoder_hidden_states=torch.ones(1, 7, 32))
        return callback_kwargs

    with torch.no_grad(), pytest.raises(RuntimeError, match="derived step 4 is outside .* a UNet call from a callback"):
        generate(pipe, callback_on_step_end=preview)


def test_from_pipe_shares_the_patched_unet(parts):
    pipe = apply_hidiffusion(sd15_pipe(parts), backend="torch")
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    assert img2img.unet is pipe.unet
    img2img_args = dict(steps=8, image=torch.rand(1, 3, 64, 64), strength=0.5, height=None, width=None)
    with pytest.raises(RuntimeError, match="from_pipe needs its own apply_hidiffusion"):
        generate(img2img, **img2img_args)
    apply_hidiffusion(img2img, backend="torch")
    solo = apply_hidiffusion(sd15_pipe(parts, cls=StableDiffusionImg2ImgPipeline), backend="torch")
    assert torch.equal(generate(img2img, **img2img_args), generate(solo, **img2img_args))
    assert torch.equal(generate(pipe), generate(apply_hidiffusion(sd15_pipe(parts), backend="torch")))


def test_a_unet_set_after_apply_warns_that_the_call_runs_without_hidiffusion(parts):
    pipe = apply_hidiffusion(sd15_pipe(parts), backend="torch")
    pipe.unet = copy.deepcopy(parts["sd15_unet"])  # a modular pipeline's update_components(unet=...) does this too
    with pytest.warns(UserWarning, match="UNet is not patched"):
        assert torch.equal(generate(pipe, steps=2), generate(sd15_pipe(parts), steps=2))
    apply_hidiffusion(pipe, backend="torch")
    pipe.unet = torch.compile(pipe.unet, backend="eager")  # compiled after apply: the patched UNet still
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(pipe, steps=1)
    assert not [w for w in caught if "HiDiffusion" in str(w.message)]
    remove_hidiffusion(pipe.unet)  # from the UNet alone: the pipeline still tracks its calls
    with pytest.warns(UserWarning, match="removed since, through the UNet"):
        generate(pipe, steps=1)


def in_threads(fn, args):
    """[fn(a) for a in args], run in a thread pool that switches threads often."""
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(fn, args))
    finally:
        sys.setswitchinterval(switch_interval)


def request(shared, prompt_embeds, **kwargs):
    """A server's request (diffusers' server example): a from_pipe pipeline with its own scheduler, applied,
    then called. The prompt is encoded once beforehand: the tokenizer and text encoder shared by the requests
    give different results across threads now and then, without HiDiffusion too."""
    pipe = StableDiffusionPipeline.from_pipe(shared, scheduler=DDIMScheduler.from_config(shared.scheduler.config))
    apply_hidiffusion(pipe, backend="torch", window_shift=kwargs.pop("window_shift", None))
    return generate(pipe, prompt=None, prompt_embeds=prompt_embeds[0], negative_prompt_embeds=prompt_embeds[1],
                    **kwargs)


def test_concurrent_requests_share_one_patched_unet(parts):
    # Concurrent calls of the shared UNet (its per-call schedule, window phases, RAU-Net sizes) and applies with
    # the same settings must not disturb one another.
    shared = apply_hidiffusion(sd15_pipe(parts), backend="torch")
    embeds = shared.encode_prompt(PROMPT, "cpu", 1, True)

    def run(seed):
        return request(shared, embeds, steps=6, seed=seed, height=96, width=96)

    solo = [run(seed) for seed in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(in_threads(run, range(4)), solo))


def test_concurrent_applies_with_other_settings_leave_a_consistent_unet(parts):
    # Each apply patches the shared UNet anew (generations in progress go on with the new settings): no call may
    # fail, and the UNet must end up patched exactly once.
    shared = sd15_pipe(parts)
    embeds = shared.encode_prompt(PROMPT, "cpu", 1, True)
    vanilla = generate(shared)
    in_threads(lambda k: request(shared, embeds, steps=3, window_shift=k % 4), range(8))
    remove_hidiffusion(shared)
    assert torch.equal(generate(shared), vanilla)
    expected = generate(apply_hidiffusion(sd15_pipe(parts), backend="torch", window_shift=1))
    assert torch.equal(request(shared, embeds, window_shift=1), expected)


# The usual SD/SDXL samplers of diffusers. IPNDM has no add_noise, so no img2img.
SCHEDULERS = ["CosineDPMSolverMultistepScheduler", "DDIMScheduler", "DDPMScheduler", "DEISMultistepScheduler",
              "DPMSolverMultistepScheduler", "DPMSolverSDEScheduler", "DPMSolverSinglestepScheduler",
              "EDMDPMSolverMultistepScheduler", "EDMEulerScheduler", "EulerAncestralDiscreteScheduler",
              "EulerDiscreteScheduler", "HeunDiscreteScheduler", "IPNDMScheduler", "KDPM2AncestralDiscreteScheduler",
              "KDPM2DiscreteScheduler", "LCMScheduler", "LMSDiscreteScheduler", "PNDMScheduler", "SASolverScheduler",
              "TCDScheduler", "UniPCMultistepScheduler"]


@pytest.mark.parametrize("cls", [StableDiffusionPipeline, StableDiffusionImg2ImgPipeline], ids=["text2img", "img2img"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own, thousands with numpy 2
def test_every_scheduler_gives_each_unet_call_its_step(parts, schedule_log, scheduler, cls):
    if cls is StableDiffusionImg2ImgPipeline and scheduler == "IPNDMScheduler":
        pytest.skip("IPNDMScheduler has no add_noise")
    if not hasattr(diffusers, scheduler):
        pytest.skip(f"diffusers {diffusers.__version__} has no {scheduler}")
    try:
        getattr(diffusers, scheduler)().set_timesteps(5)
    except ValueError as error:  # diffusers 0.30's DPMSolverSinglestepScheduler with a current torch
        pytest.skip(f"{scheduler} of diffusers {diffusers.__version__} fails on its own: {error}")
    pipe = apply_hidiffusion(sd15_pipe(parts, cls=cls, scheduler=getattr(diffusers, scheduler)), backend="torch")
    kwargs = dict(steps=5)
    if cls is StableDiffusionImg2ImgPipeline:
        kwargs.update(image=torch.rand(1, 3, 64, 64), strength=0.6, height=None, width=None)
    generate(pipe, **kwargs)
    calls = pipe._num_timesteps  # the UNet calls of this run: 2 per step but the last for Heun, KDPM2, DPMSolverSDE
    assert calls >= 3
    assert [(s, n) for s, n, _ in schedule_log] == [(s, calls) for s in range(calls)]


def sd15_pndm():
    """SD1.5's own scheduler (its scheduler_config.json): PLMS, which runs its second timestep twice."""
    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                         set_alpha_to_one=False, steps_offset=1)


def test_pndm_interrupted_run_does_not_shift_the_next(parts, schedule_log):
    # PNDM's position is its own count of step calls (a repeated timestep is no position): an interrupted run
    # leaves that count behind, and the next run's set_timesteps resets it. 8 steps are 9 UNet calls.
    pipe = apply_hidiffusion(sd15_pipe(parts, scheduler=sd15_pndm), backend="torch")
    fresh = generate(pipe, steps=8)
    with pytest.raises(Interrupt):
        generate(pipe, steps=8, callback_on_step_end=interrupt_at_step_2)
    assert torch.equal(generate(pipe, steps=8), fresh)
    run = [(s, 9) for s in range(9)]
    assert [(s, n) for s, n, _ in schedule_log] == run + run[:3] + run


@pytest.mark.parametrize("sets_begin_index", [True, False], ids=["begin-index", "no-begin-index"])
@pytest.mark.parametrize("scheduler", [DDIMScheduler, EulerDiscreteScheduler])
def test_img2img_counts_the_truncated_steps(parts, schedule_log, scheduler, sets_begin_index):
    pipe = apply_hidiffusion(sd15_pipe(parts, cls=StableDiffusionImg2ImgPipeline, scheduler=scheduler), backend="torch")
    # Custom pipelines and some older ones (diffusers 0.30's SDXL ControlNet inpaint) set no begin_index:
    # step_index then counts from timesteps[0].
    if not sets_begin_index:
        pipe.scheduler.set_begin_index = lambda begin_index=0: None
    image = torch.rand(1, 3, 64, 64)
    generate(pipe, steps=8, image=image, strength=0.5, height=None, width=None)
    assert [(s, n) for s, n, _ in schedule_log] == [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_img2img_run_starting_on_a_repeated_timestep(parts, schedule_log):
    # DPM-Solver++ with Karras sigmas rounds its last sigmas to equal timesteps: strength 0.06 of 50 steps runs
    # [1, 1, 0], and the scheduler sets step_index only at its first step().
    scheduler = functools.partial(DPMSolverMultistepScheduler, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, use_karras_sigmas=True)
    pipe = apply_hidiffusion(sd15_pipe(parts, cls=StableDiffusionImg2ImgPipeline, scheduler=scheduler), backend="torch")
    generate(pipe, steps=50, image=torch.rand(1, 3, 64, 64), strength=0.06, height=None, width=None)
    assert pipe.scheduler.timesteps[-3:].tolist() == [1, 1, 0]
    assert [(s, n) for s, n, _ in schedule_log] == [(0, 3), (1, 3), (2, 3)]


def test_run_of_a_tail_without_num_timesteps_or_begin_index(parts, schedule_log):
    # LEdits++ runs the last 10 of the 12 timesteps its invert() left (skip=0.2) and tells neither n nor the
    # start: the run starts at its first UNet call's timestep.
    pipe = sd15_pipe(parts, cls=LEditsPPPipelineStableDiffusion,
                     scheduler=functools.partial(DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++"))
    image = torch.rand(1, 3, 64, 64)
    pipe.invert(image=image, num_inversion_steps=10, skip=0.2, generator=torch.Generator().manual_seed(0))
    apply_hidiffusion(pipe, backend="torch")
    with pytest.warns(UserWarning, match="processors were replaced") as caught:  # LEdits++ sets its own processors
        pipe(editing_prompt=["cat"], output_type="latent", generator=torch.Generator().manual_seed(0))
    assert sum("processors were replaced" in str(w.message) for w in caught) == 1  # once per pipeline call
    assert len(pipe.scheduler.timesteps) == 12
    assert [(s, n) for s, n, _ in schedule_log] == [(s, 10) for s in range(10)]
    with pytest.raises(RuntimeError, match=r"invert\(\): run it before apply_hidiffusion"):
        pipe.invert(image=image, num_inversion_steps=10, skip=0.2)


@pytest.mark.parametrize("name, inpainting", [("org/sd-base", False), ("org/sd-inpainting", True)])
def test_inpainting_schedule_follows_the_checkpoint_not_the_pipeline(parts, schedule_log, name, inpainting):
    # The original turns SDXL's aggressive mode off for a checkpoint named "inpainting", whatever its pipeline:
    # SDXL base in an inpainting pipeline runs it.
    pipe = sd15_pipe(parts, cls=StableDiffusionInpaintPipeline)
    pipe.register_to_config(_name_or_path=name)
    apply_hidiffusion(pipe, backend="torch")
    out = generate(pipe, steps=3, image=torch.rand(1, 3, 64, 64), mask_image=torch.ones(1, 1, 64, 64))
    assert torch.isfinite(out).all()
    expected = dict(controlnet=False, inpainting=inpainting, playground=False)
    assert [flags for _, _, flags in schedule_log] == [expected] * 3


def test_controlnet_residuals_follow_rau_sizes(parts, schedule_log, monkeypatch):
    additions = []  # (residual size, feature size) of every ControlNet residual the UNet adds
    add = raunet.ResizedResidual.__torch_function__

    def spy(cls, func, types, args=(), kwargs=None):
        additions.append((tuple(args[1].tensor.shape[-2:]), tuple(args[0].shape[-2:])))
        return add(func, types, args, kwargs)

    monkeypatch.setattr(raunet.ResizedResidual, "__torch_function__", classmethod(spy))
    unet = copy.deepcopy(parts["sd15_unet"])
    controlnet = seed_weights(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8)), 3)
    pipe = apply_hidiffusion(sd15_pipe(parts, cls=StableDiffusionControlNetPipeline, unet=unet,
                                       controlnet=controlnet.eval()), backend="torch")
    out = generate(pipe, steps=5, image=torch.rand(1, 3, 64, 64))
    assert torch.isfinite(out).all()
    # sd15_1024, n = 5: RAD-conv (deep maps 4x smaller than the ControlNet's) at steps 0 and 1
    assert [active_ops("sd15", 8, 8, s, n, **f).rad_conv for s, n, f in schedule_log] == [True] * 2 + [False] * 3
    assert all(flags["controlnet"] for _, _, flags in schedule_log)
    # 12 skip residuals + mid per UNet call. At step 0 RAD-conv maps 8x8 to 2x2 where the ControlNet has 4x4.
    assert len(additions) == 5 * 13
    assert additions[:13] == [((8, 8), (8, 8))] * 3 + [((4, 4), (2, 2))] * 3 + [((2, 2), (1, 1))] * 3 + [
        ((1, 1), (1, 1))] * 4
    assert all(residual == feature for residual, feature in additions[2 * 13:])


def test_sdxl_pipeline_and_turbo_detection(parts, schedule_log):
    pipe = sdxl_pipe(parts)
    expected = generate(pipe, steps=3)
    apply_hidiffusion(pipe, backend="torch")
    assert pipe.unet._hidiffusion.model_type == "sdxl"
    assert torch.isfinite(generate(pipe, steps=3)).all()
    assert [(s, n) for s, n, _ in schedule_log] == [(0, 3), (1, 3), (2, 3)]
    pipe.register_to_config(_name_or_path="stabilityai/sdxl-turbo")
    apply_hidiffusion(pipe, backend="torch")
    assert pipe.unet._hidiffusion.model_type == "sdxl_turbo"
    remove_hidiffusion(pipe)
    assert torch.equal(generate(pipe, steps=3), expected)


@pytest.mark.parametrize("scheduler", [EulerDiscreteScheduler, DDIMScheduler])
def test_sdxl_base_and_refiner_ensemble_steps(parts, schedule_log, scheduler):
    # denoising_end runs the head of the schedule, denoising_start its tail: n counts the steps each one runs.
    base = sdxl_pipe(parts)
    base.scheduler = scheduler()
    apply_hidiffusion(base, backend="torch")
    latents = generate(base, steps=10, denoising_end=0.6)
    refiner = apply_hidiffusion(StableDiffusionXLImg2ImgPipeline.from_pipe(base), backend="torch")
    generate(refiner, steps=10, denoising_start=0.6, image=latents, height=None, width=None)
    assert [(s, n) for s, n, _ in schedule_log] == [(s, 6) for s in range(6)] + [(s, 4) for s in range(4)]


def test_denoising_end_passed_by_position(parts, schedule_log):
    base = sdxl_pipe(parts)
    base.scheduler = DDIMScheduler()  # no begin_index: the run's start comes from denoising_end's cutoff
    apply_hidiffusion(base, backend="torch")
    parameters = list(inspect.signature(StableDiffusionXLPipeline.__call__).parameters.values())[1:]
    values = dict(prompt=PROMPT, height=64, width=64, num_inference_steps=10, denoising_end=0.6)
    names = [p.name for p in parameters]
    args = [values.get(p.name, p.default) for p in parameters[:names.index("denoising_end") + 1]]
    base(*args, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert [(s, n) for s, n, _ in schedule_log] == [(s, 6) for s in range(6)]


def test_modular_pipeline_runs_the_schedule_of_the_classic_pipeline_for_the_same_task(parts, schedule_log):
    # One modular SDXL pipeline class runs every task, chosen by the call's inputs (all taken as **kwargs, or from
    # a PipelineState); each step's UNet calls (two: its guider runs CFG as separate calls) get what the classic
    # pipeline's call gets.
    classic = sdxl_pipe(parts)
    modular = modular_sdxl_pipeline(classic.components)
    from diffusers.modular_pipelines import PipelineState  # there, since the line above did not skip
    apply_hidiffusion(modular, backend="torch")
    images = dict(image=torch.rand(1, 3, 64, 64), mask_image=(torch.rand(1, 1, 64, 64) > 0.5).float())
    state = PipelineState()
    for name, value in images.items():
        state.set(name, value)
    # what its VAE-encoder blocks, run on their own (a node), make of the images
    encoder = modular.blocks.sub_blocks["vae_encoder"].init_pipeline()
    encoder.update_components(**{name: getattr(modular, name) for name in encoder.component_names})
    latents = encoder(**images, height=64, width=64, output=["image_latents", "mask"])
    inpaint = StableDiffusionXLInpaintPipeline.from_pipe(classic)
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(classic)
    for pipe in (classic, inpaint, img2img):
        apply_hidiffusion(pipe, backend="torch")
    for task, pipe, kwargs, modular_kwargs in [
        ("denoising_end", classic, dict(denoising_end=0.6), dict(denoising_end=0.6)),
        ("image-to-image", img2img, dict(image=images["image"], strength=0.6),
         dict(image=images["image"], strength=0.6)),
        ("inpainting", inpaint, dict(images, strength=0.99), dict(images, strength=0.99)),
        ("inpainting from a state", inpaint, dict(images, strength=0.99), dict(state=state, strength=0.99)),
        ("inpainting from latents", inpaint, dict(images, strength=0.99), dict(latents, strength=0.99)),
    ]:
        schedule_log.clear()
        generate(pipe, steps=10, **kwargs)
        expected = schedule_log[:]
        schedule_log.clear()
        modular(prompt=PROMPT, height=64, width=64, num_inference_steps=10, output="latents",
                generator=torch.Generator().manual_seed(0), **modular_kwargs)
        assert schedule_log[::2] == schedule_log[1::2] == expected, task


@pytest.mark.parametrize("prk_steps", [False, True], ids=["plms", "prk"])
def test_modular_pndm_run_starting_on_a_repeated_timestep(parts, schedule_log, prk_steps):
    # PNDM runs timesteps twice in a row (PLMS its second, PRK several): at 10 steps, strength 0.85 starts the run
    # on the second copy, which a modular pipeline (it publishes no step count) does not tell. PNDM's next step
    # tells: from there on each call gets the classic pipeline's n; at step 0 n may be one too large.
    classic = sdxl_pipe(parts)
    classic.scheduler = PNDMScheduler(skip_prk_steps=not prk_steps)
    modular = apply_hidiffusion(modular_sdxl_pipeline(classic.components), backend="torch")
    img2img = apply_hidiffusion(StableDiffusionXLImg2ImgPipeline.from_pipe(classic), backend="torch")
    image = torch.rand(1, 3, 64, 64)
    generate(img2img, steps=10, image=image, strength=0.85)
    expected = [(s, n) for s, n, _ in schedule_log]
    n = expected[0][1]
    assert expected == [(s, n) for s in range(n)]
    schedule_log.clear()
    modular(prompt=PROMPT, height=64, width=64, num_inference_steps=10, output="latents", image=image,
            strength=0.85)
    calls = [(s, m) for s, m, _ in schedule_log]
    assert {s for s, _ in calls} == set(range(n))
    assert all(m == n for s, m in calls if s > 0) and all(m in (n, n + 1) for s, m in calls if s == 0)


def test_modular_pipeline_given_a_unet_after_apply_warns(parts):
    modular = modular_sdxl_pipeline(sdxl_pipe(parts).components)
    apply_hidiffusion(modular, backend="torch")
    modular.update_components(unet=copy.deepcopy(parts["sdxl_unet"]))
    with pytest.warns(UserWarning, match="UNet is not patched"):
        modular(prompt=PROMPT, height=64, width=64, num_inference_steps=1, output="latents")


def test_keywords_a_classic_pipeline_ignores_change_nothing(parts):
    # Its **kwargs takes (and ignores) any keyword: a denoising_end or state there is no input of its call.
    pipe = apply_hidiffusion(sd15_pipe(parts), backend="torch")
    assert torch.equal(generate(pipe, steps=6, denoising_end=0.5, state={}), generate(pipe, steps=6))


@pytest.mark.parametrize("scheduler", [EulerDiscreteScheduler, DDIMScheduler])
def test_denoising_end_in_a_pipeline_without_num_timesteps(parts, schedule_log, scheduler):
    # SDXL InstructPix2Pix publishes no _num_timesteps: n comes from denoising_end's cutoff, not the full schedule.
    unet = seed_weights(UNet2DConditionModel(**dict(parts["sdxl_unet"].config, in_channels=8)), 2).eval()
    pipe = StableDiffusionXLInstructPix2PixPipeline(
        vae=parts["vae"], text_encoder=parts["sdxl_text"], text_encoder_2=parts["sdxl_text_2"],
        tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer"], unet=unet, scheduler=scheduler())
    apply_hidiffusion(pipe, backend="torch")
    generate(pipe, steps=10, image=torch.rand(1, 3, 64, 64), denoising_end=0.6)
    assert not hasattr(pipe, "_num_timesteps")
    assert [(s, n) for s, n, _ in schedule_log] == [(s, 6) for s in range(6)]


@pytest.mark.parametrize("scheduler", [EulerDiscreteScheduler, DDIMScheduler])
@pytest.mark.parametrize("kwargs, n", [
    (dict(strength=0.9, denoising_end=0.7), 6),  # 10 steps: strength keeps the last 9, the end cut the first 6 of them
    (dict(denoising_start=0.2, denoising_end=0.7), 5),  # the middle of the schedule: 700 ... 300 of 900 ... 0
], ids=["strength", "start"])
def test_img2img_cut_at_both_ends(parts, schedule_log, scheduler, kwargs, n):
    # An ensemble's middle stage: neither the head nor the tail of the scheduler's timesteps (DDIM sets no
    # begin_index, so the run's start comes from denoising_end's cutoff).
    pipe = StableDiffusionXLImg2ImgPipeline(**sdxl_pipe(parts).components)
    pipe.scheduler = scheduler()
    apply_hidiffusion(pipe, backend="torch")
    generate(pipe, steps=10, image=torch.randn(1, 4, 8, 8), height=None, width=None, **kwargs)
    assert [(s, m) for s, m, _ in schedule_log] == [(s, n) for s in range(n)]


def test_img2img_cut_from_a_repeated_timestep(parts, schedule_log):
    # PNDM's timesteps 901 801 801 701 ... 1: strength 0.9 starts the run on the first 801, denoising_end 0.95 cuts
    # the 1. Both starts the run can have (n counted to the cut, as here, or past it) are at 801: the first is this
    # pipeline's.
    pipe = StableDiffusionXLImg2ImgPipeline(**sdxl_pipe(parts).components)
    pipe.scheduler = PNDMScheduler(skip_prk_steps=True)
    apply_hidiffusion(pipe, backend="torch")
    generate(pipe, steps=10, image=torch.randn(1, 4, 8, 8), height=None, width=None, strength=0.9, denoising_end=0.95)
    assert [(s, m) for s, m, _ in schedule_log] == [(s, 9) for s in range(9)]


@pytest.mark.parametrize("cls, kwargs, calls_per_step", [
    (StableDiffusionPanoramaPipeline, dict(height=512, width=640), 3),  # three 64x64-latent views a step
    (StableDiffusionSAGPipeline, dict(sag_scale=0.75), 2),  # and a degraded pass a step
], ids=["panorama", "self-attention-guidance"])
def test_several_unet_calls_per_step(parts, schedule_log, cls, kwargs, calls_per_step):
    pipe = sd15_pipe(parts, cls=cls)
    vanilla = generate(pipe, steps=2, **kwargs)
    patched = generate(apply_hidiffusion(pipe, backend="torch"), steps=2, **kwargs)
    assert torch.isfinite(patched).all() and not torch.equal(patched, vanilla)
    assert [(s, n) for s, n, _ in schedule_log] == [(s, 2) for s in range(2) for _ in range(calls_per_step)]


def test_several_images_per_prompt(parts):
    pipe = apply_hidiffusion(sd15_pipe(parts), backend="torch", window_shift=1)
    images = generate(pipe, steps=3, num_images_per_prompt=2, output_type="np")
    assert images.shape == (2, 64, 64, 3)


def test_model_cpu_offload_before_and_after_apply(parts):
    pipe = sd15_pipe(parts)
    try:
        pipe.enable_model_cpu_offload(device="cpu")
    except Exception as error:  # noqa: BLE001 - any refusal means offload is unavailable here
        pytest.skip(f"enable_model_cpu_offload does not work on this CPU-only machine: {error}")
    plain = apply_hidiffusion(sd15_pipe(parts), backend="torch")
    expected = generate(plain)
    apply_hidiffusion(pipe, backend="torch")
    assert torch.equal(generate(pipe), expected)
    late = apply_hidiffusion(sd15_pipe(parts), backend="torch")
    late.enable_model_cpu_offload(device="cpu")
    assert torch.equal(generate(late), expected)


@pytest.mark.parametrize("apply_first", [True, False], ids=["apply-then-offload", "offload-then-apply"])
def test_sequential_offload(parts, apply_first):
    # The hooks enable_sequential_cpu_offload puts on every module (weights on the meta device between calls,
    # brought in by each module's forward), on the UNet alone: this machine's tiny text encoder cannot be offloaded.
    expected = generate(apply_hidiffusion(sd15_pipe(parts), backend="torch"))
    pipe = sd15_pipe(parts)
    if apply_first:
        apply_hidiffusion(pipe, backend="torch")
    accelerate.cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
    if not apply_first:
        apply_hidiffusion(pipe, backend="torch")
    assert pipe.unet.down_blocks[0].downsamplers[0].conv.weight.is_meta
    assert torch.equal(generate(pipe), expected)


ATTENTION_LORA = ["to_q", "to_k", "to_v", "to_out.0"]
CONV_LORA = ["downsamplers.0.conv", "upsamplers.0.conv"]  # incl. the RAD-conv and the fused upsamplers


def add_lora(unet, target_modules=ATTENTION_LORA):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    torch.manual_seed(4)
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=target_modules, init_lora_weights=False))


@pytest.mark.parametrize("target_modules", [ATTENTION_LORA, CONV_LORA], ids=["attention", "conv"])
def test_lora_before_and_after_apply(parts, target_modules):
    before = sd15_pipe(parts)
    add_lora(before.unet, target_modules)
    lora_only = generate(before)
    apply_hidiffusion(before, backend="torch")
    after = apply_hidiffusion(sd15_pipe(parts), backend="torch")
    plain = generate(after)  # step 0 of 4 runs RAD-conv
    add_lora(after.unet, target_modules)
    with_lora = generate(after)
    assert not torch.equal(with_lora, plain)
    assert torch.equal(generate(before), with_lora)
    remove_hidiffusion(before)
    assert torch.equal(generate(before), lora_only)


def test_conv_lora_follows_rad_conv(parts):
    # While RAD-conv is active, the LoRA on the downsampler conv runs with the conv's stride-4 dilated
    # geometry: conv(x) + B(A(x)) * scale, A and the conv both with stride 4, padding 2, dilation 2.
    unet = apply_hidiffusion(sd15_pipe(parts), backend="torch").unet
    add_lora(unet, ["down_blocks.0.downsamplers.0.conv"])
    lora = unet.down_blocks[0].downsamplers[0].conv
    seen = []
    lora.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    sample, context = torch.randn(1, 4, 16, 16), torch.randn(1, 7, 32)
    with torch.no_grad(), hidiff_models.denoising_step(unet, step=0, num_steps=10):
        unet(sample, 500, encoder_hidden_states=context)
    (x, out), = seen
    rad = dict(stride=4, padding=2, dilation=2)
    expected = F.conv2d(x, lora.base_layer.weight, lora.base_layer.bias, **rad) + F.conv2d(
        F.conv2d(x, lora.lora_A["default"].weight, **rad), lora.lora_B["default"].weight) * lora.scaling["default"]
    assert out.shape[-2:] == (4, 4)
    torch.testing.assert_close(out, expected)
    assert lora.lora_A["default"].stride == (2, 2)  # the LoRA's own geometry is back after the call


def test_deep_copy_taken_during_a_rad_conv_call_runs_as_the_original(parts):
    # A copy taken inside a RAD-conv call (a request deep-copying the pipeline while another thread generates;
    # here a hook) holds the conv LoRA's down projection widened: the copy's calls set its geometry again.
    unet = apply_hidiffusion(sd15_pipe(parts), backend="torch", window_shift=1).unet
    add_lora(unet, ["down_blocks.0.downsamplers.0.conv"])
    copies = []
    unet.mid_block.register_forward_pre_hook(
        lambda module, args: None if copies else copies.extend(copy.deepcopy(unet) for _ in range(2)))
    sample, context = torch.randn(1, 4, 16, 16), torch.randn(1, 7, 32)
    with torch.no_grad():
        with hidiff_models.denoising_step(unet, step=0, num_steps=10):
            unet(sample, 500, encoder_hidden_states=context)
        twin, removed = copies
        remove_hidiffusion(removed)  # before any call of its own
        for step in (9, 0):  # RAD-conv off, then on
            outputs = []
            for model in (unet, twin):
                with hidiff_models.denoising_step(model, step=step, num_steps=10):
                    outputs.append(model(sample, 500, encoder_hidden_states=context).sample)
            assert torch.equal(*outputs), step
        expected = remove_hidiffusion(unet)(sample, 500, encoder_hidden_states=context).sample
        assert torch.equal(removed(sample, 500, encoder_hidden_states=context).sample, expected)
    assert twin.down_blocks[0].downsamplers[0].conv.lora_A["default"].stride == (2, 2)


def test_t2i_adapter_needs_raunet_off(parts):
    # Its residuals are added to the down blocks' maps at their usual sizes (with RAU-Net: a shape error
    # mid-generation); MSW-MSA alone keeps the sizes.
    torch.manual_seed(5)
    t2i_adapter = T2IAdapter(in_channels=3, channels=list(parts["sd15_unet"].config.block_out_channels),
                             num_res_blocks=1, downscale_factor=8, adapter_type="full_adapter")
    pipe = sd15_pipe(parts, cls=StableDiffusionAdapterPipeline, adapter=t2i_adapter)
    condition = dict(image=torch.rand(1, 3, 64, 64))
    vanilla = generate(pipe, **condition)
    with pytest.raises(ValueError, match="cannot run with a T2I-Adapter; .*apply_raunet=False"):
        apply_hidiffusion(pipe, backend="torch")
    assert type(pipe) is StableDiffusionAdapterPipeline and torch.equal(generate(pipe, **condition), vanilla)
    windowed = generate(apply_hidiffusion(pipe, backend="torch", apply_raunet=False), **condition)
    assert torch.isfinite(windowed).all() and not torch.equal(windowed, vanilla)

    unet = apply_hidiffusion(sd15_pipe(parts), backend="torch").unet  # a bare UNet fed adapter residuals by hand
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32)
    residuals = t2i_adapter(torch.rand(1, 3, 64, 64))

    def unet_step(step):
        with torch.no_grad(), hidiff_models.denoising_step(unet, step=step, num_steps=10):
            return unet(sample, 500, context, down_intrablock_additional_residuals=list(residuals)).sample

    with pytest.raises(ValueError, match="T2I-Adapter"):
        unet_step(0)
    assert torch.isfinite(unet_step(9)).all()  # RAU-Net off: the usual sizes


def test_attend_and_excite_needs_raunet_off(parts):
    # It aggregates the attention maps of one size (attn_res), which RAU-Net changes: with it, 4x6 maps at
    # 64x96 px vanish and the pipeline failed in its own torch.cat. It also sets its own attention processors at
    # every call, so MSW-MSA never runs there: the warning says so.
    from diffusers import StableDiffusionAttendAndExcitePipeline

    pipe = sd15_pipe(parts, cls=StableDiffusionAttendAndExcitePipeline)
    with pytest.raises(ValueError, match="Attend-and-Excite"):
        apply_hidiffusion(pipe, backend="torch")
    assert type(pipe) is StableDiffusionAttendAndExcitePipeline and adapter.STATE_ATTR not in pipe.unet.__dict__
    apply_hidiffusion(pipe, backend="torch", apply_raunet=False)
    with pytest.warns(UserWarning, match="sets its own processors at every call"):
        latents = generate(pipe, steps=2, width=96, token_indices=[2], attn_res=(4, 6), max_iter_to_alter=1)
    assert torch.isfinite(latents).all()


IMAGE_EMBED_DIM = 12


def ip_adapter_weights(unet):
    """An IP-Adapter state dict (image projection + a to_k_ip/to_v_ip pair per cross-attention), seeded."""
    generator = torch.Generator().manual_seed(6)

    def draw(*shape):
        return torch.randn(*shape, generator=generator) * 0.2

    cross = unet.config.cross_attention_dim
    image_proj = {"proj.weight": draw(4 * cross, IMAGE_EMBED_DIM), "proj.bias": draw(4 * cross),
                  "norm.weight": 1 + draw(cross), "norm.bias": draw(cross)}
    ip_adapter = {}
    cross_attentions = [name[:-len(".processor")] for name in unet.attn_processors if ".attn2." in name]
    for key_id, name in zip(range(1, 2 * len(cross_attentions), 2), cross_attentions):  # diffusers' numbering
        attn = unet.get_submodule(name)
        ip_adapter[f"{key_id}.to_k_ip.weight"] = draw(*attn.to_k.weight.shape)
        ip_adapter[f"{key_id}.to_v_ip.weight"] = draw(*attn.to_v.weight.shape)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def load_ip_adapter(pipe):
    pipe.register_modules(feature_extractor=CLIPImageProcessor())  # diffusers < 0.31 needs one without an image encoder
    pipe.load_ip_adapter(ip_adapter_weights(pipe.unet), subfolder="", weight_name="", image_encoder_folder=None)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_ip_adapter_before_and_after_apply(parts, model):
    """diffusers' IP-Adapter loaders re-create attn1's processors from their class with no arguments; loading
    or unloading one after apply keeps MSW-MSA (those calls failed with a TypeError before)."""
    make_pipe = {"sd15": sd15_pipe, "sdxl": sdxl_pipe}[model]
    embeds = dict(ip_adapter_image_embeds=[torch.randn(2, 1, IMAGE_EMBED_DIM)])  # negative, positive
    no_ip = generate(apply_hidiffusion(make_pipe(parts), backend="torch"))
    before = make_pipe(parts)
    load_ip_adapter(before)
    ip_only = generate(before, **embeds)
    with_ip = generate(apply_hidiffusion(before, backend="torch"), **embeds)
    assert not torch.equal(with_ip, no_ip) and not torch.equal(with_ip, ip_only)

    after = apply_hidiffusion(make_pipe(parts), backend="torch")
    load_ip_adapter(after)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(generate(after, **embeds), with_ip)
    assert not [w for w in caught if "window-attention processors were replaced" in str(w.message)]
    after.unload_ip_adapter()
    assert torch.equal(generate(after), no_ip)
    load_ip_adapter(after)
    remove_hidiffusion(after)  # before any call: the re-created processors are replaced by the originals
    assert torch.equal(generate(after, **embeds), ip_only)
    before.unload_ip_adapter()
    assert torch.equal(generate(before), no_ip)


def test_freeu_before_and_after_apply(parts):
    # FreeU scales the up blocks' features and filters their skips in the Fourier domain: any map size works,
    # the RAU-Net sizes included.
    def freeu(pipe):
        pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        return pipe

    before = apply_hidiffusion(freeu(sd15_pipe(parts)), backend="torch")
    after = freeu(apply_hidiffusion(sd15_pipe(parts), backend="torch"))
    with_freeu = generate(after)
    assert torch.equal(generate(before), with_freeu)
    after.disable_freeu()
    assert not torch.equal(generate(after), with_freeu)
    assert torch.equal(generate(after), generate(apply_hidiffusion(sd15_pipe(parts), backend="torch")))


@pytest.mark.parametrize("guidance_scale, chunks", [(5.0, 3), (1.0, 2)], ids=["cfg", "no_cfg"])
def test_pag_on_window_blocks_keeps_msw_attention(parts, monkeypatch, guidance_scale, chunks):
    # PAG's layers here are window blocks (SD1.5's up_blocks.3): each UNet call composes PAG's identity
    # attention on the perturbed samples with MSW-MSA on the others (values: test_adapter's PAG test).
    composed = []
    real = processors.PerturbedWindowAttnProcessor.__call__

    def counted(self, attn, hidden_states, *args, **kwargs):
        composed.append((self.chunks, hidden_states.shape[0]))
        return real(self, attn, hidden_states, *args, **kwargs)

    monkeypatch.setattr(processors.PerturbedWindowAttnProcessor, "__call__", counted)
    pipe = apply_hidiffusion(sd15_pipe(parts, cls=StableDiffusionPAGPipeline, pag_applied_layers=["up_blocks.3"]),
                             backend="torch")
    ours = dict(pipe.unet.attn_processors)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="HiDiffusion")
        image = generate(pipe, pag_scale=3.0, guidance_scale=guidance_scale)
    assert composed == [(chunks, chunks)] * 4 * 3  # 4 steps x up_blocks.3's 3 window blocks
    assert all(pipe.unet.attn_processors[name] is p for name, p in ours.items())  # as PAG puts them back
    assert torch.equal(generate(pipe, pag_scale=3.0, guidance_scale=guidance_scale), image)


def test_pipeline_call_leaves_the_global_rng_alone(parts):
    pipe = apply_hidiffusion(sd15_pipe(parts), backend="torch")  # window phases drawn
    rng = torch.get_rng_state()
    generate(pipe)
    assert torch.equal(torch.get_rng_state(), rng)


def test_reapply_with_another_seed_takes_it(parts):
    pipe = apply_hidiffusion(sd15_pipe(parts), backend="torch", generator=1)
    apply_hidiffusion(pipe, backend="torch", generator=2)
    fresh = apply_hidiffusion(sd15_pipe(parts), backend="torch", generator=2)
    assert torch.equal(generate(pipe), generate(fresh))


def test_unet_calls_spanning_several_steps_are_refused_with_raunet(parts):
    # ParaDiGMS denoises a window of steps in one UNet call (one timestep per sample): RAU-Net, which needs one
    # step per call, refuses it instead of scheduling all the samples by the first one.
    from diffusers import DDPMParallelScheduler, StableDiffusionParadigmsPipeline

    pipe = apply_hidiffusion(sd15_pipe(parts, StableDiffusionParadigmsPipeline, DDPMParallelScheduler), backend="torch")
    with pytest.raises(ValueError, match="different timesteps.*apply_raunet=False"):
        generate(pipe, steps=6, parallel=3)
    apply_hidiffusion(pipe, backend="torch", apply_raunet=False)
    assert torch.isfinite(generate(pipe, steps=6, parallel=3)).all()
