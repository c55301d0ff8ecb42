"""Small timing and accuracy helpers shared by the benchmarks (``benchmarks/``) and ``hidiff bench``."""
import math
import statistics
import time

import torch


def timed_call_ms(fn, device) -> float:
    """Time of one ``fn()`` call in milliseconds: CUDA events on the current stream (GPU time, launch
    gaps included) on a CUDA device, the wall clock elsewhere."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn, device, *, warmup: int = 5, rep: int = 20) -> float:
    """Median time of one ``fn()`` call in milliseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed_call_ms(fn, device) for _ in range(rep))


def peak_mib(fn, device) -> float:
    """CUDA memory one ``fn()`` call allocates above what was allocated before it (NaN off CUDA)."""
    if torch.device(device).type != "cuda":
        return math.nan
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def rel_err(out, ref) -> float:
    """max|out - ref| / max|ref|, in float64 (inf if out has NaN/inf)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def dense_matmul_tflops(device, dtype=torch.bfloat16, n: int = 8192) -> float:
    """The card's measured dense matmul rate: TFLOP/s of an n x n x n product in ``dtype`` (random data)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / (median_ms(lambda: a @ b, device, warmup=3, rep=10) * 1e-3) / 1e12
