"""Small timing helpers shared by the benchmarks (``benchmarks/``)."""
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
