#!/usr/bin/env bash
# The tile sweep: time every candidate tile of fastmil's Triton kernels per class of (D, L, K,
# dtype, gated) and kernel (fwd, bwd) on this GPU; about 5 minutes on an H100 (budget 270 s,
# hard limit 330 s). Writes tile_sweep.json, tile_sweep.md (with a MEASURED_TILES dict to paste
# into fastmil/kernels/attention_pool.py) and tile_sweep.log to OUT_DIR ($OUT_DIR, else $OUT,
# the device tool's folder, else out/tile_sweep), and prints that dict last. benchmarks/gpu_check.sh
# runs a shorter sweep of the targets' classes itself; this one has time for every class.
# FASTMIL_TILES=OUT_DIR/tile_sweep.json makes fastmil use the table without pasting it.
#
#   benchmarks/tile_sweep.sh              # on a CUDA machine
#   benchmarks/tile_sweep.sh --dry-run    # on CPU (Triton's interpreter): checks the plumbing
#
# Environment: SWEEP_BUDGET (s, 270), SWEEP_TIMEOUT (s, 330), CLASSES (comma-separated names of
# benchmarks.tile_sweep.CLASSES), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT_DIR=${OUT_DIR:-${OUT:-out/tile_sweep}}
mkdir -p "$OUT_DIR"
CACHE=${GPU_CHECK_CACHE:-${TMPDIR:-/tmp}/fastmil-gpu-check}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$CACHE/triton}
args=(--out "$OUT_DIR" --budget-s "${SWEEP_BUDGET:-270}")
if [ "${1:-}" = "--dry-run" ]; then args+=(--dry-run); fi
if [ -n "${CLASSES:-}" ]; then args+=(--classes "$CLASSES"); fi
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}  # the device image: python3
timeout -s INT -k 20 "${SWEEP_TIMEOUT:-330}" "$PYTHON" -m benchmarks.tile_sweep \
  "${args[@]}" 2>&1 | tee "$OUT_DIR/tile_sweep.log"
exit "${PIPESTATUS[0]}"
