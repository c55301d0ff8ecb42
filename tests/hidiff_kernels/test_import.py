"""Importing hidiff_kernels must work on any machine: no GPU driver is touched before a kernel runs."""
import subprocess
import sys
from pathlib import Path

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
