"""torch.compile(fullgraph=True) of a HiDiffusion-patched UNet on the device (the device check's `compile` stage).

    python benchmarks/compile_check.py                       # inductor, default mode, then reduce-overhead
    python benchmarks/compile_check.py --backend eager       # a quick dry run of the tracing on CPU

The tiny built-in SD1.5 UNet (real block layout) at 64x64 latents, CFG batch 2, backend "triton" on CUDA
(fp16) or "torch" on CPU (fp32), random window phases: steps across a RAU-Net phase switch, each compared
with an eager copy drawing the same phases. Prints the relative error, the graphs dynamo captured, under
reduce-overhead the CUDA graphs recorded (one per RAU-Net phase when new window shifts replay the same graph)
and the median call time after the first call of each phase. Exits 1 if compiling fails or an output differs.
"""
import argparse
import contextlib
import math
import statistics
import time

import torch
from torch._dynamo.utils import counters

from hidiff_kernels.benchmarking import rel_err, timed_call_ms
from hidiff_models import apply_hidiffusion, denoising_step
from hidiff_models.configs import build_unet
from hidiff_models.schedule import active_ops

NUM_STEPS = 10
STEPS = [2, 3, 4, 5, 6]  # sd15_1024 at 64x64 latents: RAD-conv for steps 0-3, then MSW-MSA only
TOLERANCE = {torch.float16: 1e-2, torch.float32: 1e-4}


@contextlib.contextmanager
def counted_cuda_graph_recordings():
    """A list that grows by one per CUDA graph inductor's graph trees record (None where torch lacks the private
    CUDAGraphTreeManager.record_function this wraps)."""
    import torch._inductor.cudagraph_trees as trees

    manager = getattr(trees, "CUDAGraphTreeManager", None)
    record_function = getattr(manager, "record_function", None)
    if record_function is None:
        yield None
        return
    recorded = []

    def counting(self, *args, **kwargs):
        recorded.append(1)
        return record_function(self, *args, **kwargs)

    manager.record_function = counting
    try:
        yield recorded
    finally:
        manager.record_function = record_function


def check(mode, compiler_backend, device, dtype):
    torch._dynamo.reset()
    counters.clear()
    backend = "triton" if device.type == "cuda" else "torch"

    def patched():
        return apply_hidiffusion(build_unet("sd15", "tiny", seed=1, dtype=dtype, device=device), backend=backend,
                                 generator=3)

    eager, traced = patched(), patched()
    compiled = torch.compile(traced, fullgraph=True, backend=compiler_backend,
                             **({} if mode == "default" else {"mode": mode}))
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 64, 64, generator=gen).to(device, dtype)
    context = torch.randn(2, 77, 32, generator=gen).to(device, dtype)
    worst, later_calls, phases = 0.0, [], set()
    with torch.no_grad(), counted_cuda_graph_recordings() as recorded:
        for step in STEPS:
            with denoising_step(eager, step, NUM_STEPS):
                expected = eager(sample, 500, encoder_hidden_states=context).sample
            outputs = []
            with denoising_step(traced, step, NUM_STEPS):
                ms = timed_call_ms(lambda: outputs.append(compiled(sample, 500, encoder_hidden_states=context).sample),
                                   device)
            got = outputs[0]
            err = rel_err(got, expected)
            worst = max(worst, math.inf if math.isnan(err) else err)  # a NaN reference (rel_err: nan) fails too
            phase = active_ops("sd15", 64, 64, step, NUM_STEPS)
            if phase in phases:  # the first call of each RAU-Net phase compiles
                later_calls.append(ms)
            phases.add(phase)
    graphs = counters["stats"]["unique_graphs"]
    ok = worst < TOLERANCE[dtype]
    cuda_graphs = "" if mode != "reduce-overhead" else (
        f"cuda graphs recorded {'n/a' if recorded is None else len(recorded)} ({len(phases)} RAU-Net phases)  ")
    print(f"{mode:16s} {'ok' if ok else 'MISMATCH':8s} max rel err {worst:.1e}  graphs {graphs}  {cuda_graphs}"
          f"median later call {statistics.median(later_calls):.1f} ms  (calls {', '.join(f'{t:.1f}' for t in later_calls)})")
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    parser.add_argument("--modes", nargs="+", default=["default", "reduce-overhead"],
                        help="torch.compile modes to check (reduce-overhead: CUDA graphs; CUDA only)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    modes = [m for m in args.modes if device.type == "cuda" or m == "default"]
    if not modes:  # a dry run off CUDA: check what can run there rather than nothing
        print(f"{', '.join(args.modes)}: CUDA only; checking the default mode instead")
        modes = ["default"]
    print(f"torch.compile(fullgraph=True) of the tiny SD1.5 UNet with HiDiffusion on {device} ({dtype}), "
          f"compile backend {args.backend}, steps {STEPS} of {NUM_STEPS}, random window phases")
    results = []
    for mode in modes:
        start = time.perf_counter()
        try:
            results.append(check(mode, args.backend, device, dtype))
        except Exception as error:  # report and go on to the next mode
            print(f"{mode:16s} FAILED: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            results.append(False)
        print(f"{'':16s} ({time.perf_counter() - start:.0f} s with compilation)")
    raise SystemExit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
