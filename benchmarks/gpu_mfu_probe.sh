#!/usr/bin/env bash
# Where the ViT-S MAE step's time goes on a GPU, and what moves its MFU (up to 10 minutes on an H200):
#   1. the top kernels of the compiled step at batch 1024 (mae_mfu.py --top-kernels)
#   2. the whole step with compile (inductor's max-autotune) + graphs at batch 2048
#   3. the bare timm encoder on the same 50 tokens (vit_ceiling.py): the ceiling, compile and max-autotune
# (measured 2026-12-04: BENCHMARKS.md "How far the MAE step is from its encoder's ceiling")
# Each block under its own time limit; logs under $OUT (else a new mktemp -d folder, printed first).
# Wheels in .whl as gpu_checks.sh.
set -uo pipefail
export PYTHONUNBUFFERED=1
LOG=${OUT:-$(mktemp -d -t gpu-mfu.XXXXXX)}; mkdir -p "$LOG"; LOG=$(cd "$LOG" && pwd)
echo "logs in $LOG"
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation . || exit 1
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())" | tee "$LOG/env.txt"
START=$SECONDS
stamp() { echo "== $1 ($((SECONDS - START)) s since start)"; }
S=(--steps 12 --warmup 5)
# A cold compile of the whole step at batch 1024-2048 takes 90-100 s per process on an H200 (2026-12-04):
# the limits below leave room for it. A block is skipped when it could overrun 560 s in all.
left() { (( SECONDS - START + $1 < 560 )); }
cd benchmarks
stamp "1. top kernels, compile, batch 1024"
timeout 160 $PY mae_mfu.py "${S[@]}" --batch-sizes 1024 --modes compile --profile-steps 3 --top-kernels 40 2>&1 | tee "$LOG/top.log"
stamp "2. HOG, compile (max-autotune) + graphs, 2048 (compile + graphs without it: 83.4 ms, MFU 0.200)"
left 240 && TORCHINDUCTOR_MAX_AUTOTUNE=1 timeout 240 $PY mae_mfu.py "${S[@]}" --batch-sizes 2048 --modes graphs \
  --profile-steps 0 2>&1 | tee "$LOG/mat.log"
stamp "3. encoder ceiling, compile, then max-autotune"
left 90 && timeout 90 $PY vit_ceiling.py --batch-sizes 1024,2048 2>&1 | tee "$LOG/ceiling.log"
left 150 && timeout 150 $PY vit_ceiling.py --batch-sizes 2048 --max-autotune 2>&1 | tee "$LOG/ceiling_mat.log"
stamp "done"
grep -h -E '^\| ' "$LOG"/*.log | awk '!(/^\| (model|---|encoder) / && seen[$0]++)' > "$LOG/summary.md"
cat "$LOG/summary.md"
