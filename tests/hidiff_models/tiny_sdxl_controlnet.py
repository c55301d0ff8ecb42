"""Tiny SDXL ControlNet pipelines (and SDXL's plain inpainting pipeline), built offline with seeded weights,
identical on diffusers 0.29.2 and 0.42.

Shared by make_original_controlnet_fixture.py and make_original_inpaint_fixture.py (run beside the original
hidiffusion package on diffusers 0.29.2 and transformers 4.45) and test_controlnet_sdxl.py and
test_inpaint_sdxl.py (the project's diffusers and transformers). It
imports only torch, diffusers, transformers and fidelity_loop (which loads hidiff_models/configs.py by file
path: the hidiff_models package itself does not import with the old diffusers). Every model's parameters are
overwritten by configs.seed_weights, so the libraries' own initialisations never matter.
"""
import json
import pathlib
import tempfile

import torch

import fidelity_loop as fl  # beside this file, on sys.path for pytest and for the fixture script
from fidelity_loop import FIXTURE_TOL, rel_err  # for the SDXL tests

configs, single_thread = fl.configs, fl.single_thread  # configs.py loaded by path; one-thread rounding

NUM_STEPS = 10
GUIDANCE = 5.0
PROMPT = "a photo of a cat"
NEGATIVE_PROMPT = "a photo"
# Stable Diffusion's DDIM config with SDXL's timestep spacing, explicit so both diffusers versions agree.
DDIM_CONFIG = dict(fl.DDIM_CONFIG, timestep_spacing="leading")
# Latent 32 x 24 (pixels 256 x 192): profile sdxl_2048 in aggressive mode; non-square, so the ControlNet's
# input size rule (longer side to 128 latents) gives a non-square 128 x 96.
HEIGHT, WIDTH = 256, 192
# name_or_path that makes the original select SDXL (the tiny UNet lacks one module name of its key list).
NAME_OR_PATH = "stabilityai/stable-diffusion-xl-base-1.0"
# Seeds of the parts' weights.
SEEDS = dict(unet=0, controlnet=3, controlnet_2=4, text_encoder=5, text_encoder_2=6, vae=7)


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({f"{word}</w>": i + 2 for i, word in enumerate(["a", "photo", "of", "cat"])})
    with tempfile.TemporaryDirectory() as directory:
        directory = pathlib.Path(directory)
        (directory / "vocab.json").write_text(json.dumps(vocab))
        (directory / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=16)


def tiny_text_encoder(hidden, seed, projection_dim=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=8, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=projection_dim or hidden)
    model = (CLIPTextModelWithProjection if projection_dim else CLIPTextModel)(config)
    # transformers 5 flattens CLIPTextModel (no `text_model.` prefix); CLIPTextModelWithProjection keeps it.
    # Seed by the same names on both: the text transformer of CLIPTextModel, the whole projection model.
    seeded = model if projection_dim else getattr(model, "text_model", model)
    configs.seed_weights(seeded, seed)
    return model.eval()


def tiny_vae(seed):
    """Four blocks: the usual 8x latent scale."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=64)
    return configs.seed_weights(vae, seed).eval()


def tiny_controlnet(seed):
    """A ControlNetModel for the tiny SDXL UNet: its down blocks, but one transformer layer per attention and a
    narrow conditioning embedding (8x down, as usual). The original runs the ControlNet at a 128-latent base
    whatever the image size, so the full (1, 2, 10) layers would dominate the CPU test time."""
    from diffusers import ControlNetModel

    config = configs.unet_config("sdxl", "tiny")
    del config["up_block_types"], config["sample_size"]
    config.update(transformer_layers_per_block=1, conditioning_embedding_out_channels=(4, 4, 4, 4))
    # Every weight is drawn, the zero convs included: the residuals are not zero.
    return configs.seed_weights(ControlNetModel(**config), seed).eval()


def build_pipeline(kind="text2img", multi=False):
    """A fresh tiny SDXL ControlNet pipeline: kind "text2img", "img2img" or "inpaint"; multi: two ControlNets."""
    classes = dict(text2img="StableDiffusionXLControlNetPipeline", img2img="StableDiffusionXLControlNetImg2ImgPipeline",
                   inpaint="StableDiffusionXLControlNetInpaintPipeline")
    with single_thread():
        controlnet = tiny_controlnet(SEEDS["controlnet"])
        if multi:
            try:
                from diffusers.models.controlnets import MultiControlNetModel
            except ImportError:  # diffusers 0.29
                from diffusers.pipelines.controlnet import MultiControlNetModel

            controlnet = MultiControlNetModel([controlnet, tiny_controlnet(SEEDS["controlnet_2"])])
    return build_sdxl_pipeline(classes[kind], controlnet=controlnet)


def build_sdxl_pipeline(class_name, name_or_path=NAME_OR_PATH, **components):
    """A fresh tiny SDXL pipeline of diffusers' class ``class_name`` named ``name_or_path``, with the tiny SDXL
    UNet, VAE and text encoders and the further ``components`` its class takes (a ControlNet)."""
    import diffusers

    with single_thread():
        unet = configs.seed_weights(diffusers.UNet2DConditionModel(**configs.unet_config("sdxl", "tiny")),
                                    SEEDS["unet"]).eval()
        tokenizer = tiny_tokenizer()
        pipe = getattr(diffusers, class_name)(
            vae=tiny_vae(SEEDS["vae"]),
            text_encoder=tiny_text_encoder(16, SEEDS["text_encoder"]),
            text_encoder_2=tiny_text_encoder(16, SEEDS["text_encoder_2"], projection_dim=configs.POOLED_TEXT_DIM["tiny"]),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
            scheduler=diffusers.DDIMScheduler(**DDIM_CONFIG), add_watermarker=False, **components,
        )
    pipe.set_progress_bar_config(disable=True)
    pipe.register_to_config(_name_or_path=name_or_path)
    return pipe


def control_image(seed=11, height=HEIGHT, width=WIDTH):
    """A [1, 3, height, width] control image in [0, 1]."""
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


CASES = {
    # name: (pipeline kind, call kwargs besides the common ones of generate)
    "text2img": ("text2img", dict()),
    "text2img_guess": ("text2img", dict(guess_mode=True)),
    "img2img": ("img2img", dict(strength=0.7)),
    # not recorded (the original's call ignores mask_image: it runs img2img): for our own tests only
    "inpaint": ("inpaint", dict(strength=0.7, mask_image=torch.ones(1, 1, HEIGHT, WIDTH))),
}
RECORDED = ("text2img", "text2img_guess", "img2img")


@torch.no_grad()
def generate(pipe, case, **overrides):
    """Final latents ([1, 4, 32, 24]) of one case with the fixed settings (10 DDIM steps with CFG), or others."""
    kind, extra = CASES[case]
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=NUM_STEPS,
                  guidance_scale=GUIDANCE, height=HEIGHT, width=WIDTH, output_type="latent",
                  generator=torch.Generator().manual_seed(0), controlnet_conditioning_scale=0.8)
    if kind == "text2img":
        kwargs["image"] = control_image()
    else:
        kwargs["image"] = control_image(seed=12)
        kwargs["control_image"] = control_image()
    kwargs.update(extra)
    kwargs.update(overrides)
    with single_thread():
        return pipe(**kwargs).images


def recorded_settings():
    """The fixed settings a fixture of these pipelines is recorded with (its test checks them)."""
    return dict(num_steps=NUM_STEPS, guidance=GUIDANCE, ddim=DDIM_CONFIG, size=(HEIGHT, WIDTH), seeds=SEEDS)



def inpaint_mask():
    """A [1, 1, HEIGHT, WIDTH] mask of the image's middle, on whole latents (multiples of 8 pixels)."""
    mask = torch.zeros(1, 1, HEIGHT, WIDTH)
    mask[..., HEIGHT // 4:3 * HEIGHT // 4, WIDTH // 4:3 * WIDTH // 4] = 1
    return mask


@torch.no_grad()
def generate_inpaint(pipe):
    """Final latents of SDXL's plain inpainting pipeline repainting inpaint_mask() of an image from noise
    (strength 1: all NUM_STEPS steps), with generate's prompts, guidance and seed."""
    with single_thread():
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, image=control_image(seed=12),
                    mask_image=inpaint_mask(), strength=1.0, num_inference_steps=NUM_STEPS, guidance_scale=GUIDANCE,
                    height=HEIGHT, width=WIDTH, output_type="latent", generator=torch.Generator().manual_seed(0)).images
