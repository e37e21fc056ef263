#!/usr/bin/env bash
# Full benchmark suite on a CUDA machine: one pytest run (and JSON file) per chunk, then
# benchmarks/RESULTS.md and benchmarks/time_vs_bag_size.png from all JSON files in OUT_DIR.
#
#   benchmarks/run_gpu.sh                      # every chunk, then the report
#   benchmarks/run_gpu.sh wsi-d1024-bf16 mnist # some chunks (each should fit in ~10 minutes)
#   benchmarks/run_gpu.sh wsi-n100k            # any other word is a pytest -k expression
#
# Chunks: wsi-d1024-bf16 wsi-d1536-bf16 wsi-d1024-fp32 wsi-d1536-fp32 batched mnist multibranch.
# Environment:
#   OUT_DIR      where the JSON files go (default .benchmarks/gpu); the report reads OUT_DIR/*.json,
#                so chunks run on different days or machines merge (the report warns if the
#                devices differ). Set OUT_DIR=$OUT to bring them back from a remote runner.
#   SELECT       extra -k expression ANDed with each chunk, e.g. SELECT="not max_autotune"
#   PYTEST_ARGS  more pytest arguments (word-split), e.g. "--bench-rep-ms 400 -x"
#   REPORT=0     skip the report;  PYTHON  interpreter (default python)
# Compile caches go to .benchmarks/{inductor,triton}-cache (git-ignored) so that re-runs on the
# same machine skip most of torch.compile's work. Works without pytest-benchmark installed
# (the suite then uses its own stand-in timer and JSON writer).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}  # the device image: python3
OUT_DIR=${OUT_DIR:-.benchmarks/gpu}
mkdir -p "$OUT_DIR"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.benchmarks/inductor-cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.benchmarks/triton-cache}

if [ "${ALLOW_CPU:-0}" != 1 ]; then  # ALLOW_CPU=1 tests this script on CPU (smoke shapes)
  "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
'run_gpu.sh: no CUDA device visible (on CPU run: pytest benchmarks/ --smoke)')"
fi
"$PYTHON" - <<'EOF'
import importlib.util, torch
plugin = "pytest-benchmark" if importlib.util.find_spec("pytest_benchmark") else "stand-in timer"
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
print(f"run_gpu.sh: {device}, torch {torch.__version__}, {plugin}")
EOF

chunks=("$@")
if [ ${#chunks[@]} -eq 0 ]; then
  chunks=(wsi-d1024-bf16 wsi-d1536-bf16 wsi-d1024-fp32 wsi-d1536-fp32 batched mnist multibranch)
fi

status=0
for chunk in "${chunks[@]}"; do
  case "$chunk" in
    wsi-d*-*) IFS=- read -r _ d dtype <<<"$chunk"; k="wsi and $d and $dtype" ;;
    batched|mnist|multibranch) k="$chunk" ;;
    *) k="$chunk" ;;
  esac
  if [ -n "${SELECT:-}" ]; then k="($k) and ($SELECT)"; fi
  name=$(printf '%s' "$chunk" | tr -c 'A-Za-z0-9_.-' '_')
  echo "== $chunk: pytest benchmarks/ -k '$k' -> $OUT_DIR/$name.json"
  start=$(date +%s)
  rc=0
  # shellcheck disable=SC2086  # PYTEST_ARGS is word-split on purpose
  "$PYTHON" -m pytest benchmarks/ -q -p no:cacheprovider -k "$k" \
    --benchmark-json="$OUT_DIR/$name.json" ${PYTEST_ARGS:-} || rc=$?
  echo "== $chunk: $(( $(date +%s) - start )) s, pytest exit status $rc"
  if [ "$rc" != 0 ]; then status=$rc; fi
done

if [ "${REPORT:-1}" != 0 ]; then
  "$PYTHON" -m benchmarks.report "$OUT_DIR"/*.json
fi
exit "$status"
