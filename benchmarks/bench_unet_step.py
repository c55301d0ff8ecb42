"""UNet denoising step speed: no HiDiffusion vs HiDiffusion with backend="torch" and backend="triton".

    pytest benchmarks/bench_unet_step.py --benchmark-only

One UNet call with a classifier-free-guidance batch of 2, at step 0 of 50 (RAU-Net + MSW-MSA) and step
49 of 50 (MSW-MSA only). CUDA: the real SD1.5 and SDXL architectures (seeded random weights) in fp16 at
SD1.5 1024/2048 and SDXL 2048/4096 pixels. CPU: the tiny built-in UNets (same block layout, narrow
channels) in fp32 at 256 pixels, without the Triton backend: CPU reference timings, not kernel
performance. ``hidiff bench`` times the same cases side by side in one table, with the op rows.
"""
import pytest
import torch

from hidiff_models import apply_hidiffusion, denoising_step, remove_hidiffusion
from hidiff_models import bench
from hidiff_models.configs import build_unet

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.float16 if CUDA else torch.float32
UNET_SIZE = "full" if CUDA else "tiny"
LABEL = "cuda" if CUDA else "cpu-reference (CPU reference timings, not kernel performance)"
CASES = [("sd15", 1024), ("sd15", 2048), ("sdxl", 2048), ("sdxl", 4096)] if CUDA else [("sd15", 256), ("sdxl", 256)]
NUM_STEPS = 50
# (backend, step): backend None is the UNet without HiDiffusion, whose step does not matter.
RUNS = [(None, None), ("torch", 0), ("torch", NUM_STEPS - 1), ("triton", 0), ("triton", NUM_STEPS - 1)]


@pytest.fixture(scope="module")
def unets():
    """Built-in UNets by model, built on first use; one at a time in memory."""
    cache = {}

    def get(model):
        if model not in cache:
            cache.clear()
            cache[model] = build_unet(model, UNET_SIZE, seed=0, dtype=DTYPE, device=DEVICE)
        return cache[model]

    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(bench.cpu_threads())
    yield get
    torch.set_num_threads(threads)


@pytest.mark.parametrize("backend,step", RUNS, ids=["vanilla", "torch-step0", "torch-step49", "triton-step0",
                                                    "triton-step49"])
@pytest.mark.parametrize("model,image", CASES, ids=[f"{m}-{s}px" for m, s in CASES])
def test_unet_step_speed(benchmark, unets, model, image, backend, step):
    if backend == "triton" and not CUDA:
        pytest.skip("the Triton backend needs CUDA (interpreter timings are not kernel performance)")
    unet = unets(model)
    inputs = bench.unet_inputs(unet, (image // 8, image // 8), DEVICE, DTYPE)
    sync = torch.cuda.synchronize if CUDA else (lambda: None)

    def call():
        if backend is None:
            unet(**inputs)
        else:
            with denoising_step(unet, step, NUM_STEPS):
                unet(**inputs)
        sync()

    benchmark.group = f"{model} {image}px UNet step, {LABEL}"
    benchmark.extra_info.update(label=LABEL, dtype=str(DTYPE), unet=UNET_SIZE, batch=bench.BATCH)
    if backend is not None:
        apply_hidiffusion(unet, backend=backend, model_type=model)
    try:
        with torch.inference_mode():
            benchmark.pedantic(call, warmup_rounds=1, rounds=5 if CUDA else 3)
    finally:
        remove_hidiffusion(unet)
