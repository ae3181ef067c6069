#!/usr/bin/env bash
# Issue 16's serving checks on one GPU (each part ~5 minutes on an H200; parts joined by commas run in one
# call): installs forgather without touching the image's torch (plus the pure-Python packages the image lacks,
# carried in .whl/), then
#   part kernels   the decode kernels' GPU tests (tests/gpu/test_serve_gpu.py: each kernel against its torch
#                  semantics, seconds each), then scripts/bench_decode_kernels.py: each Triton kernel against
#                  what it replaces, 1.24B and 7B.
#   part engine    the engine's GPU tests (the fused decoder compiled and graphed, with lookahead, gives the
#                  simple loop's tokens; the kernels in bf16 give the modules' logits): minutes of compiling.
#   part bench     scripts/bench_serve.py: both model kinds at batch 1, the HTTP server at 1, 8 and 32 streams
#                  driven from client processes of 4 streams (the server as it starts by default, then with
#                  uvicorn's pure-Python h11, then with Python's 5 ms GIL switch interval), the 7B shape, the
#                  step's kernels (--profile); more bench_serve.py args after the parts (e.g. --variants
#                  prefill_compiled: the 420 s limit holds about one compiled variant besides the rows above).
#   part tuner     the graph tuner's GPU test, then bench_serve.py's default (the graph tuner), and the default
#                  products and "fused" under Triton's autotuner, in two processes (their rows carry each
#                  process's picks).
#   part versus    the advance kernel's and the graphed engine's GPU tests, then bench_serve.py's default at batch 1
#                  from this tree and from $BASE (another commit's tree) in turn, three processes (--profile).
#   part sampled   the GPU tests of the step's end and of the graphed engine (greedy and seeded sampling, alone
#                  and batched, against the simple loop's tokens), then bench_serve.py's `sampled` rows (temperature
#                  and top-p, each row its own generator, the rows of a step sampled together) beside greedy ones.
# Results: $OUT/pytest_kernels.txt, kernels.txt, kernels.json (kernels); pytest_engine.txt (engine);
# serve.txt, serve.json (bench); pytest_tuner.txt, tuner_1.txt, tuner_2.txt, tuner_*.json (tuner);
# pytest_versus.txt, versus_N_{new,base}.txt and .json (versus); pytest_sampled.txt, sampled.txt, sampled.json.
#     [BASE=DIR] bash scripts/gpu_check_serve.sh [kernels|engine|bench|tuner|versus|sampled][,...] [more bench_serve.py args]
set -u
cd "$(dirname "$0")/.."
PARTS=${1:-bench}
shift || true
OUT=${OUT:-/tmp/gpu_check_serve}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3
source scripts/gpu_setup.sh .whl
for PART in ${PARTS//,/ }; do
case $PART in
kernels)
    timeout 240 $PY -m pytest -n 0 tests/gpu/test_serve_gpu.py -q -p no:cacheprovider -rs \
        -k "decode_kernel_computes or skinny or launched_early" 2>&1 | tee "$OUT/pytest_kernels.txt" | tail -n 3
    timeout 200 $PY scripts/bench_decode_kernels.py --shapes 1b 7b --windows 256 1024 --fusions \
        --json "$OUT/kernels.json" 2>&1 | grep --line-buffered -v Warning > "$OUT/kernels.txt"
    echo "==================== kernels ===================="
    tail -n 1 "$OUT/pytest_kernels.txt"
    sed -n '/^| piece/,$p' "$OUT/kernels.txt"
    ;;
engine)
    timeout 540 $PY -m pytest -n 0 tests/gpu/test_serve_gpu.py -v -p no:cacheprovider -rs --durations=0 \
        -k "graphed or compiled or bf16" 2>&1 | tee "$OUT/pytest_engine.txt" | tail -n 12
    ;;
bench)
    $PY -c "import fastapi, uvicorn, openai" || echo "the HTTP rows need the serve extra's wheels in .whl/"
    timeout 420 $PY scripts/bench_serve.py --skip-hf --profile --servers default http=h11 switch-interval=0.005 --json "$OUT/serve.json" \
        "$@" 2>&1 | grep --line-buffered -v "Loading\|Writing" > "$OUT/serve.txt"
    echo "==================== bench ===================="
    grep '"name"' "$OUT/serve.txt" | cut -c1-300
    ;;
tuner)
    # The graph tuner (decode_attention.TUNER="graph", the default) against Triton's autotuner, each in two
    # processes: does a process's pick, and so its tokens/s, vary from one process to the next?
    timeout 150 $PY -m pytest -n 0 tests/gpu/test_serve_gpu.py -q -p no:cacheprovider -rs -k graph_tuner 2>&1 \
        | tee "$OUT/pytest_tuner.txt" | tail -n 3
    for run in 1 2; do
        timeout 200 $PY scripts/bench_serve.py --skip-hf --skip-forgather --skip-http --skip-7b --concurrency 1 \
            --variants autotuner fused_autotuner --json "$OUT/tuner_$run.json" "$@" \
            > "$OUT/tuner_$run.txt" 2>&1
        echo "==================== tuner, process $run ===================="
        grep '^| engine' "$OUT/tuner_$run.txt"
    done
    ;;
versus)
    # The engine's step against another commit's, in turn in separate processes: $BASE holds that commit's tree
    # (git archive COMMIT forgather | tar -x -C DIR), whose forgather package this tree's bench runs against.
    # First the GPU tests of the step's end (the advance kernels) and of the graphed engine (a Hugging Face
    # directory) against the simple loop's tokens.
    timeout 60 $PY -m pytest -n 0 tests/gpu/test_serve_gpu.py -q -p no:cacheprovider -rs \
        -k "advance_kernel or greedy_advance" 2>&1 | tee "$OUT/pytest_versus.txt" | tail -n 3
    timeout 200 $PY -m pytest -n 0 tests/gpu/test_serve_gpu.py -q -p no:cacheprovider -rs \
        -k "graphed_engine and llama" 2>&1 | tee -a "$OUT/pytest_versus.txt" | tail -n 1
    i=0
    for run in new base new; do
        i=$((i + 1))
        if [ $run = base ]; then tree=${BASE:?BASE=DIR, the tree of the commit to compare with}; else tree=.; fi
        # this tree's bench_serve.py either way (so both runs have its rows and variants), forgather from $tree
        PYTHONPATH="$tree:$PYTHONPATH" timeout 140 $PY scripts/bench_serve.py --skip-hf --skip-forgather \
            --skip-http --skip-7b --concurrency 1 --profile --json "$OUT/versus_${i}_$run.json" "$@" \
            > "$OUT/versus_${i}_$run.txt" 2>&1
        echo "==================== $run ($tree) ===================="
        grep '"name"' "$OUT/versus_${i}_$run.txt" | cut -c1-260
    done
    ;;
sampled)
    timeout 260 $PY -m pytest -n 0 tests/gpu/test_serve_gpu.py -q -p no:cacheprovider -rs --durations=5 \
        -k "advance_kernel or greedy_advance or (graphed_engine and llama)" 2>&1 | tee "$OUT/pytest_sampled.txt" | tail -n 9
    timeout 160 $PY scripts/bench_serve.py --skip-hf --skip-forgather --skip-http --skip-7b --concurrency 1 \
        --variants sampled --json "$OUT/sampled.json" "$@" > "$OUT/sampled.txt" 2>&1
    echo "==================== sampled ===================="
    grep '"name"' "$OUT/sampled.txt" | cut -c1-260
    ;;
*)
    echo "unknown part '$PART': kernels, engine, bench, tuner, versus or sampled"; exit 2 ;;
esac
done
