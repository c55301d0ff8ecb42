"""MSW-MSA speed and memory: the fused kernel vs HiDiffusion's original path, the torch backend's gathered
path, FlexAttention and global SDPA.

    pytest benchmarks/bench_msw_attention.py      # pytest-benchmark suite, grouped by shape
    python benchmarks/bench_msw_attention.py      # table: median ms, useful TFLOP/s (and % of the card's dense
                                                  # bf16 matmul rate), speed-up vs original, peak MiB, rel err

Shapes are the highest-resolution attention blocks of SD1.5 (8 heads x 40) and SDXL (10 heads x 64)
at 128x128 and 256x256 tokens, bf16 and fp16, plus SD1.5 at 4096x4096 (512x512 tokens, fp16) for
memory (the table times FlexAttention on the bf16 rows and that one). Peak memory is what one call allocates above
its inputs; rel err is max|out - ref| / max|ref| against the fp32 reference (global SDPA computes another
function: n/a). Without CUDA one tiny shape runs on CPU: that times the Triton interpreter
(TRITON_INTERPRET=1) or the reference fallback, not kernel performance.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import hidiff_kernels
from hidiff_kernels import reference
from hidiff_kernels.benchmarking import dense_matmul_tflops, median_ms, peak_mib, rel_err
from hidiff_kernels.ops.window_gather import msw_attention_gathered
from hidiff_models.processors import shift_for_phase

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CPU_LABEL = "cpu-interpreter" if hidiff_kernels.interpreter_enabled() else "cpu-reference"

# (label, B, H, W, heads, head_dim, dtype); the targets (SDXL, head_dim 64, bf16) come first
CASES = [
    (label, 2, n, n, heads, d, dtype)
    for label, n, heads, d in [("sdxl-256x256", 256, 10, 64), ("sdxl-128x128", 128, 10, 64),
                               ("sd15-256x256", 256, 8, 40), ("sd15-128x128", 128, 8, 40)]
    for dtype in (torch.bfloat16, torch.float16)
] + [("sd15-512x512", 2, 512, 512, 8, 40, torch.float16)] if CUDA else [
    (f"tiny-{CPU_LABEL}", 1, 8, 8, 2, 16, torch.float32),
]
IMPLS = ["fused", "original", "gathered", "flex", "sdpa_global"]
# FlexAttention compiles anew per shape and dtype (seconds each): the table runs it on the bf16 rows and the
# memory row only, which keeps the device check's msw stage in its time limit; the pytest-benchmark suite runs
# it on every row.
TABLE_FLEX_DTYPES = (torch.bfloat16,)
LARGE_N = 2**17  # above this many tokens a call takes a large fraction of a second: fewer timed calls


def original_path_msw_attention(q, k, v, size, shift, scale=None):
    """HiDiffusion's own route (even H, W): roll, partition into 4 windows, one batched SDPA, reverse, roll back."""
    (H, W), (sh, sw) = size, shift
    B, N, heads, d = q.shape

    def partition(t):
        t = torch.roll(t.reshape(B, H, W, heads, d), (-sh, -sw), dims=(1, 2))
        return rearrange(t, "b (wy y) (wx x) h d -> (b wy wx) h (y x) d", wy=2, wx=2)

    out = F.scaled_dot_product_attention(partition(q), partition(k), partition(v), scale=scale)
    out = rearrange(out, "(b wy wx) h (y x) d -> b (wy y) (wx x) h d", wy=2, wx=2, y=H // 2)
    return torch.roll(out, (sh, sw), dims=(1, 2)).reshape(B, N, heads, d)


def window_ids(H, W, sh, sw, device):
    """Window (0..3) of each original token: label the rolled map's windows, roll the labels back."""
    rows = (torch.arange(H, device=device) >= math.ceil(H / 2)).int()
    cols = (torch.arange(W, device=device) >= math.ceil(W / 2)).int()
    return torch.roll(rows[:, None] * 2 + cols[None, :], (sh, sw), dims=(0, 1)).flatten()


def useful_flops(B, H, W, heads, d):
    """4 * B * heads * d * sum over windows of (window tokens)^2: the two matmuls of windowed attention."""
    wh, ww = math.ceil(H / 2), math.ceil(W / 2)
    windows = [rows * cols for rows in (wh, H - wh) for cols in (ww, W - ww)]
    return 4 * B * heads * d * sum(n * n for n in windows)


def make_impl(name, q, k, v, size, shift):
    """A zero-argument callable for one implementation (global SDPA attends over all tokens: a speed yardstick)."""
    if name == "fused":
        return lambda: hidiff_kernels.msw_attention(q, k, v, size, shift)
    if name == "original":
        return lambda: original_path_msw_attention(q, k, v, size, shift)
    if name == "gathered":  # the torch backend's path (there it gathers the block input once, before attn1)
        return lambda: msw_attention_gathered(q, k, v, size, shift)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, N, d], as SDPA / flex take them
    if name == "sdpa_global":
        return lambda: F.scaled_dot_product_attention(qt, kt, vt)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # A fresh dynamo cache per shape: past its recompile limit (8) a compiled flex_attention falls back to eager
    # flex, which materializes the N x N scores (terabytes at 512x512 tokens).
    torch._dynamo.reset()
    ids = window_ids(*size, *shift, q.device)
    N = q.shape[1]
    # compiled: the mask is evaluated block by block (an N x N bool mask would not fit at 512x512 tokens)
    block_mask = torch.compile(create_block_mask)(lambda b, h, qi, ki: ids[qi] == ids[ki], None, None, N, N,
                                                  device=q.device)
    flex = torch.compile(flex_attention, dynamic=False)  # one static kernel per shape: flex at its best
    return lambda: flex(qt, kt, vt, block_mask=block_mask)


def inputs(B, H, W, heads, d, dtype):
    return [torch.randn(B, H * W, heads, d, device=DEVICE, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("label,B,H,W,heads,d,dtype", CASES, ids=[f"{c[0]}-{c[-1]}" for c in CASES])
def test_msw_attention_speed(benchmark, label, B, H, W, heads, d, dtype, impl):
    q, k, v = inputs(B, H, W, heads, d, dtype)
    fn = make_impl(impl, q, k, v, (H, W), shift_for_phase(H, W, 1))
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    benchmark.group = f"{label} {dtype}"
    with torch.inference_mode():
        benchmark.pedantic(lambda: (fn(), sync()), warmup_rounds=3, rounds=20 if CUDA else 3)
    if benchmark.stats is not None:  # None under --benchmark-disable: one untimed call
        benchmark.extra_info["useful_TFLOP/s"] = useful_flops(B, H, W, heads, d) / benchmark.stats.stats.median / 1e12


def main():
    dense = dense_matmul_tflops(DEVICE) if CUDA else None
    print(f"dense bf16 matmul (8192^3, random data): {dense:.0f} TFLOP/s" if CUDA else
          f"{CPU_LABEL}: interpreter/reference timings, not kernel performance")
    print(f"{'shape':14s} {'dtype':15s} {'impl':12s} {'median ms':>10s} {'TFLOP/s':>8s} {'% dense':>7s} "
          f"{'vs original':>11s} {'peak MiB':>9s} {'rel err':>8s}")
    with torch.inference_mode():
        for label, B, H, W, heads, d, dtype in CASES:
            q, k, v = inputs(B, H, W, heads, d, dtype)
            size, shift = (H, W), shift_for_phase(H, W, 1)
            ref = reference.msw_attention(q.float(), k.float(), v.float(), size, shift)
            reps = dict(warmup=1, rep=5) if H * W > LARGE_N else {}
            times = {}
            # the speed-up's baseline first; flex (compiled per shape, the slowest to set up) last
            for name in sorted(IMPLS, key=lambda name: (name != "original", name == "flex")):
                if name == "flex" and CUDA and dtype not in TABLE_FLEX_DTYPES and H * W <= LARGE_N:
                    continue
                fn = make_impl(name, q, k, v, size, shift)
                out = fn()  # compiles / autotunes outside the timed calls
                err = "n/a" if name == "sdpa_global" else f"{rel_err(out.transpose(1, 2) if name == 'flex' else out, ref):.1e}"
                del out
                times[name] = ms = median_ms(fn, DEVICE, **reps)
                tflops = useful_flops(B, H, W, heads, d) / (ms * 1e-3) / 1e12
                share = f"{100 * tflops / dense:.0f}%" if CUDA else "n/a"
                print(f"{label:14s} {str(dtype):15s} {name:12s} {ms:10.3f} {tflops:8.1f} {share:>7s} "
                      f"{times['original'] / ms:10.2f}x {peak_mib(fn, DEVICE):9.1f} {err:>8s}", flush=True)


if __name__ == "__main__":
    main()
