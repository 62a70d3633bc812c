#!/usr/bin/env bash
# GPU checks, run on a CUDA machine from the repository root: the CUDA tests
# (tests/test_gpu.py: fp16 + GradScaler resume, bf16 + compile, channels_last, NCCL under
# torchrun with --sync-bn, ONNX export of a GPU-trained run) and the ViT-S MAE img/s and MFU
# benchmark with and without torch.compile. Logs go to $OUT (or ./gpu-checks) as well.
#   bash benchmarks/gpu_checks.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
LOG=${OUT:-gpu-checks}; mkdir -p "$LOG"
PY=${PYTHON:-python3}
if [ -d .whl ]; then  # wheels carried to a machine without network (pydicom, timm)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG/env.txt"
$PY -c "import torch, timm, sslkit; print('torch', torch.__version__, 'timm', timm.__version__, 'sslkit', sslkit.__version__)" | tee -a "$LOG/env.txt"
timeout ${TEST_TIMEOUT:-240} $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$LOG/gpu_tests.log"
tests_rc=$?
cd benchmarks
timeout ${MFU_TIMEOUT:-150} $PY mae_mfu.py --steps 30 2>&1 | tee "$LOG/mae_mfu.log"
timeout 90 $PY mae_mfu.py --steps 20 --no-compile 2>&1 | tee -a "$LOG/mae_mfu.log"
exit $tests_rc
