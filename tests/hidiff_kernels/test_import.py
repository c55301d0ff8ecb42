"""Importing hidiff_kernels must work on any machine: no GPU driver is touched before a kernel runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# triton 3.3 asks the active GPU driver for a benchmarker when an Autotuner is created, which raises
# on a machine without a GPU; the launchers build their autotuners on first use instead.
SCRIPT = """
import triton

def autotune(*args, **kwargs):
    raise RuntimeError("an autotuner was created at import")

triton.autotune = autotune
import hidiff_kernels
"""


def test_import_creates_no_autotuner():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


# Triton picks interpreter or compiler as it defines each kernel: the ops must follow how their kernels were
# built, whatever the variable says at call time (set late in a notebook) or however it is spelt.
KERNELS_AS_BUILT = """
import os, sys, torch
import hidiff_kernels
from hidiff_kernels import reference
from hidiff_kernels.ops.msw_attention import _msw_attention_kernel
from triton.runtime.interpreter import InterpretedFunction

interpreted = isinstance(_msw_attention_kernel, InterpretedFunction)
assert hidiff_kernels.interpreter_enabled() == interpreted == (sys.argv[1] == "interpreted"), interpreted
os.environ["TRITON_INTERPRET"] = sys.argv[2]
torch.manual_seed(0)
q, k, v = (torch.randn(1, 12, 2, 8) for _ in range(3))
want = reference.msw_attention(q, k, v, (3, 4), (1, 2))
assert hidiff_kernels.triton_runs_on(q.device) == interpreted
out = hidiff_kernels.msw_attention(q, k, v, (3, 4), (1, 2))
assert ((out - want).norm() / want.norm()).item() < 1e-5
"""


@pytest.mark.parametrize("at_import, built, later", [
    (None, "compiled", "1"),  # set after the import: the CPU call takes the reference, not a GPU-only kernel
    ("true", "interpreted", "true"),  # Triton's other spelling: the interpreted kernels run
])
def test_ops_follow_how_the_kernels_were_built(at_import, built, later):
    if built == "interpreted":
        import numpy as np
        import triton

        from hidiff_kernels._common import _interpreter_problem

        problem = _interpreter_problem(triton.__version__, np.__version__)  # the GPU image's pair: 3.6, numpy 2.5
        if problem:
            pytest.skip(problem)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if at_import:
        env["TRITON_INTERPRET"] = at_import
    done = subprocess.run([sys.executable, "-c", KERNELS_AS_BUILT, built, later], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
