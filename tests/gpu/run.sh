#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the CUDA backend against the interpreter (every stdlib
# item), the benchmarks of the CUDA issue's goals (AdamW over 256M parameters against the copy
# bandwidth; the bf16 linear cross-entropy at the Gemma 2 2B setting against the published Cut
# Cross-Entropy time and PyTorch eager), the device training path (a step copies only the batch
# in and the scalars out), a short `recipec train --backend cuda`, and the differential tests
# over every backend with the GPU among them.
#
# It runs the executables in `.gpu/bin` that tests/gpu/bundle.sh built (so the GPU machine needs
# no Rust and no network: build the bundle where Rust is, carry `.gpu` along); without a bundle
# it runs bundle.sh first, which needs Rust. NVRTC is found where the machine has it (a CUDA 12
# or 13 toolkit or Python wheel). Each step runs under a time limit taken from one budget
# (RECIPEC_GPU_BUDGET seconds, default 540) and a failed step does not stop the others. Logs and
# the summary (gpu-summary.txt) go to $OUT where it is set, else to target/. RECIPEC_GPU_STEPS
# names the steps to run (default: all of gpu-tests gpu-bench device-train recipec-train
# backends). Exits 1 if a step failed or ran out of time; without a GPU the GPU parts skip,
# saying why, and the training run is not attempted.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LOGS=${OUT:-$ROOT/target}
mkdir -p "$LOGS"
SUMMARY=$LOGS/gpu-summary.txt
: >"$SUMMARY"
BUDGET=${RECIPEC_GPU_BUDGET:-540}
START=$SECONDS
say() { echo "$*" | tee -a "$SUMMARY"; }

if [ ! -x .gpu/bin/gpu-tests ]; then
    command -v cargo >/dev/null || { say "no bundle in .gpu/ and no cargo: run tests/gpu/bundle.sh where Rust is and carry .gpu"; exit 2; }
    tests/gpu/bundle.sh || { say "bundle.sh failed"; exit 2; }
    START=$SECONDS
fi
say "bundle built from $(head -1 .gpu/commit) at $(cat .gpu/root), $(grep '^profile' .gpu/commit)"
grep '^modified' .gpu/commit | sed 's/^/  /' | tee -a "$SUMMARY"
# The executables read the repository's files at the path they were built in.
BUILT=$(cat .gpu/root)
if [ "$BUILT" != "$ROOT" ]; then
    if [ -e "$BUILT" ] && [ ! "$BUILT" -ef "$ROOT" ]; then
        say "the bundle was built at $BUILT, which exists here and is not this checkout: rebuild it elsewhere"
        exit 2
    fi
    [ -e "$BUILT" ] || { mkdir -p "$(dirname "$BUILT")" && ln -s "$ROOT" "$BUILT"; } ||
        { say "cannot link $BUILT to $ROOT"; exit 2; }
fi

# NVRTC under a name cudarc loads (libnvrtc.so, .so.12, ...; not .so.13), its builtins beside it.
nvrtc=""
pydir=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0] + "/"))' 2>/dev/null || true)
for v in 12 13; do
    nvrtc=$(find ${LD_LIBRARY_PATH//:/ } $pydir /usr/local /opt /usr/lib /usr/lib64 -name "libnvrtc.so.$v" 2>/dev/null | head -1)
    [ -n "$nvrtc" ] && break
done
if [ -n "$nvrtc" ]; then
    mkdir -p target/gpu-lib
    ln -sf "$nvrtc" target/gpu-lib/libnvrtc.so
    export LD_LIBRARY_PATH="$ROOT/target/gpu-lib:$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "NVRTC: $nvrtc"
else
    say "NVRTC: none found (the GPU steps will say so)"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$SUMMARY"

STEPS=" ${RECIPEC_GPU_STEPS:-gpu-tests gpu-bench device-train recipec-train backends} "
FAILED=0
# step NAME LIMIT_S COMMAND...: runs COMMAND under the smaller of LIMIT_S and what is left of
# the budget, its output in $LOGS/NAME.log, and says in the summary how it ended.
step() {
    local name=$1 cap=$2
    shift 2
    [[ "$STEPS" == *" $name "* ]] || return 0
    local left=$((BUDGET - (SECONDS - START) - 5))
    local t=$((cap < left ? cap : left))
    if [ "$t" -lt 15 ]; then
        say "== $name: not run (the time budget is spent)"
        FAILED=1
        return
    fi
    local t0=$SECONDS
    timeout -k 5 "$t" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    local how="ok"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && how="STOPPED at its ${t} s limit"
    [ $rc -ne 0 ] && [ "$how" = "ok" ] && how="FAILED (exit $rc)"
    [ $rc -ne 0 ] && FAILED=1
    say "== $name: $how in $((SECONDS - t0)) s"
    grep -E "^test result|passed|skipped|panicked|GPU|GiB|MiB|ms|loss|error|graphs" "$LOGS/$name.log" | grep -v "^\s*$" | tail -25 | sed 's/^/   /' | tee -a "$SUMMARY"
}

B=.gpu/bin
step gpu-tests 150 $B/gpu-tests --nocapture
step gpu-bench 240 $B/gpu-bench --bench
step device-train 90 $B/train-tests device_training --nocapture
rm -rf target/gpu-train
if grep -q "skipped: no CUDA device" "$LOGS/gpu-tests.log" 2>/dev/null; then
    [[ "$STEPS" == *" recipec-train "* ]] && say "== recipec-train: not run (no CUDA device)"
else
    step recipec-train 90 $B/recipec train recipes/tiny_gpt.recipe --steps 20 --backend cuda --out target/gpu-train
fi
step backends 300 $B/backends-tests
say "total: $((SECONDS - START)) s; logs in $LOGS"
exit $FAILED
