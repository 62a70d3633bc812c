#!/usr/bin/env bash
# Every GPU number issue 17 asks for, in one run on a CUDA machine (about 8 minutes on an
# H200), from the repository root:
#   bash benchmarks/gpu_checks.sh            (logs under $OUT, else a new mktemp -d folder: printed first)
# In order of importance, each block under its own time limit so a slow one cannot eat the rest:
#   1. ViT-S MAE 224 px bf16, batch 256: eager / compile / graphs -> img/s, MFU, kernel share
#   2. SimCLR ResNet-50 224 px bf16 channels-last, batch 256: eager / compile / graphs, and the
#      timm train step (benchmark.py's, re-implemented) at the same images per step -> ratio
#   3. tests/test_gpu.py -k "capture or prefetch": graphs captured, bit-identical resume under
#      --deterministic, MAE + compile captured, fp16 falls back in one line, batches prefetched
#      to the GPU unchanged (ALL_GPU_TESTS=1: every CUDA test)
#   4. batch 1024: MAE compile / graphs, SimCLR graphs (skipped once $BUDGET seconds, default
#      420, have gone by, so the whole script stays near 8 minutes)
# The markdown rows of every table are gathered in $LOG/summary.md at the end.
# The GPU image has torch, timm and the rest but no pydicom (tests/conftest.py imports it):
# before the run, on a machine with network, in the repository root:
#   .venv/bin/pip download --no-deps -d .whl pydicom==3.0.2 timm==1.0.31
# (.whl is installed below into /tmp/site; delete it afterwards, it is not to be committed).
set -uo pipefail
export PYTHONUNBUFFERED=1
LOG=${OUT:-$(mktemp -d -t gpu-checks.XXXXXX)}; mkdir -p "$LOG"; LOG=$(cd "$LOG" && pwd)
echo "logs in $LOG"
PY=${PYTHON:-python3}
if [ -d .whl ]; then  # wheels carried to a machine without network (pydicom, timm)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG/env.txt"
$PY -c "import torch, timm, sslkit; print('torch', torch.__version__, 'timm', timm.__version__, 'sslkit', sslkit.__version__)" | tee -a "$LOG/env.txt"
git log -1 --format='commit %H %s' 2>/dev/null | tee -a "$LOG/env.txt"
START=$SECONDS
stamp() { echo "== $1 ($((SECONDS - START)) s since start)"; }
STEPS=(--steps ${STEPS:-15} --warmup ${WARMUP:-6})

cd benchmarks
stamp "1. MAE batch 256"
timeout ${MAE_TIMEOUT:-140} $PY mae_mfu.py "${STEPS[@]}" --batch-sizes 256 --modes eager,compile,graphs 2>&1 | tee "$LOG/mae_256.log"
stamp "2. SimCLR ResNet-50 batch 256 + timm"
timeout ${SIMCLR_TIMEOUT:-180} $PY simclr_r50_speed.py "${STEPS[@]}" --batch-sizes 256 --modes eager,compile,graphs \
  2>&1 | tee "$LOG/simclr_256.log"
cd ..
stamp "3. CUDA tests"
K=(-k "capture or prefetch"); [ "${ALL_GPU_TESTS:-0}" = 1 ] && K=()
timeout ${TEST_TIMEOUT:-150} $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py "${K[@]}" 2>&1 | tee "$LOG/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
cd benchmarks
stamp "4. batch 1024"
: > "$LOG/mae_1024.log"; : > "$LOG/simclr_1024.log"
if (( SECONDS - START < ${BUDGET:-420} )); then
  timeout ${MAE_1024_TIMEOUT:-75} $PY mae_mfu.py "${STEPS[@]}" --batch-sizes 1024 --modes compile,graphs 2>&1 \
    | tee "$LOG/mae_1024.log"
fi
if (( SECONDS - START < ${BUDGET:-420} + 60 )); then
  timeout ${SIMCLR_1024_TIMEOUT:-75} $PY simclr_r50_speed.py "${STEPS[@]}" --batch-sizes 1024 --modes graphs \
    --no-timm 2>&1 | tee "$LOG/simclr_1024.log"
else
  echo "batch 1024 skipped: past the time budget" | tee "$LOG/simclr_1024.log"
fi
cd ..
stamp "done"
{
  cat "$LOG/env.txt"; echo
  grep -h -E '^\| (MAE|SimCLR|model) |^\| --- \| ---: \| --- \|' "$LOG"/mae_256.log "$LOG"/mae_1024.log \
    "$LOG"/simclr_256.log "$LOG"/simclr_1024.log | awk '!(/^\| (model|---) / && seen[$0]++)'
  echo; grep -h -E '^timm train step|^\| timm batch |^\| ---: \| --- \| ---: |^\| [0-9]+ \| (True|False) \|' \
    "$LOG/simclr_256.log"
  echo; grep -h 'host-to-device' "$LOG"/*.log
  echo; tail -n 3 "$LOG/gpu_tests.log"
} > "$LOG/summary.md"
echo; cat "$LOG/summary.md"
exit $tests_rc
