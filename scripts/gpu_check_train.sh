#!/usr/bin/env bash
# GPU checks of the model library and the training path, run on the device machine in one call:
# installs forgather without touching the image's torch (plus the pure-Python packages the image lacks, carried
# in .whl_fg/ and .whl/), runs tests/gpu/test_models_gpu.py and test_run_gpu.py (the runner with every loss and
# optimizer option), then scripts/bench_train.py.
#     bash scripts/gpu_check_train.sh [bench_train.py args]
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_train}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3
for dir in .whl .whl_fg; do
    ls $dir/*.whl >/dev/null 2>&1 && $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $dir/*.whl
done
export PYTHONPATH=/tmp/site
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { echo "install failed"; cat "$OUT/install.log"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY -c "import torch, pytorch_lightning, transformers; print('torch', torch.__version__, 'lightning', pytorch_lightning.__version__, 'transformers', transformers.__version__)"
timeout 300 $PY -m pytest tests/gpu/test_models_gpu.py tests/gpu/test_run_gpu.py -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/pytest_models.txt"
timeout 420 $PY scripts/bench_train.py "$@" 2>&1 | tee "$OUT/bench_train.txt"
echo "==================== summary ===================="
tail -n 1 "$OUT/pytest_models.txt"
grep -E "tokens/s|ratio|^hf|^forgather" "$OUT/bench_train.txt"
