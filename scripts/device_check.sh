#!/usr/bin/env bash
# The GPU check (issue 17, item 5): on a machine with an NVIDIA GPU, in well under 8 minutes,
#   1. install onnxruntime-gpu (if no CUDA-enabled onnxruntime is importable) and check that it
#      offers the CUDA execution provider;
#   2. build the sampler's kernel in place when it is not importable (else the numpy path runs:
#      the same tokens, slower sampling);
#   3. export the model in fp32 and fp16 (dynamo-export: fp32 verified against PyTorch on CPU,
#      fp16 on CUDA when this onnxruntime has it);
#   4. logits parity CUDA vs CPU, IO-binding vs plain-path generation equality (same tokens for
#      the same seed in ar, dynamic and verify), CUDA-vs-CPU token agreement (python -m
#      dynamo_bench.providers; its docstring defines every check and bound);
#   5. the bench tables for ar/dynamic/verify: fp32 and fp16 on CUDA and fp32 on CPU, side by
#      side (dynamo-bench --compare).
# It runs every step it can, prints what each printed, and exits 1 if any step failed.
#
#   scripts/device_check.sh [--provider cuda|cpu] [--model DIR] [--out DIR] [--python PY]
#                           [--ort-wheel FILE | --ort-parts DIR] [--artifacts DIR] [--quick]
#   scripts/device_check.sh --prepare-parts     # here, online: the onnxruntime-gpu wheel in 60 MB parts
#
# --provider cpu is the dry run of the same path on a machine without a GPU (step 1 is skipped,
# every check compares CPU with CPU, the IO-binding path runs with CPU buffers).
# --artifacts DIR takes DIR/fp32 and DIR/fp16, exported elsewhere, instead of step 3.
# --quick shortens the checks and the bench (for the test suite's dry run on a tiny model).
#
# On this project's GPU machine (Python 3.12, no internet; /work/shared/CUDA_ON_DEVICE.md): run
# --prepare-parts here, carry one part per call into /tmp/parts (`mkdir -p /tmp/parts && cp
# .parts/ortgpu.aa .parts/ortgpu.name .parts/ortgpu.sha256 /tmp/parts/`, then .ab, ...), and in the
# last call: `scripts/device_check.sh --ort-parts /tmp/parts --out $OUT`.
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO" || exit 2

PROVIDER=cuda
MODEL=artifacts/reference-t3
OUT_DIR=out/device-check
PY="${PYTHON:-python3}"
ORT_WHEEL=""
ORT_PARTS=""
ARTIFACTS=""
QUICK=0
PREPARE=0
ORT_GPU_VERSION="1.31.1"  # built for CUDA 13 (the GPU machine's libraries); see CUDA_ON_DEVICE.md
SITE=/tmp/dynamo-site     # where onnxruntime-gpu is installed (--target), ahead of the machine's own

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --provider) PROVIDER="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --out) OUT_DIR="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        --ort-wheel) ORT_WHEEL="$2"; shift 2 ;;
        --ort-parts) ORT_PARTS="$2"; shift 2 ;;
        --artifacts) ARTIFACTS="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --prepare-parts) PREPARE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "device_check: error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [[ $PROVIDER != cuda && $PROVIDER != cpu ]]; then
    echo "device_check: error: --provider must be cuda or cpu, got '$PROVIDER'" >&2; exit 2
fi

if [[ $PREPARE == 1 ]]; then
    # Here, with internet: the Python 3.12 wheel for the GPU machine, split for 64 MiB carries.
    set -e
    mkdir -p .whl .parts
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d .whl \
        "onnxruntime-gpu==$ORT_GPU_VERSION"
    wheel="$(ls .whl/onnxruntime_gpu-"$ORT_GPU_VERSION"-*.whl | head -1)"
    rm -f .parts/ortgpu.*
    split -b 60M "$wheel" .parts/ortgpu.
    basename "$wheel" > .parts/ortgpu.name
    (cd .whl && sha256sum "$(basename "$wheel")") > .parts/ortgpu.sha256
    ls -l .parts
    exit 0
fi

mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
FAILED=()

step() { echo; echo "== $1 ($((SECONDS - START)) s)"; }
fail() { echo "device_check: FAILED: $1" >&2; FAILED+=("$1"); }

# Run a module as `python -m`, after onnxruntime.preload_dlls() on CUDA: the CUDA provider's
# libraries (cuDNN, cuBLAS from pip's nvidia-* packages) are found only then, and without them
# ONNX Runtime silently falls back to the CPU.
pyrun() {
    DYNAMO_PRELOAD=$([[ $PROVIDER == cuda ]] && echo 1 || echo 0) "$PY" -c '
import os, runpy, sys
if os.environ["DYNAMO_PRELOAD"] == "1":
    import onnxruntime
    onnxruntime.preload_dlls()
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
' "$@"
}

has_cuda() {
    "$PY" -c '
import onnxruntime as ort
ort.preload_dlls()
assert "CUDAExecutionProvider" in ort.get_available_providers()
' >/dev/null 2>&1
}

# -- 1. onnxruntime-gpu ---------------------------------------------------------------------------
if [[ $PROVIDER == cuda ]]; then
    step "1. onnxruntime-gpu"
    if has_cuda; then
        echo "a CUDA-enabled onnxruntime is already importable"
    else
        wheel="$ORT_WHEEL"
        if [[ -n $ORT_PARTS ]]; then
            name="$(cat "$ORT_PARTS/ortgpu.name")" || { echo "device_check: error: $ORT_PARTS/ortgpu.name is missing" >&2; exit 2; }
            cat "$ORT_PARTS"/ortgpu.?? > "/tmp/$name"
            if [[ -f $ORT_PARTS/ortgpu.sha256 ]]; then
                (cd /tmp && sha256sum -c "$ORT_PARTS/ortgpu.sha256") || { echo "device_check: error: the reassembled wheel's sha256 differs: a part is missing or truncated" >&2; exit 2; }
            fi
            wheel="/tmp/$name"
        fi
        if [[ -n $wheel ]]; then
            "$PY" -m pip install -q --no-deps --no-index --no-compile --upgrade --target "$SITE" "$wheel"
        else
            "$PY" -m pip install -q --no-deps --upgrade --target "$SITE" "onnxruntime-gpu==$ORT_GPU_VERSION"
        fi || { echo "device_check: error: onnxruntime-gpu did not install (give --ort-wheel or --ort-parts)" >&2; exit 2; }
        export PYTHONPATH="$SITE:$PYTHONPATH"
        if ! has_cuda; then
            echo "device_check: error: onnxruntime-gpu installed but offers no CUDAExecutionProvider after preload_dlls()" >&2
            exit 2
        fi
    fi
    DYNAMO_PRELOAD=1 "$PY" -c 'import onnxruntime as o; o.preload_dlls(); print("onnxruntime", o.__version__, o.__file__, o.get_available_providers())'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

# -- 2. the sampler's kernel ----------------------------------------------------------------------
step "2. the sampler's compiled kernel"
if "$PY" -c "import runtime._native" 2>/dev/null; then
    echo "runtime._native is importable"
else
    # Sources and flags from pyproject.toml's ext-modules entry, so this build rounds as the install's.
    if "$PY" - <<'EOF'
import subprocess, sys, sysconfig, tomllib
ext = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["ext-modules"][0]
module = ext["name"].replace(".", "/") + sysconfig.get_config_var("EXT_SUFFIX")
cmd = ["cc", "-shared", "-fPIC", *ext.get("extra-compile-args", []), "-I" + sysconfig.get_paths()["include"],
       *ext["sources"], "-o", module, "-lm"]
print(" ".join(cmd))
sys.exit(subprocess.run(cmd).returncode)
EOF
    then
        "$PY" -c "import runtime._native" && echo "built runtime._native"
    else
        echo "note: the kernel did not build; the sampler runs its numpy path (same tokens, slower sampling)"
    fi
fi

# -- 3. export fp32 and fp16 ----------------------------------------------------------------------
if [[ -n $ARTIFACTS ]]; then
    step "3. artifacts from $ARTIFACTS (no export)"
    FP32="$ARTIFACTS/fp32"
    FP16="$ARTIFACTS/fp16"
else
    FP32="$OUT_DIR/fp32"
    FP16="$OUT_DIR/fp16"
    cooc=()
    [[ -d $MODEL/cooccurrence ]] && cooc=(--cooccurrence "$MODEL/cooccurrence")
    for dtype in fp32 fp16; do
        step "3. export $dtype"
        "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' || true
        pyrun converters.cli --model "$MODEL" "${cooc[@]}" --dtype "$dtype" --out "$OUT_DIR/$dtype" --force \
            || fail "export $dtype"
    done
fi
if [[ ! -f $FP32/manifest.json || ! -f $FP16/manifest.json ]]; then
    fail "no fp32 and fp16 artifacts to check"
    echo; echo "device_check: FAILED after $((SECONDS - START)) s: ${FAILED[*]}"
    exit 1
fi

if [[ $QUICK == 1 ]]; then
    CHECK_ARGS=(--prompts 2 --seeds 0 --max-new-tokens 8)
    BENCH_ARGS=(--max-new-tokens 8 --repeats 1 --warmup 0 --seeds 0 --eps-b 0.5)
else
    CHECK_ARGS=(--prompts 4 --seeds 0,1 --max-new-tokens 32)
    BENCH_ARGS=(--max-new-tokens 64 --repeats 2 --warmup 1 --seeds 0,1 --eps-b 0.5)
fi

# -- 4. parity and IO binding ---------------------------------------------------------------------
step "4. $PROVIDER vs cpu: logits parity, IO-binding generation equality"
pyrun dynamo_bench.providers --fp32 "$FP32" --fp16 "$FP16" --provider "$PROVIDER" "${CHECK_ARGS[@]}" \
    --json "$OUT_DIR/providers.json" || fail "provider checks (see the table above)"

# -- 5. the bench tables --------------------------------------------------------------------------
BENCHES=()
RUNS=("$PROVIDER:fp32" "$PROVIDER:fp16")
[[ $PROVIDER != cpu ]] && RUNS+=("cpu:fp32")  # the CPU beside the GPU, on the same machine
for run in "${RUNS[@]}"; do
    provider="${run%%:*}"
    dtype="${run##*:}"
    artifact="$FP32"
    [[ $dtype == fp16 ]] && artifact="$FP16"
    name="bench-$provider-$dtype"
    step "5. dynamo-bench: $dtype on $provider"
    if pyrun dynamo_bench.cli --artifact "$artifact" --provider "$provider" --modes ar,dynamic,verify \
        "${BENCH_ARGS[@]}" --no-progress --json "$OUT_DIR/$name.json" --markdown "$OUT_DIR/$name.md" \
        >/dev/null; then
        BENCHES+=("$OUT_DIR/$name.json")
    else
        fail "dynamo-bench $dtype on $provider"
    fi
done
if [[ ${#BENCHES[@]} -ge 2 ]]; then
    step "5. the bench tables side by side"
    pyrun dynamo_bench.cli --compare "${BENCHES[@]}" --markdown "$OUT_DIR/compare.md" || fail "dynamo-bench --compare"
fi

echo
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "device_check: FAILED after $((SECONDS - START)) s: ${FAILED[*]}"
    exit 1
fi
echo "device_check: all checks passed in $((SECONDS - START)) s; outputs in $OUT_DIR"
