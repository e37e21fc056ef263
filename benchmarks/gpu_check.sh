#!/usr/bin/env bash
# The GPU check: one command, at most 9⅓ minutes on an H100 (one device call of at most 10), that
# checks the kernels on the chip, tunes their tiles, times the targets with the tuned tiles and
# prints a short table last.
#
#   benchmarks/gpu_check.sh              # on a CUDA machine
#   benchmarks/gpu_check.sh --dry-run    # on CPU: tiny shapes, Triton's interpreter (tests this
#                                        # script end to end; its numbers mean nothing)
#
# Stages, each time-boxed; one that fails or runs out of time does not stop the next:
#   1. CUDA kernel tests: pytest tests/test_triton.py tests/test_cuda.py (+ tests/test_options.py)
#      on the GPU, every dtype (bf16 included); pytest-xdist spreads the Triton compiles when
#      it is installed.
#   2. tile sweep (benchmarks/tile_sweep.py): every candidate tile timed per class, the targets'
#      classes first; its table (tile_sweep.json) is handed to the next stages through
#      FASTMIL_TILES, so they time the tuned kernels. SWEEP=0 skips it (the default tiles).
#   3. benchmarks: pytest benchmarks/ --suite gpu-check: the targets' shapes, each in its
#      workload (frozen features, end-to-end, inference), fastmil triton (recompute=True and
#      False, and the cuBLAS-projection design) vs eager vs torch.compile (default) vs fastmil
#      torch, one process, with memory and where each call's device time goes per kernel.
#   4. kernel launches of one call at the MNIST-bags shape, per workload (torch.profiler), and
#      the host time of one such call with cProfile's table of where it goes (benchmarks.host_time);
#      where Nsight Compute is installed, why the kernels of one call take their time: ncu's
#      speed of light, memory, occupancy and warp-stall sections for the cases NCU_CASES
#      (benchmarks.ncu_target; default "wsi mnist").
#   5. report: the targets and launch tables printed last (RESULTS.md kept in the cache folder:
#      it is made again from bench.json and launches.json back here).
#
# Files, in OUT_DIR ($OUT_DIR, else $OUT, the device tool's folder, else out/gpu_check):
#   gpu_check.log (everything), tile_sweep.json, tile_sweep.md, bench.json, launches.json,
#   host_time.json, host_profile.txt, ncu.txt (8: the device tool's limit).
# Back here, merge them into benchmarks/RESULTS.md (with any other run's JSON):
#   python -m benchmarks.report OUT_DIR/bench.json --launches OUT_DIR/launches.json
# and paste tile_sweep.md's MEASURED_TILES into fastmil/kernels/attention_pool.py.
#
# Environment: FASTMIL_COMMIT (the commit to record where the tree has no .git: write
# FASTMIL_COMMIT=<git rev-parse --short HEAD> into the remote command), TESTS (pytest paths of
# stage 1), TEST_TIMEOUT (s, default 120), SWEEP (1), SWEEP_KINDS (the sweep's --kinds: all),
# SWEEP_BUDGET (s after which no tile class starts, 65), SWEEP_TIMEOUT (hard limit, 110),
# BENCH_BUDGET (s after which no benchmark starts, 160), BENCH_TIMEOUT (hard limit, 190),
# LAUNCH_TIMEOUT (30), HOST_TIMEOUT (25), NCU_CASES ("wsi mnist"), NCU_TIMEOUT (s per case,
# 30), XDIST (pytest-xdist workers, 8), PYTHON (python3). With the defaults every stage ends
# within its limit: at most 120 + 110 + 190 + 30 + 25 + 60 s plus ~20 s of start-up and report,
# 555 s: one device call (timeout_s=590; 600 at most). The runs of 2026-11-26 on an H100 took
# 177 and 203 s in all.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}  # the device image: python3
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
OUT_DIR=${OUT_DIR:-${OUT:-out/gpu_check}}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
# compile caches of this run (a fresh machine has none; a rerun on a warm one reuses them)
CACHE=${GPU_CHECK_CACHE:-${TMPDIR:-/tmp}/fastmil-gpu-check}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$CACHE/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$CACHE/inductor}
T0=$(date +%s)

mkdir -p "$CACHE"
say() { echo "$*" | tee -a "$LOG"; }
# stage NAME LIMIT CMD...: the output goes to $CACHE/NAME.log and then to the log (the device
# tool returns the log), minus the profiler's start/stop chatter; at the time limit the command
# gets SIGINT first, so that pytest still ends its session
stage() {
  local name=$1 limit=$2; shift 2
  timeout -s INT -k 10 "$limit" "$@" >"$CACHE/$name.log" 2>&1
  local rc=$?
  grep -v '^USDT:' "$CACHE/$name.log" >>"$LOG"
  return $rc
}
summary_line() {  # pytest's last summary line in a stage's log
  grep -E '[0-9]+ (passed|failed|skipped|deselected|error)|no tests ran' "$CACHE/$1.log" \
    | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//'
}

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  SUITE=dry-run
  LAUNCH_ARGS=(--device cpu --bags 64 --D 64 --L 32)
else
  SUITE=gpu-check
  LAUNCH_ARGS=()
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "gpu_check.sh: no CUDA device visible (on a CPU machine: benchmarks/gpu_check.sh --dry-run)"
    exit 2
  fi
fi
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.util, platform, torch
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
tri = importlib.util.find_spec("triton")
ver = __import__("triton").__version__ if tri else "not installed"
print(f"gpu_check.sh: {dev}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {ver}, python {platform.python_version()}")
EOF
if [ "$DRY" = 0 ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv,noheader >>"$LOG" 2>&1 || true
fi

# -- 1. kernel tests -------------------------------------------------------------------------
if [ -z "${TESTS:-}" ]; then
  TESTS="tests/test_triton.py tests/test_cuda.py"
  [ -f tests/test_options.py ] && TESTS="$TESTS tests/test_options.py"
fi
XDIST_ARGS=()
if [ "$DRY" = 0 ] && "$PYTHON" -c "import xdist" 2>/dev/null; then
  XDIST_ARGS=(-n "${XDIST:-8}")
fi
say "== 1/5 kernel tests: pytest $TESTS ${XDIST_ARGS[*]} (limit ${TEST_TIMEOUT:-120} s)"
start=$(date +%s)
# shellcheck disable=SC2086  # TESTS is a word list
stage tests "${TEST_TIMEOUT:-120}" "$PYTHON" -m pytest $TESTS -q -p no:cacheprovider -rfE \
  "${XDIST_ARGS[@]}"
test_rc=$?
test_line="$(summary_line tests) ($(( $(date +%s) - start )) s, exit status $test_rc)"
if [ "$test_rc" = 124 ]; then test_line="$test_line: TIME LIMIT"; fi
say "kernel tests: $test_line"
grep -E '^(FAILED|ERROR) ' "$CACHE/tests.log" | head -n 20

# -- 2. tile sweep ---------------------------------------------------------------------------
sweep_rc=0
sweep_line="skipped (SWEEP=0): default tiles"
if [ "${SWEEP:-1}" != 0 ]; then
  say "== 2/5 tile sweep (budget ${SWEEP_BUDGET:-65} s, limit ${SWEEP_TIMEOUT:-110} s)"
  start=$(date +%s)
  SWEEP_ARGS=(--out "$OUT_DIR" --budget-s "${SWEEP_BUDGET:-65}")
  if [ -n "${SWEEP_KINDS:-}" ]; then SWEEP_ARGS+=(--kinds "$SWEEP_KINDS"); fi
  if [ "$DRY" = 1 ]; then SWEEP_ARGS+=(--dry-run); fi
  stage sweep "${SWEEP_TIMEOUT:-110}" "$PYTHON" -m benchmarks.tile_sweep "${SWEEP_ARGS[@]}"
  sweep_rc=$?
  sweep_line="exit status $sweep_rc ($(( $(date +%s) - start )) s)"
  if "$PYTHON" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['measured_tiles'] else 1)" \
      "$OUT_DIR/tile_sweep.json" 2>/dev/null; then
    FASTMIL_TILES="$(cd "$OUT_DIR" && pwd)/tile_sweep.json"
    export FASTMIL_TILES
    sweep_line="$sweep_line; the benchmarks use its tiles (FASTMIL_TILES)"
  else
    sweep_line="$sweep_line; no table: the benchmarks use the default tiles"
  fi
  say "tile sweep: $sweep_line"
fi

# -- 3. benchmarks ---------------------------------------------------------------------------
say "== 3/5 benchmarks: pytest benchmarks/ --suite $SUITE (budget ${BENCH_BUDGET:-160} s)"
start=$(date +%s)
rm -f "$OUT_DIR/bench.json"
stage bench "${BENCH_TIMEOUT:-190}" "$PYTHON" -m pytest benchmarks/test_attention_pool.py -q \
  -p no:cacheprovider -rfE --suite "$SUITE" --fastmil-json "$OUT_DIR/bench.json" \
  --bench-budget-s "${BENCH_BUDGET:-160}" --bench-rep-ms 100 --bench-rounds 2
bench_rc=$?
say "benchmarks: $(summary_line bench) ($(( $(date +%s) - start )) s, exit status $bench_rc)"
grep -E '^(FAILED|ERROR) ' "$CACHE/bench.log" | head -n 20

# -- 4. kernel launches ----------------------------------------------------------------------
say "== 4/5 kernel launches at the MNIST-bags shape"
start=$(date +%s)
# (the dry run's interpreter takes longer than the GPU: 26 s against 11-15 s)
stage launches "${LAUNCH_TIMEOUT:-$([ "$DRY" = 1 ] && echo 90 || echo 30)}" \
  "$PYTHON" -m benchmarks.launch_count "${LAUNCH_ARGS[@]}" \
  --json "$OUT_DIR/launches.json"
launch_rc=$?
say "launches: exit status $launch_rc ($(( $(date +%s) - start )) s)"
# host time of one call with the real kernels, and cProfile's table of where it goes (GPU only:
# on CPU benchmarks.host_time stubs the kernels, a different measurement)
if [ "$DRY" = 0 ]; then
  start=$(date +%s)
  stage host_time "${HOST_TIMEOUT:-25}" "$PYTHON" -m benchmarks.host_time --device cuda \
    --D 500 --L 128 --reps 200 --json "$OUT_DIR/host_time.json" \
    --profile "$OUT_DIR/host_profile.txt"
  host_rc=$?
  say "host time: exit status $host_rc ($(( $(date +%s) - start )) s)"
  grep -E '^(cuBLAS|fused) projection' "$CACHE/host_time.log" | tee -a "$LOG" >/dev/null
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null \
        | head -n 1)
  if [ -n "$NCU" ]; then
    start=$(date +%s)
    : >"$OUT_DIR/ncu.txt"
    for case in ${NCU_CASES:-wsi mnist}; do
      echo "== ncu: benchmarks.ncu_target --case $case" >>"$OUT_DIR/ncu.txt"
      timeout -k 5 "${NCU_TIMEOUT:-30}" "$NCU" --clock-control none --profile-from-start off \
        -k 'regex:_(fwd|bwd|merge)_kernel' --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
        --section LaunchStats "$PYTHON" -m benchmarks.ncu_target --case "$case" \
        >>"$OUT_DIR/ncu.txt" 2>&1
      echo "ncu --case $case: exit status $?" >>"$OUT_DIR/ncu.txt"
    done
    say "ncu: ${NCU_CASES:-wsi mnist} ($(( $(date +%s) - start )) s; $OUT_DIR/ncu.txt)"
  else
    say "ncu: not installed here"
  fi
fi

# -- 5. report -------------------------------------------------------------------------------
say "== 5/5 report ($(( $(date +%s) - T0 )) s so far)"
REPORT_ARGS=(--out "$CACHE/RESULTS.md" --no-plot --summary
             --note "GPU check (\`benchmarks/gpu_check.sh$([ "$DRY" = 1 ] && echo ' --dry-run')\`), kernel tests (\`pytest $TESTS\`): $test_line; tile sweep: $sweep_line")
if [ -s "$OUT_DIR/launches.json" ]; then REPORT_ARGS+=(--launches "$OUT_DIR/launches.json"); fi
report_rc=1
if [ -s "$OUT_DIR/bench.json" ]; then
  "$PYTHON" -m benchmarks.report "$OUT_DIR/bench.json" "${REPORT_ARGS[@]}" 2>&1 | tee -a "$LOG"
  report_rc=${PIPESTATUS[0]}
else
  say "no benchmark results (see $LOG)"
fi
say ""
say "kernel tests: $test_line"
say "tile sweep: $sweep_line"
say "gpu_check.sh: $(( $(date +%s) - T0 )) s in all; files in $OUT_DIR"
for rc in "$test_rc" "$sweep_rc" "$bench_rc" "$launch_rc" "$report_rc"; do
  if [ "$rc" != 0 ]; then exit 1; fi
done
exit 0
