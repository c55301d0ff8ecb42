"""Small timing helpers shared by the benchmarks (``benchmarks/``)."""
import statistics
import time

import torch


def median_ms(fn, device, *, warmup: int = 5, rep: int = 20) -> float:
    """Median time of one ``fn()`` call in milliseconds.

    On a CUDA device each call is timed with events on the current stream (GPU time, launch gaps
    included); elsewhere with the wall clock.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
