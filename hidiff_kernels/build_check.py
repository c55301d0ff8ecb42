"""Compile every Triton kernel configuration for real GPU targets on a machine without a GPU.

Each op module under ``hidiff_kernels.ops`` exposes ``build_configs()``: the list of ``KernelBuild``
its launcher can pick (every autotune config x dtype x head_dim class ...).

``python -m hidiff_kernels.build_check [--arch 90 80] [--json out.json]`` compiles each of them for
sm_90a and sm_80 with ``triton.compile`` and prints registers, spills, shared memory and whether the
``tl.dot`` calls became tensor-core instructions (``wgmma`` on sm_90a, ``mma.sync`` on sm_80);
``--module hidiff_kernels.ops.rau_conv`` or ``-k "fp16 d=64"`` narrow it down; exit status 1 when a
config spills, overflows shared memory, misses its tensor-core instruction or does not compile.
Registers and spills come from the ``ptxas -v`` log: Triton's own ``n_regs``/``n_spills`` are only
filled in when a kernel is loaded onto a GPU. Must run with TRITON_INTERPRET unset (the interpreter
replaces ``@triton.jit`` functions with Python ones).
"""
import argparse
import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from ._common import KernelBuild  # kept there: the ops need it, and importing them must not import this module


ARCHS = (90, 80)
# Largest dynamic shared memory one block may use: H100 (sm_90) 227 KiB, A100 (sm_80) 163 KiB.
SMEM_LIMIT = {90: 232448, 80: 166912}
# The instruction each arch's tensor-core tl.dot must lower to.
TC_INSTR = {90: "wgmma", 80: "mma"}


@dataclass
class BuildResult:
    name: str
    arch: int
    uses_tensor_cores: bool
    regs: int = -1  # registers per thread
    spill_stores: int = -1  # bytes
    spill_loads: int = -1  # bytes
    smem: int = -1  # dynamic shared memory bytes (Triton's metadata.shared)
    tc: str = ""  # tensor-core instructions in the PTX: "wgmma", "mma", "wgmma+mma" or ""
    compile_s: float = 0.0
    error: str = ""  # compile failure, empty when it compiled

    def problems(self) -> list:
        """What would make this config unfit for its GPU; empty when it is fine."""
        if self.error:
            return [f"compile failed: {self.error.strip().splitlines()[-1]}"]
        out = []
        if self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores} B stores / {self.spill_loads} B loads")
        if self.smem > SMEM_LIMIT[self.arch]:
            out.append(f"shared memory {self.smem} B > {SMEM_LIMIT[self.arch]} B limit")
        if self.uses_tensor_cores and TC_INSTR[self.arch] not in self.tc.split("+"):
            out.append(f"no {TC_INSTR[self.arch]} in PTX (tensor-core instructions: {self.tc or 'none'})")
        return out


def _ast_source(build: KernelBuild):
    """The ASTSource for ``build``, in the form this Triton version takes."""
    import triton

    fn = build.fn
    if not hasattr(fn, "arg_names"):
        raise TypeError("fn is not a compilable @triton.jit function (TRITON_INTERPRET set at import?)")
    constexprs = dict(build.constexprs)
    for p in getattr(fn, "params", []):  # constexpr args left out fall back to their defaults
        if p.is_constexpr and p.name not in constexprs and p.default is not inspect.Parameter.empty:
            constexprs[p.name] = p.default
    signature, hints = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
            continue
        if arg not in build.signature:
            raise ValueError(f"argument {arg!r} is in neither signature nor constexprs")
        ty, _, hint = build.signature[arg].partition(":")
        signature[arg] = ty
        if ty.startswith("*") or hint == "16":
            hints[(i,)] = [["tt.divisibility", 16]]
    if "constexprs" in inspect.signature(triton.compiler.ASTSource).parameters:
        # Triton >= 3.3 (3.6, 3.9): every argument in the signature, constexprs by name, hints by (index,)
        return triton.compiler.ASTSource(fn, signature, constexprs=constexprs, attrs=hints)
    # Triton 3.2: the signature without constexprs, "constants" by name, hints as an AttrsDescriptor
    from triton.backends.compiler import AttrsDescriptor

    signature = {k: v for k, v in signature.items() if v != "constexpr"}
    attrs = AttrsDescriptor.from_hints({i: 16 for (i,) in hints})
    return triton.compiler.ASTSource(fn, signature, constants=constexprs, attrs=attrs)


def _parse_ptxas_log(log: str):
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        return None
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def _run_ptxas(ptx: str, arch: int) -> str:
    """For Triton versions that cannot print their ptxas log (3.2): run its ptxas -v on the PTX."""
    from triton.backends.nvidia import compiler as nv

    if hasattr(nv, "get_ptxas"):  # newer Tritons pick ptxas per arch (3.9 builds sm_90 with ptxas-blackwell)
        ptxas = nv.get_ptxas(arch) if inspect.signature(nv.get_ptxas).parameters else nv.get_ptxas()  # 3.4: no arch
        ptxas = ptxas.path if hasattr(ptxas, "path") else ptxas[0]  # 3.3: a (path, version) tuple
    else:
        ptxas = nv._path_to_binary("ptxas")[0]
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        cmd = [ptxas, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(d) / "k.cubin")]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def compile_build(build: KernelBuild, arch: int) -> BuildResult:
    """Compile ``build`` for GPUTarget("cuda", arch, 32) and report its resource use.

    Triton turns capability 90 into sm_90a itself, which is what lets it pick wgmma.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    res = BuildResult(build.name, arch, build.uses_tensor_cores)
    # Always compile (a cache hit runs no ptxas) and have Triton print its ptxas -v log to stdout.
    env = {"TRITON_ALWAYS_COMPILE": "1", "TRITON_DUMP_PTXAS_LOG": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                _ast_source(build),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": build.num_warps, "num_stages": build.num_stages},
            )
    except Exception as e:  # a config that does not compile is a result, not a crash
        res.error = f"{type(e).__name__}: {e}"
        return res
    finally:
        res.compile_s = round(time.perf_counter() - start, 2)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    ptx = kernel.asm["ptx"]
    usage = _parse_ptxas_log(log.getvalue()) or _parse_ptxas_log(_run_ptxas(ptx, arch))
    if usage is None:
        res.error = "no register report in the ptxas -v log"
        return res
    res.regs, res.spill_stores, res.spill_loads = usage
    res.smem = kernel.metadata.shared
    found = [n for n, pat in (("wgmma", r"\bwgmma\.mma_async"), ("mma", r"\bmma\.sync")) if re.search(pat, ptx)]
    res.tc = "+".join(found)
    return res


def all_builds(modules=None) -> list:
    """``build_configs()`` of every module in hidiff_kernels.ops that has it (or of ``modules``, by name)."""
    if modules is None:
        from . import ops

        modules = [f"{ops.__name__}.{m.name}" for m in pkgutil.iter_modules(ops.__path__)]
    builds = []
    for name in sorted(modules):
        mod = importlib.import_module(name)
        if hasattr(mod, "build_configs"):
            builds.extend(mod.build_configs())
    return builds


_worker_builds = {}


def _compile_by_name(modules, name, arch):
    """Process-pool task: look the build up by name in this worker, then compile it."""
    if not _worker_builds:
        _worker_builds.update((b.name, b) for b in all_builds(modules))
    return compile_build(_worker_builds[name], arch)


def check(builds, archs=ARCHS, jobs=1, modules=None, progress=sys.stderr) -> list:
    """Compile every (build, arch); ``jobs`` > 1 compiles in that many worker processes."""
    tasks = [(b, a) for b in builds for a in archs]
    results = []

    def done(r):
        results.append(r)
        status = "; ".join(r.problems()) or "ok"
        print(f"[{len(results)}/{len(tasks)}] sm_{r.arch} {r.name}: {r.compile_s:.1f}s {status}", file=progress, flush=True)

    if jobs <= 1:
        for b, a in tasks:
            done(compile_build(b, a))
    else:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_compile_by_name, modules, b.name, a) for b, a in tasks]
            for f in as_completed(futures):
                done(f.result())
    order = {(b.name, a): i for i, (b, a) in enumerate(tasks)}
    return sorted(results, key=lambda r: order[(r.name, r.arch)])


def format_table(results) -> str:
    width = max([len(r.name) for r in results] + [6])
    rows = [f"{'config':<{width}}  arch   regs  spill(st/ld)    smem  tc          time  problems"]
    for r in results:
        regs, spill, smem = ("-", "-", "-") if r.error else (r.regs, f"{r.spill_stores}/{r.spill_loads}", r.smem)
        rows.append(
            f"{r.name:<{width}}  sm_{r.arch}  {regs:>4}  {spill:>12}  {smem:>6}  {r.tc or '-':<9}  "
            f"{r.compile_s:>5.1f}s  {'; '.join(r.problems()) or 'ok'}"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--module", nargs="+", help="op modules to check (default: all in hidiff_kernels.ops)")
    parser.add_argument("-k", dest="match", help="only configs whose name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    args = parser.parse_args(argv)
    from ._common import interpreter_enabled

    if interpreter_enabled():
        parser.error("unset TRITON_INTERPRET: under the interpreter @triton.jit functions cannot be compiled")

    import triton

    builds = [b for b in all_builds(args.module) if not args.match or args.match in b.name]
    names = [b.name for b in builds]
    if len(set(names)) != len(names):
        parser.error(f"duplicate config names: {sorted({n for n in names if names.count(n) > 1})}")
    print(f"triton {triton.__version__}: {len(builds)} configs x sm_{', sm_'.join(map(str, args.arch))}", file=sys.stderr)
    start = time.perf_counter()
    results = check(builds, args.arch, args.jobs, args.module)
    total = time.perf_counter() - start
    if results:
        print(format_table(results))
    bad = [r for r in results if r.problems()]
    print(f"{len(results)} builds, {len(bad)} with problems, {total:.1f}s", file=sys.stderr)
    if args.json:
        payload = {"triton": triton.__version__, "total_s": round(total, 1), "results": [asdict(r) for r in results]}
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    # Run the importable copy of this module, so spawned workers and the ops modules share its classes.
    from hidiff_kernels import build_check

    sys.exit(build_check.main())
