#!/usr/bin/env bash
# Where the ViT-S MAE step's time goes on a GPU, and what moves its MFU (about 9 minutes on an H200):
#   1. the top kernels of the compiled step at batch 1024 (mae_mfu.py --top-kernels)
#   2. the bare timm encoder on the same 50 tokens (vit_ceiling.py): the ceiling, compile and max-autotune
#   3. the whole step with compile + graphs: pixel targets beside HOG, batch 2048, inductor's max-autotune
# Each block under its own time limit; logs under $OUT (else ./gpu-mfu). Wheels in .whl as gpu_checks.sh.
set -uo pipefail
export PYTHONUNBUFFERED=1
LOG=${OUT:-gpu-mfu}; mkdir -p "$LOG"; LOG=$(cd "$LOG" && pwd)
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
cd benchmarks
stamp "1. top kernels, compile, batch 1024"
timeout 100 $PY mae_mfu.py "${S[@]}" --batch-sizes 1024 --modes compile --profile-steps 3 --top-kernels 40 2>&1 | tee "$LOG/top.log"
stamp "2. encoder ceiling"
timeout 80 $PY vit_ceiling.py --batch-sizes 1024,2048 2>&1 | tee "$LOG/ceiling.log"
stamp "3a. pixels, compile + graphs, 1024"
timeout 80 $PY mae_mfu.py "${S[@]}" --batch-sizes 1024 --modes graphs --profile-steps 0 --task-opt target=pixels 2>&1 | tee "$LOG/pixels.log"
stamp "3b. HOG, compile + graphs, 2048"
timeout 90 $PY mae_mfu.py "${S[@]}" --batch-sizes 2048 --modes graphs --profile-steps 0 2>&1 | tee "$LOG/b2048.log"
stamp "2b. encoder ceiling, max-autotune"
timeout 100 $PY vit_ceiling.py --batch-sizes 1024 --max-autotune 2>&1 | tee "$LOG/ceiling_mat.log"
stamp "3c. HOG, compile (max-autotune) + graphs, 1024"
TORCHINDUCTOR_MAX_AUTOTUNE=1 timeout ${MAT_TIMEOUT:-150} $PY mae_mfu.py "${S[@]}" --batch-sizes 1024 --modes graphs \
  --profile-steps 0 2>&1 | tee "$LOG/mat.log"
stamp "done"
grep -h -E '^\| ' "$LOG"/*.log | awk '!(/^\| (model|---|encoder) / && seen[$0]++)' > "$LOG/summary.md"
cat "$LOG/summary.md"
