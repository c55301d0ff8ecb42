"""The benchmarks only run in full on a lent GPU, rarely: these runs on CPU keep them from rotting unseen
(a renamed helper or a changed table would otherwise first fail during the scarce device time)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(cmd, env=None, timeout=300):
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_pytest_benchmark_suites_run():
    out = run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-q", "-p", "no:cacheprovider"])
    assert " passed" in out


def test_device_check_dry_run_on_cpu(tmp_path):
    """The device script's measuring stages and its summary, at tiny sizes on CPU (the same code paths the
    GPU run takes, but for the Triton launches)."""
    out = run(["bash", "benchmarks/device_check.sh"], env=dict(
        OUT=str(tmp_path), STAGES="unet msw rau", DEVICE="cpu", PYTHON=sys.executable,
        BENCH_ARGS="--sizes 64 --repeats 1"))
    summary = out[out.index("hidiff device check summary"):]
    for stage in ("unet", "msw", "rau"):
        assert any(line.split()[:2] == [stage, "ok"] for line in summary.splitlines()), summary
    assert "fused" in summary and "hidiff" in summary and "sdxl" in summary, summary
    assert {"bench.json", "msw.txt", "rau.txt", "log"} <= {p.name for p in tmp_path.iterdir()}
