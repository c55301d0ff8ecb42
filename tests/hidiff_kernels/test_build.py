"""Every Triton kernel config the launchers can pick compiles for sm_90a and sm_80 (no GPU needed):
no register spills, shared memory within the GPU's limit, and tensor-core instructions where expected.

The tests run under TRITON_INTERPRET=1, where @triton.jit functions cannot be compiled, so one
subprocess without it runs ``python -m hidiff_kernels.build_check`` and the tests read its JSON.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hidiff_kernels.build_check import ARCHS, SMEM_LIMIT, TC_INSTR, all_builds

BUILDS = all_builds()
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("build_check") / "builds.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # not the user's ~/.triton
    cmd = [sys.executable, "-m", "hidiff_kernels.build_check", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if not out.exists():  # exit 1 with a JSON only means some configs have problems: the tests say which
        pytest.fail(f"build check crashed (exit {proc.returncode}):\n{proc.stderr[-5000:]}")
    return {(r["name"], r["arch"]): r for r in json.loads(out.read_text())["results"]}


def test_config_names_are_unique():
    names = [b.name for b in BUILDS]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("build", BUILDS, ids=lambda b: b.name.replace(" ", "-"))
def test_builds(results, build, arch):
    r = results.get((build.name, arch))
    assert r is not None, f"{build.name}: no sm_{arch} result from the build check"
    assert not r["error"], f"{build.name} does not compile for sm_{arch}: {r['error']}"
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
        f"{build.name} spills on sm_{arch}: {r['regs']} registers, "
        f"{r['spill_stores']} B spill stores / {r['spill_loads']} B spill loads"
    )
    assert r["smem"] <= SMEM_LIMIT[arch], f"{build.name} needs {r['smem']} B shared memory on sm_{arch}"
    if build.uses_tensor_cores:
        instr = TC_INSTR[arch]
        assert instr in r["tc"].split("+"), (
            f"{build.name}: no {instr} in its sm_{arch} PTX (tensor-core instructions: {r['tc'] or 'none'})"
        )
