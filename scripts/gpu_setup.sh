# Sourced by the gpu_check_*.sh scripts on the device machine: `source scripts/gpu_setup.sh DIR...` installs the
# wheels carried in each DIR (pure-Python packages the image lacks) into /tmp/site, on PYTHONPATH, then forgather
# itself with --no-deps (the image's torch stays; if the editable install fails, the checkout goes on
# PYTHONPATH), and prints the GPU. Uses $PY (default python3) and $OUT (default /tmp).
PY=${PY:-python3}
OUT=${OUT:-/tmp}
for dir in "$@"; do
    ls "$dir"/*.whl >/dev/null 2>&1 \
        && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$dir"/*.whl
done
export PYTHONPATH=/tmp/site
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    echo "editable install failed (see install.log); using PYTHONPATH"
    export PYTHONPATH="$PWD:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
