#!/usr/bin/env bash
# hidiff GPU device check: the one prepared script for a lent GPU machine (about 6 minutes estimated at the real
# sizes, never run on a GPU yet; the default stages are capped at 485 s in all). It needs no network.
#
# Before the call, here in the repository root, fetch the one package the GPU image lacks (it has torch,
# triton, einops, numpy, tqdm, huggingface-hub, safetensors, pillow, regex, requests, filelock, pytest,
# pytest-benchmark; see /work/.library/device/KINDS.md). diffusers is pure Python, and its other needs are
# in the image (importlib_metadata is only imported on Python < 3.8):
#
#   echo /.whl/ >> .git/info/exclude      # already ignored by .gitignore
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
#
# Then one device call: command "HIDIFF_COMMIT=<hash> bash benchmarks/device_check.sh", <hash> being what
# `git rev-parse --short HEAD` prints here before the call (the tree travels without .git, so $(git ...) in the
# command would run there and find none), carry [".whl"], timeout_s 600.
#
# Stages, each under its own `timeout` so one hang cannot eat the lease; a failed stage is reported and the
# next one runs:
#   parity   pytest tests/hidiff_kernels: the kernels against the reference on CUDA in fp32/fp16/bf16, each
#            launch on its class's default config (HIDIFF_AUTOTUNE=0: no autotuning of every test shape), in 8
#            processes where pytest-xdist is installed (the kernel builds dominate; the GPU image has it)
#   unet     hidiff bench --device cuda: full-size SD1.5 (1024², 2048²) and SDXL (2048², 4096²) UNet step, fp16,
#            CFG batch 2: vanilla / backend torch / backend triton at step 0 (RAU-Net + MSW-MSA) and step 49
#            (MSW-MSA only), with the triton-vs-torch relative error, and the op rows
#   msw, rau the tables of benchmarks/bench_msw_attention.py (FlexAttention on its bf16 rows and the memory
#            row: it compiles per shape) and benchmarks/bench_rau_conv.py
#   configs  (not by default, and in a call of its own or in place of msw: the default caps and its 120 s would
#            pass 600 s; ~70 kernel builds, about 100 s; the CPU suite runs every config through the interpreter) pytest -m all_configs: every autotune config of every kernel against the reference on
#            CUDA, at odd sizes (the timed stages check only the configs the autotuner picked, at their shapes)
#   compile  benchmarks/compile_check.py: torch.compile(fullgraph=True, mode="reduce-overhead": CUDA graphs) of a
#            patched tiny UNet with the Triton backend against eager, with the number of graphs recorded for
#            random window shifts (COMPILE_MODES="reduce-overhead default" adds the default mode)
#   build    (not by default: the CPU test suite compiles every config for sm_90a and sm_80) python -m
#            hidiff_kernels.build_check with the GPU machine's triton: registers, spills, shared memory
# Everything goes to $OUT/log (and bench.json, build.json, parity.txt, configs.txt, msw.txt, rau.txt, compile.txt); a
# compact summary is printed last.
#
# STAGES="unet msw" runs a subset; a dry run of the script on a CPU machine:
#   OUT=/tmp/dc STAGES="unet msw rau" DEVICE=cpu PYTHON=.venv/bin/python BENCH_ARGS="--sizes 64 --repeats 1" bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-${TMPDIR:-/tmp}/hidiff-device-check}
STAGES=${STAGES:-"parity unet msw rau compile"}
DEVICE=${DEVICE:-cuda}
BENCH_ARGS=${BENCH_ARGS:-"--repeats 3"}
COMPILE_MODES=${COMPILE_MODES:-reduce-overhead}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
SUMMARY=()

stage() {  # stage NAME LIMIT_S COMMAND...: run one stage under a time limit, record its status and time
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    [[ " $STAGES " == *" $name "* ]] || return 0
    echo
    echo "=== $name: $* (limit ${limit}s, $(date -u +%H:%M:%S))"
    timeout -k 15 "$limit" "$@"
    rc=$?
    local took=$((SECONDS - start)) status=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT after ${limit}s"; elif [ $rc -ne 0 ]; then status="FAILED (exit $rc)"; fi
    echo "=== $name: $status, ${took}s"
    SUMMARY+=("$(printf '%-8s %-22s %5ss' "$name" "$status" "$took")")
}

env_report() {
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
    timeout 60 "$PY" - <<'EOF'
import platform, torch, triton, diffusers
print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
      f"diffusers {diffusers.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
else:
    print("no CUDA device visible to torch")
EOF
}

summary() {
    echo
    echo "================ hidiff device check summary (commit ${HIDIFF_COMMIT:-unknown}) ================"
    "$PY" -c "import torch, triton; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', '| torch', torch.__version__, '| triton', triton.__version__)" 2>/dev/null
    printf '%s\n' "${SUMMARY[@]}"
    if [ -f "$OUT/build.json" ]; then
        "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); bad = [r for r in d['results'] if r['error'] or r['spill_stores'] or r['spill_loads']]; print(f\"build: {len(d['results'])} builds in {d['total_s']} s, {len(bad)} with errors or spills\")" "$OUT/build.json"
    fi
    if [ -f "$OUT/parity.txt" ]; then echo "parity: $(tail -n 1 "$OUT/parity.txt")"; fi
    if [ -f "$OUT/configs.txt" ]; then echo "every config: $(tail -n 1 "$OUT/configs.txt")"; fi
    if [ -f "$OUT/msw.txt" ]; then
        echo "msw_attention, fused rows (median ms, TFLOP/s, % of dense bf16, vs original path, peak MiB, rel err):"
        grep -E "^dense| fused " "$OUT/msw.txt"
    fi
    if [ -f "$OUT/rau.txt" ]; then
        echo "rau convs, hidiff rows (median ms, TFLOP/s, vs cuDNN, peak MiB, rel err):"
        grep " hidiff " "$OUT/rau.txt"
    fi
    if [ -f "$OUT/compile.txt" ]; then echo "torch.compile:"; grep -E "^(default|reduce-overhead) " "$OUT/compile.txt"; fi
    if [ -f "$OUT/bench.json" ]; then
        "$PY" -c "import json, sys; from hidiff_models import bench; r = json.load(open(sys.argv[1])); print(('PARTIAL (stage cut short) ' if r['meta'].get('partial') else '') + bench.compact_table(r))" "$OUT/bench.json"
    fi
}

main() {
    echo "hidiff device check, commit ${HIDIFF_COMMIT:-unknown}, $(date -u +%Y-%m-%dT%H:%M:%SZ), stages: $STAGES"
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "installing the carried wheels failed"; return 1; }
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
    "$PY" -c "import diffusers" || { echo "cannot import diffusers (above): carry .whl, see the header of this script"; return 1; }
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    unset TRITON_INTERPRET

    # The default stages' limits add up to 485 s (with the install, env report and summary, inside a 600 s call);
    # the measurements come before the checks that compile many kernels.
    echo
    echo "=== env"
    env_report
    stage build 60 "$PY" -m hidiff_kernels.build_check --json "$OUT/build.json"
    local parallel=""
    "$PY" -c "import xdist" 2>/dev/null && parallel="-p xdist -n 8"  # -p: also where plugin autoload is off
    stage parity 75 bash -c "set -o pipefail; HIDIFF_AUTOTUNE=0 '$PY' -m pytest tests/hidiff_kernels -q -rfE $parallel \
        -p no:cacheprovider -m 'not all_configs' --ignore=tests/hidiff_kernels/test_build.py 2>&1 | tee '$OUT/parity.txt'"
    # shellcheck disable=SC2086
    stage unet 130 "$PY" -m hidiff_models bench --device "$DEVICE" $BENCH_ARGS --json "$OUT/bench.json"
    stage msw 110 bash -c "set -o pipefail; '$PY' benchmarks/bench_msw_attention.py 2>&1 | tee '$OUT/msw.txt'"
    stage rau 80 bash -c "set -o pipefail; '$PY' benchmarks/bench_rau_conv.py 2>&1 | tee '$OUT/rau.txt'"
    stage configs 120 bash -c "set -o pipefail; '$PY' -m pytest tests/hidiff_kernels -q -p no:cacheprovider \
        -m all_configs 2>&1 | tee '$OUT/configs.txt'"
    # CUDA graphs (how many random window shifts record is the open question); no autotuning
    stage compile 90 bash -c "set -o pipefail; HIDIFF_AUTOTUNE=0 '$PY' benchmarks/compile_check.py \
        --modes $COMPILE_MODES 2>&1 | tee '$OUT/compile.txt'"
    summary
}

main 2>&1 | tee "$OUT/log"
