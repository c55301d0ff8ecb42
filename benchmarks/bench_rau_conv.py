"""RAU-Net conv speed and memory: the fused implicit-GEMM kernels vs cuDNN doing the same math unfused.

    pytest benchmarks/bench_rau_conv.py      # pytest-benchmark suite, grouped by shape
    python benchmarks/bench_rau_conv.py      # table: median ms, TFLOP/s, speed-up vs cuDNN, peak memory

Shapes are the convs RAU-Net changes, at batch 2 (classifier-free guidance): SD1.5 at 2048x2048
(latent 256) and SDXL at 4096x4096 (latent 512). cuDNN runs F.conv2d with the RAD-conv arguments,
and F.interpolate + F.conv2d for the upsamplers (the enlarged map is materialized there). Peak
memory is what one call allocates above its inputs. Without CUDA one tiny shape runs on CPU: that
times the Triton interpreter (TRITON_INTERPRET=1) or the reference fallback, not kernel performance.
"""
import pytest
import torch
import torch.nn.functional as F

import hidiff_kernels
from hidiff_kernels import reference
from hidiff_kernels.benchmarking import median_ms, peak_mib, rel_err

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CPU_LABEL = "cpu-interpreter" if hidiff_kernels.interpreter_enabled() else "cpu-reference"

# (label, op, B, C, H, W, upsampled size); every conv keeps C channels, as in the UNets
CASES = [
    ("sd15-2048 down_blocks.0 RAD-conv 320@256", "down", 2, 320, 256, 256, None),
    ("sd15-2048 up_blocks.2 upsampler 640@64->256 (x4)", "up", 2, 640, 64, 64, (256, 256)),
    ("sd15-2048 up_blocks.2 upsampler 640@128->256 (x2)", "up", 2, 640, 128, 128, (256, 256)),
    ("sdxl-4096 down_blocks.1 RAD-conv 640@256", "down", 2, 640, 256, 256, None),
    ("sdxl-4096 up_blocks.0 upsampler 1280@64->256 (x4)", "up", 2, 1280, 64, 64, (256, 256)),
    ("sdxl-4096 up_blocks.0 upsampler 1280@128->256 (x2)", "up", 2, 1280, 128, 128, (256, 256)),
] if CUDA else [
    (f"tiny-{CPU_LABEL} RAD-conv", "down", 1, 16, 16, 16, None),
    (f"tiny-{CPU_LABEL} upsampler x2", "up", 1, 16, 8, 8, (16, 16)),
]
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float32]
LAYOUTS = ["nchw", "channels_last"]
BASELINE = "cudnn" if CUDA else "torch-cpu"  # F.conv2d / F.interpolate, unfused
IMPLS = ["hidiff", BASELINE]


def inputs(B, C, H, W, dtype, layout):
    x = torch.randn(B, C, H, W, device=DEVICE, dtype=dtype)
    w = torch.randn(C, C, 3, 3, device=DEVICE, dtype=dtype) / (3 * C**0.5)
    if layout == "channels_last":
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    return x, w, torch.randn(C, device=DEVICE, dtype=dtype)


def make_impl(name, op, x, w, b, size):
    """A zero-argument callable running one implementation of the conv (anything but "hidiff": unfused torch)."""
    if name == "hidiff":
        if op == "down":
            return lambda: hidiff_kernels.rau_downsample_conv(x, w, b)
        return lambda: hidiff_kernels.upsample_conv(x, w, b, size=size)
    if op == "down":
        return lambda: F.conv2d(x, w, b, stride=4, padding=2, dilation=2)
    return lambda: F.conv2d(F.interpolate(x, size=size, mode="nearest"), w, b, padding=1)


def flops(op, B, C, H, W, size):
    """2 * output pixels * Co * Ci * 9."""
    Ho, Wo = ((H + 3) // 4, (W + 3) // 4) if op == "down" else size
    return 2 * B * Ho * Wo * C * C * 9


@pytest.fixture(autouse=True, scope="module")
def cudnn_autotuned():
    """cuDNN picks its fastest algorithm per shape, as our kernel autotunes."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label,op,B,C,H,W,size", CASES, ids=[c[0] for c in CASES])
def test_rau_conv_speed(benchmark, label, op, B, C, H, W, size, dtype, layout, impl):
    x, w, b = inputs(B, C, H, W, dtype, layout)
    fn = make_impl(impl, op, x, w, b, size)
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    benchmark.group = f"{label} {dtype} {layout}"
    with torch.inference_mode():
        fn()  # autotunes (ours) / picks the algorithm (cuDNN) outside the timed rounds
        benchmark.extra_info["peak_MiB"] = peak_mib(fn, DEVICE)
        benchmark.pedantic(lambda: (fn(), sync()), warmup_rounds=3, rounds=20 if CUDA else 3)
        if benchmark.stats is None:  # --benchmark-disable: one untimed call
            return
        benchmark.extra_info["TFLOP/s"] = flops(op, B, C, H, W, size) / benchmark.stats.stats.median / 1e12
        if impl == "hidiff":
            baseline_ms = median_ms(make_impl(BASELINE, op, x, w, b, size), DEVICE)
            benchmark.extra_info[f"speedup_vs_{BASELINE}"] = baseline_ms / (benchmark.stats.stats.median * 1e3)


def reference_output(op, x, w, b, size):
    """The op in fp32 through hidiff_kernels.reference (cuDNN without TF32)."""
    x, w, b = x.float(), w.float(), b.float()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        if op == "down":
            return reference.rau_downsample_conv(x, w, b)
        return reference.upsample_conv(x, w, b, size=size)


def main():
    torch.backends.cudnn.benchmark = True
    print(f"{'shape':52s} {'dtype':15s} {'layout':14s} {'impl':7s} {'median ms':>10s} {'TFLOP/s':>8s} "
          f"{'vs ' + BASELINE:>13s} {'peak MiB':>9s} {'rel err':>8s}")
    with torch.inference_mode():
        # Every shape in one dtype and layout before the next: each pair compiles its own kernels, and fp16 NCHW
        # (what the UNets run, compiled already when the UNet step was timed) comes first.
        for dtype in DTYPES:
            for layout in LAYOUTS:
                for label, op, B, C, H, W, size in CASES:
                    x, w, b = inputs(B, C, H, W, dtype, layout)
                    ref = reference_output(op, x, w, b, size)
                    impls = {name: make_impl(name, op, x, w, b, size) for name in IMPLS}
                    errs = {name: rel_err(fn(), ref) for name, fn in impls.items()}  # also autotunes / picks algorithms
                    times = {name: median_ms(fn, DEVICE) for name, fn in impls.items()}
                    for name, ms in times.items():
                        tflops = flops(op, B, C, H, W, size) / (ms * 1e-3) / 1e12
                        print(f"{label:52s} {str(dtype):15s} {layout:14s} {name:7s} {ms:10.3f} {tflops:8.1f} "
                              f"{times[BASELINE] / ms:12.2f}x {peak_mib(impls[name], DEVICE):9.1f} {errs[name]:8.1e}",
                              flush=True)


if __name__ == "__main__":
    main()
