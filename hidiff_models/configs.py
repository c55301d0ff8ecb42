"""Built-in UNet configurations with the real SD1.5 / SD2.1 / SDXL module layouts, and seeded weights.

``"full"`` is the real architecture (the released checkpoints' configs); ``"tiny"`` keeps every module
name and block layout of the real one (so HiDiffusion patches the same modules) with narrow channels,
for tests and CPU demos. Weights are drawn per parameter name from a seed, so the same config gives
the same weights on any diffusers version. Nothing is downloaded.

This module imports only torch at top level, so scripts can load it by path beside other diffusers
versions.
"""
import os
import zlib

import torch

SD15 = dict(
    sample_size=64,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
# SD2.1 (768 px, v-prediction): SD1.5's blocks and module names with linear projections, 64-dim heads
# (attention_head_dim counts heads here), OpenCLIP's 1024-wide text states and upcast attention.
SD21 = dict(
    SD15,
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    upcast_attention=True,
)
SDXL = dict(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# Narrow versions: same blocks, layers and module names; 16-dim attention heads (sd15: 16 and 32).
TINY = {
    "sd15": dict(SD15, block_out_channels=(32, 64, 64, 64), norm_num_groups=8, cross_attention_dim=32,
                 attention_head_dim=2),
    "sd21": dict(SD21, block_out_channels=(32, 64, 64, 64), norm_num_groups=8, cross_attention_dim=32,
                 attention_head_dim=(2, 4, 4, 4)),
    "sdxl": dict(SDXL, block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=32,
                 attention_head_dim=(2, 4, 4), addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 32),
}
FULL = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}
# Width of SDXL's pooled text embedding ("text_embeds"): what projection_class_embeddings_input_dim adds
# to the six time ids.
POOLED_TEXT_DIM = {"tiny": 32, "full": 1280}


def unet_config(model: str, size: str = "tiny") -> dict:
    """The UNet2DConditionModel kwargs for model 'sd15', 'sd21' or 'sdxl' at size 'tiny' or 'full'."""
    configs = {"tiny": TINY, "full": FULL}
    if size not in configs or model not in configs[size]:
        raise ValueError(f"unknown built-in UNet {model!r} / {size!r}: models {sorted(FULL)}; sizes 'tiny', 'full'")
    return dict(configs[size][model])


def seed_weights(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with values drawn from (seed, parameter name).

    Matrices and conv kernels get N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), other vectors
    N(0, 0.02^2): activations stay O(1) through a deep UNet, so a denoising loop stays finite.
    """
    _seed_parameters(module.named_parameters(), seed)
    return module


@torch.no_grad()
def _seed_parameters(named_parameters, seed):
    for name, param in named_parameters:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        values = torch.randn(param.shape, generator=gen, dtype=torch.float64)
        if param.dim() >= 2:
            values /= (param[0].numel()) ** 0.5
        elif "norm" in name and name.endswith("weight"):
            values = 1 + 0.1 * values
        else:
            values *= 0.02
        param.copy_(values.to(param.dtype))


def build_unet(model: str, size: str = "tiny", seed: int = 0, dtype=torch.float32, device="cpu"):
    """A UNet2DConditionModel with a built-in config and seeded weights (no download).

    Built on the meta device (torch's own init, which the seeded weights overwrite, took a fifth of the full
    SD1.5 build) and seeded in threads: each parameter draws from its own (seed, name) generator, so the
    weights do not depend on the threads, and torch releases the GIL, so the cores share the work (a full
    SDXL UNet draws 2.6 billion float64 normals).
    """
    from concurrent.futures import ThreadPoolExecutor

    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(model, size))
    if any(True for _ in unet.buffers()):  # to_empty would leave them uninitialised: build on the CPU
        unet = seed_weights(UNet2DConditionModel(**unet_config(model, size)), seed)
        return unet.to(device=device, dtype=dtype).eval()
    with torch.inference_mode(False):  # the worker threads write into the parameters outside inference mode
        unet = unet.to_empty(device="cpu")
        named = list(unet.named_parameters())
        jobs = max(1, min(len(named), os.cpu_count() or 1, 16))
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lambda i: _seed_parameters(named[i::jobs], seed), range(jobs)))
    return unet.to(device=device, dtype=dtype).eval()
