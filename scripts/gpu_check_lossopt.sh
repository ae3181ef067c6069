#!/usr/bin/env bash
# GPU check for forgather.loss and forgather.optim, run on the device machine (one call does it all):
# installs the carried wheels (.whl/: liger-kernel, cut-cross-entropy) and forgather (--no-deps, keeping the
# image's torch), runs tests/gpu for loss and optim, then scripts/bench_adafactor.py and scripts/bench_loss.py.
# Logs go to $OUT (the device tool brings them back); the summary tables are printed again at the end.
#     [PARTS="tests adafactor loss"] bash scripts/gpu_check_lossopt.sh [extra bench_loss.py args]
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_lossopt}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3
PARTS=${PARTS:-"tests adafactor loss"}

source scripts/gpu_setup.sh .whl
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
$PY -c "import liger_kernel, cut_cross_entropy; print('liger-kernel and cut-cross-entropy import')"
date -u

# Time limits keep one slow part from eating the others' share of a 10-minute device call.
touch "$OUT/pytest.txt" "$OUT/bench_adafactor.txt" "$OUT/bench_loss.txt"
if [[ " $PARTS " == *" tests "* ]]; then
    timeout 200 $PY -m pytest -n 0 tests/gpu/test_loss_gpu.py tests/gpu/test_optim_gpu.py -q -p no:cacheprovider -rs \
        2>&1 | tee "$OUT/pytest.txt"
fi
if [[ " $PARTS " == *" adafactor "* ]]; then
    timeout 120 $PY scripts/bench_adafactor.py 2>&1 | tee "$OUT/bench_adafactor.txt"
fi
if [[ " $PARTS " == *" loss "* ]]; then
    timeout 250 $PY scripts/bench_loss.py "$@" 2>&1 | tee "$OUT/bench_loss.txt"
fi

echo "==================== summary ===================="
tail -n 1 "$OUT/pytest.txt"
grep -E '^\||^read|^three|^device' "$OUT/bench_adafactor.txt" "$OUT/bench_loss.txt"
