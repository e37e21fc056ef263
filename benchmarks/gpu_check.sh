#!/usr/bin/env bash
# The GPU check: one command, one device call of at most ~9½ minutes, that runs the CUDA tests,
# times the targets, the epoch and the host path, and says why the kernels take their time.
#
#   bash benchmarks/gpu_check.sh              # on a CUDA machine
#   bash benchmarks/gpu_check.sh --dry-run    # on a CPU: every stage at toy sizes (Triton's
#                                             # interpreter); its numbers mean nothing
#
# Stages, each time-boxed (one that fails or runs out of time does not stop the next):
#   1. tests on CUDA: the kernel tests and the whole gradient battery (FASTMIL_BATTERY_CASES=all)
#   2. benchmarks: pytest benchmarks/test_attention_pool.py --suite gpu   -> bench.json
#   3. the epoch: python -m benchmarks.epoch                               -> epoch.json
#   4. host time per call: python -m benchmarks.profile host               -> host.json
#   5. Nsight Compute, where installed: one call of the slide and of the 8 slides -> ncu-CASE.txt
#   6. tile sweep with the time left                                       -> tile_sweep.json
# Files go to $OUT (the device tool's folder), else out/gpu_check. Back here, keep the run as one
# compact file and make the report from it:
#   python -m benchmarks.report OUT/bench.json --host OUT/host.json --epoch OUT/epoch.json \
#       --compact benchmarks/gpu_runs/DATE-CARD.json --plot benchmarks/results.png
# Limits (s): TEST_TIMEOUT 200, BENCH_TIMEOUT 130, EPOCH_TIMEOUT 120, PROFILE_TIMEOUT 40,
# NCU_TIMEOUT 40, SWEEP_TIMEOUT 50: 580 s at most, plus start-up.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
OUT_DIR=${OUT:-out/gpu_check}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"; : >"$LOG"
T0=$(date +%s)
say() { echo "$*" | tee -a "$LOG"; }
# stage NAME LIMIT CMD...: time-boxed (SIGINT first, so that pytest still writes its files)
stage() {
  local name=$1 limit=$2 start; shift 2
  start=$(date +%s)
  say "== $name (limit $limit s): $*"
  timeout -s INT -k 10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  say "== $name: exit status $rc, $(( $(date +%s) - start )) s"
  return $rc
}

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 FASTMIL_BATTERY_CASES=24
  TESTS="tests/test_triton.py::test_projection_gemms tests/test_gradients.py"
  SUITE=smoke; EPOCH=(--smoke); DEVICE=cpu
else
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { say "no CUDA device here: on a CPU, bash benchmarks/gpu_check.sh --dry-run"; exit 2; }
  export FASTMIL_BATTERY_CASES=all
  TESTS="tests/test_triton.py tests/test_cuda.py tests/test_gradients.py tests/test_options.py"
  SUITE=gpu; EPOCH=(); DEVICE=cuda
fi
"$PYTHON" -c "
import platform, torch, triton
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (dry run)'
print(f'{dev}; torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}, '
      f'python {platform.python_version()}')" | tee -a "$LOG"
XDIST=(); "$PYTHON" -c "import xdist" 2>/dev/null && [ "$DRY" = 0 ] && XDIST=(-n "${XDIST_N:-8}")

# shellcheck disable=SC2086  # TESTS is a word list
stage tests "${TEST_TIMEOUT:-200}" "$PYTHON" -m pytest $TESTS -q -p no:cacheprovider -rfE \
  "${XDIST[@]}"
stage bench "${BENCH_TIMEOUT:-130}" "$PYTHON" -m pytest benchmarks/test_attention_pool.py -q \
  -p no:cacheprovider --suite "$SUITE" --bench-budget-s $(( ${BENCH_TIMEOUT:-130} - 15 )) \
  --benchmark-json "$OUT_DIR/bench.json" --benchmark-disable-gc
stage epoch "${EPOCH_TIMEOUT:-120}" "$PYTHON" -m benchmarks.epoch "${EPOCH[@]}" \
  --budget-s $(( ${EPOCH_TIMEOUT:-120} - 15 )) --out "$OUT_DIR/epoch.json" --no-progress
if [ "$DRY" = 1 ]; then  # the host path through Triton's launcher, on a stand-in driver
  stage host "${PROFILE_TIMEOUT:-40}" env -u TRITON_INTERPRET "$PYTHON" -m benchmarks.profile \
    host --reps 20 --json "$OUT_DIR/host.json"
else
  stage host "${PROFILE_TIMEOUT:-40}" "$PYTHON" -m benchmarks.profile host --device cuda \
    --reps 200 --json "$OUT_DIR/host.json"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null \
        | head -n 1)
  for case in slide slides-8; do
    [ -n "$NCU" ] && stage "ncu $case" "${NCU_TIMEOUT:-40}" "$NCU" --profile-from-start off \
      -k 'regex:_(fwd|bwd|merge|sum|attention)_kernel' --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
      --log-file "$OUT_DIR/ncu-$case.txt" "$PYTHON" -m benchmarks.profile ncu "$case"
  done
fi
left=$(( 560 - ($(date +%s) - T0) ))
if [ "$left" -gt 20 ]; then
  SWEEP=(--json "$OUT_DIR/tile_sweep.json" --budget-s $(( left - 15 )))
  [ "$DRY" = 1 ] && SWEEP+=(--dry-run)
  stage sweep "$left" "$PYTHON" -m benchmarks.tile_sweep "${SWEEP[@]}"
fi
if [ -s "$OUT_DIR/bench.json" ]; then
  "$PYTHON" -m benchmarks.report "$OUT_DIR/bench.json" \
    $([ -s "$OUT_DIR/host.json" ] && echo --host "$OUT_DIR/host.json") \
    $([ -s "$OUT_DIR/epoch.json" ] && echo --epoch "$OUT_DIR/epoch.json") \
    --out "$OUT_DIR/RESULTS.md" >>"$LOG" 2>&1 && sed -n '/## Targets/,/## Host/p' \
    "$OUT_DIR/RESULTS.md" | tee -a "$LOG"
fi
say "gpu_check.sh: $(( $(date +%s) - T0 )) s in all ($DEVICE); files in $OUT_DIR"
