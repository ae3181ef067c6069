#!/usr/bin/env bash
# Issue 17's training measurements on one GPU, in one device call (~8 minutes on an H200): installs forgather
# without touching the image's torch (plus the pure-Python packages the image lacks, carried in .whl/, .whl_fg/
# and .whl_titan/: liger-kernel, torchtitan and its dependencies), then scripts/bench_train.py:
#   part a (default)  1.24B shape: forgather (profiled), hf-liger (profiled), hf, torchtitan; the 7B shape through
#                     forgather.run (profiled; again with activation checkpointing if it does not fit) and
#                     bench_memory's 24 GiB step; then hf-compile and hf-liger-compile (added to the 1.24B table).
#                     Most telling rows first: a call cut off by its time limit keeps the rows already written.
#   part b            our step's options side by side on the 1.24B shape: default, fused_projections=true,
#                     compile_scope=model (embedding to final norm as one compiled graph), both, attention_fn=sdpa,
#                     optimizer=adamw_sr (our fp32-math AdamW, compiled per parameter, stochastic rounding),
#                     optimizer=adamw_in_backward (torch's fused AdamW per parameter inside backward, on a side stream),
#                     compile_mode=max-autotune-no-cudagraphs (inductor tunes its kernels; last, minutes).
#   part c            where the step's non-matmul time goes: flex attention's tilings on packed rows
#                     (bench_step_pieces.py), then a profiled 1.24B run (its summary lists the top kernels).
#   part d            the options measured faster alone, together, beside the default and HF + Liger on the 1.24B
#                     shape: compile_mode=max-autotune-no-cudagraphs (1.021x alone, minutes of tuning) with
#                     optimizer=adamw_compiled (1.008-1.014x alone).
#   part e            the same comparison over 40 steps (four windows: the first, with its warm-up, left out of the
#                     median), with inductor's coordinate-descent tuning of the pointwise and reduction kernels
#                     (compile_options) beside the compiled AdamW alone; the tuned run profiled over 10 steps, a
#                     logged one among them.
#   part f            what a logged step costs: forgather and HF + Liger logging every 20 steps instead of 5, then a
#                     profiled forgather run whose trace (host operators too) comes back as trace_forgather.json.gz.
#   part g            after train/loss stopped being a progress-bar metric (a host wait every step, found with part
#                     f's trace): the default (profiled, trace kept), HF + Liger, coordinate-descent tuning with
#                     the compiled AdamW, and max-autotune with the compiled AdamW (minutes of tuning), 40 steps each.
#   part h            CUDA graphs over the compiled layers (compile_mode=reduce-overhead) with the compiled AdamW, now
#                     that no step drains the GPU (measured level with the default before), 40 steps.
#   part i            flex attention's tilings in the training step (attention_kernel_options), beside the default:
#                     the forward's 64 x 64 tiling (1.025x on the attention alone, 2026-12-04) and two backward ones.
#   part j            cuDNN's attention over packed sequences (the aten ops behind SDPA on nested tensors) beside flex
#                     and flash attention 2 on the packed row alone (bench_step_pieces.py), then part i.
#   part k            flex's tiling measured best on the bench's own packed rows (bench_step_pieces.py --duel --sweep:
#                     forward 64 x 64, backward 64 / 64, 4 warps, 3 stages; 1.25x on the attention alone) in the
#                     training step beside the default and HF + Liger, then with max-autotune and the compiled AdamW.
#   part l            after that tiling became the default for packed documents (forgather.models.attention
#                     PACKED_TILINGS): the GPU model tests, the default beside HF + Liger, then max-autotune with the
#                     compiled AdamW.
#   part m            AdamW inside backward on a side stream in buckets (optimizer=adamw_in_backward bucket_size=N: one
#                     fused step per ~N elements instead of per parameter): the GPU tests of the overlapped steps,
#                     then the default beside buckets of ~50M (about a layer) and ~200M elements; the default and the
#                     first profiled (the step's breakdown with the packed tiling, and the optimizer's overlap).
#   part n            our packed-document attention kernels (attention_fn=packed, forgather/models/packed_attention.py):
#                     their GPU tests, the duel beside flex and flash attention 2 on packed rows (their tilings too),
#                     then the 1.24B step with them beside the default and HF + Liger (profiled).
#   part o            part n's fixes (the kernels' scales as constants, IEEE products for fp32, the best tiles as the
#                     default): the GPU tests, then the 1.24B step with attention_fn=packed beside flex and HF + Liger.
#   part p            the bench's forgather path now attention_fn=packed: beside HF + Liger and flex, then with
#                     optimizer=adamw_compiled.
#   part q            the packed kernels' GPU tests, a wider sweep of their tiles, the duel with the best, then training
#                     with the best tiles beside the default, HF + Liger and the compiled AdamW.
#   part r            Nsight Compute over one step of two compiled layers (scripts/profile_kernels.py), packed and
#                     flex attention: each kernel's duration, throughput, occupancy and largest stalls.
#   part s            the packed kernels with the mask only on the tiles that need it: GPU tests, the duel beside
#                     the kernels before (.whl/baseline_packed_attention_kernels.py), ncu of them, then training.
#   part t            (ran 2026-12-05, then removed: its two patches, one loop with the mask under a run-time branch and
#                     the heaviest programs first, are now the packed kernels themselves.)
#   part u            the residual add + RMSNorm as our Triton ops (fused_norm=true): GPU tests, the norm
#                     alone beside inductor's and Liger's, then training beside the default and HF + Liger.
#   part v            fused_norm=true with the compiled AdamW, and that under CUDA graphs, beside the default and
#                     HF + Liger.
#   part w            the new defaults (packed kernels heaviest-first, fused_norm, training metrics written a step
#                     late): the runner's GPU tests (no step waits for the GPU, under set_sync_debug_mode("error")),
#                     the serving tests (fused norms by default), then the default (profiled) beside HF + Liger and
#                     with the compiled AdamW, 40 steps.
#   part x            the residual stream carried between layers as a pair (CausalLM carry_residual, on by default;
#                     its add inside the next fused norm): the models' fused-norm GPU tests and the carried stream's,
#                     the serving tests with device_map offload (fixed on the CPU since part w failed one), then
#                     the default (profiled) beside carry_residual=false, fused_projections=kv (the key and value
#                     products as one: the narrow products of grouped-query attention) and HF + Liger, 40 steps.
#   part y            TritonAdamW (optimizer=adamw_triton: torch's AdamW, its step one Triton launch over all tensors,
#                     with the ALIGNED hint since its first run 2026-12-05 streamed 1.8-2.8 TB/s, BLOCK 1024): its GPU
#                     tests beside the compiled AdamW's, the fused-norm, carried-stream and sparse tied-gradient GPU
#                     tests and serving's device_map ones (part x's), the optimizer step alone (fused, compiled
#                     foreach, ours over a sweep of BLOCK x num_warps), then the default (the loss's first chunk
#                     written into grad weight) beside HF + Liger, optimizer=adamw_triton (profiled),
#                     carry_residual=false and sparse_tied_grad=true (the tied embedding's gradient as rows), 40
#                     steps. Its first run also had inductor's combo kernels (compile_options={combo_kernels:true}):
#                     1.005x, noise; its second (2026-12-05, H200) measured sparse_tied_grad the default's equal.
#   part z            the 7B shape (Adafactor in Triton, no checkpointing), profiled, after its 1-D parameters' updates
#                     were stacked into one a step (TritonAdafactor.update_all): its idle against part a's.
#   part hint         the ALIGNED hint moved onto the pointers (16-byte accesses in the PTX): TritonAdamW's GPU tests,
#                     the optimizer step alone, the default beside optimizer=adamw_triton, 30 steps.
#   part host         the default profiled over five steps (a logged one among them) with the host's activity: what
#                     the host began while the device idled, how far ahead it launched, its waits; beside HF +
#                     Liger, 80 steps, logging every 5 steps, then every 20.
#   part bars         the tied gradient's GPU test; the default beside HF + Liger, cuBLAS without a workspace,
#                     fused_projections=qkv, sparse_tied_grad=true, both, both without the workspace, 80 steps,
#                     the default profiled, then $BASELINE_TREE's default when given (an H200 run is what the bars
#                     ask for; at b6a59ee: 60.3% MFU, 1.229x).
#   part inductor     compile_options combo_kernels and coordinate_descent_tuning beside the default and HF + Liger.
#   part kv           fused_projections=kv under compile (it crashed part bars): scripts/check_packed_layouts.py,
#                     the packed tests, then the default beside HF + Liger and fused_projections=kv, 40 steps.
#   part blas         the loss's GPU tests, the default beside HF + Liger, sparse_tied_grad=true and max-autotune,
#                     80 steps, then the default of $BASELINE_TREE (an older commit's copy, when given), then
#                     the step's cuBLAS products under cuBLAS settings (scripts/bench_matmuls.py).
#   part clip         clipping at 1.0 (what the configs default to): torch's fused AdamW + clip_grad_norm_ against
#                     TritonAdamW with the clip folded in, 40 steps.
#   part confirm      fused_projections=auto (q/k/v as one product on GPUs) the default: its GPU tests, then the default
#                     beside HF + Liger, fused_projections=false, cuBLAS without a workspace and combo kernels,
#                     120 steps each.
#   part bar          the bar alone, within a short device budget: the auto fusion's and rotary op's GPU tests, then
#                     the default beside HF + Liger and fused_projections=false, 100 steps each, clocks and power
#                     logged; then $BASELINE_TREE's default when given.
#   part rotary       the fused_rotary op's GPU tests; the attention layer with it beside the torch rotation in two
#                     orders (bench_step_pieces.py --rotary); then the default beside HF + Liger and
#                     $BASELINE_TREE's default.
#   part chunks       the rotary op's GPU tests; the loss as one 8,192-token chunk and as 4,096-token chunks with
#                     sparse_tied_grad, beside the default and HF + Liger, 100 steps, clocks and power logged.
#   part inback       TritonAdamW inside backward in buckets of ~50M and ~200M elements on a side stream, beside the
#                     default and HF + Liger, 100 steps, clocks and power logged.
#   part swiglu       fused_swiglu=true (SwiGLU's gate as our Triton op): its GPU tests, bench_energy.py's gate three
#                     ways, then the default beside it and HF + Liger, 100 steps, clocks logged.
#   part tiles        energy, not time: SwiGLU's gate three ways with Liger's given fresh inputs at each call (its
#                     in-place gradients had fed back as its inputs), the packed attention kernels' tilings by energy
#                     (bench_energy.py --attention-sweep), then the least energy's tiles in training beside the
#                     default and HF + Liger, 100 steps, clocks and power logged.
#   part garbage      the default, 100 steps from a cold compile cache, then from the warm one, naming step 59's garbage.
#   tests             tests/gpu/test_models_gpu.py and test_run_gpu.py (the models and the runner on CUDA).
# Results: $OUT/summary_1b.md, summary_7b.md, summary_1b_options.md (tables, profiles), results_*.json, bench_*.log.
#     bash scripts/gpu_check_train.sh [a|b|...|z|tests] [more bench_train.py args]
# A rehearsal on a CPU (every command of the part with tiny dimensions, nothing installed):
#     REHEARSE=1 PY=.venv/bin/python OUT=/tmp/rehearsal bash scripts/gpu_check_train.sh a
set -u
cd "$(dirname "$0")/.."
PART=${1:-a}
shift || true
OUT=${OUT:-/tmp/gpu_check_train}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
START=$(date +%s)
if [ -n "${REHEARSE:-}" ]; then
    set -- --device cpu --tiny "$@"
else
    source scripts/gpu_setup.sh .whl .whl_fg .whl_titan
fi
$PY -c "import torch, pytorch_lightning, transformers; print('torch', torch.__version__, 'lightning', pytorch_lightning.__version__, 'transformers', transformers.__version__)"
echo "setup: $(( $(date +%s) - START )) s"

bench() {  # bench LOG ARGS...: one bench_train.py run, its wall time printed
    local log=$1 t0
    shift
    t0=$(date +%s)
    $PY scripts/bench_train.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/$log" | grep -E "^(---|\\$) "
    echo "=== $log: $(( $(date +%s) - t0 )) s"
}

baseline_bench() {  # baseline_bench STEPS SECONDS ARGS...: $BASELINE_TREE's default (an older commit's copy), if given
    [ -n "${BASELINE_TREE:-}" ] || return 0
    local steps=$1 seconds=$2 sub
    shift 2
    # The editable install maps forgather.conf, .callbacks and .strategies onto this tree's folders, and a tree
    # put first on PYTHONPATH has no such folders inside its package: links there make the old tree's own found
    # first (without them its code ran with this tree's templates).
    for sub in conf callbacks strategies; do
        [ -e "$BASELINE_TREE/forgather/$sub" ] || ln -s "../$sub" "$BASELINE_TREE/forgather/$sub"
    done
    (cd "$BASELINE_TREE" && PYTHONPATH="$PWD:${PYTHONPATH:-}" bench bench_1b_baseline.log --shape 1b \
        --label 1b_baseline --steps "$steps" --paths forgather --timeout "$seconds" "$@")
}

gpu_tests() {  # gpu_tests SECONDS LOG PYTEST-ARGS...: GPU tests, their failures and the count shown
    local seconds=$1 log=$2
    shift 2
    timeout "$seconds" $PY -m pytest -n 0 -q -p no:cacheprovider -rs --tb=short "$@" > "$OUT/$log" 2>&1
    grep -E "^(FAILED|ERROR|E  )|passed|failed|Error:" "$OUT/$log" | tail -20
}

packed_tests() {  # the packed attention kernels' GPU tests, failures and the count shown
    timeout 240 $PY -m pytest -n 0 tests/gpu/test_models_gpu.py -k "packed" -q -p no:cacheprovider -rs \
        --tb=short > "$OUT/pytest_models.txt" 2>&1
    grep -E "^(FAILED|ERROR)|passed|failed|Error:" "$OUT/pytest_models.txt" | tail -30
}

packed_sweep() {  # sweep the packed kernels' tiles and duel the best; prints the best as attention_kernel_options
    timeout 240 $PY scripts/bench_step_pieces.py --duel --packed-sweep --rows "stdlib rows" --rounds 3 \
        --json "$OUT/duel.json" 2>&1 | grep -v Warning > "$OUT/duel.txt"
    grep -E '"(ms_per_layer_median|best|error)"' "$OUT/duel.txt" | cut -c1-400 >&2
    grep -o '"option": "[^"]*"' "$OUT/duel.txt" | tail -1 | sed 's/"option": "\(.*\)"/\1/'
}

ncu_step() {  # ncu_step SECONDS NAME [ncu options] PROGRAM...: Nsight Compute over a step, tabulated
    local seconds=$1 name=$2
    shift 2
    timeout "$seconds" ncu --clock-control none --profile-from-start off --csv --page details --section SpeedOfLight \
        --section Occupancy --section LaunchStats \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio" \
        --log-file "$OUT/ncu_$name.csv" "$@" > "$OUT/ncu_$name.log" 2>&1
    echo "ncu ($name): rc $?"; grep -v Warning "$OUT/ncu_$name.log" | tail -4
    $PY scripts/profile_kernels.py --summarize "$OUT/ncu_$name.csv" --top 40 | tee "$OUT/ncu_$name.md"
}

case $PART in
a)
    bench bench_1b.log --shape 1b --steps 20 --paths forgather hf-liger hf torchtitan --profile forgather hf-liger \
        --timeout 150 "$@"
    # A 7B run's end of fit writes last.ckpt and the exported model, 13.5 GB each, which did not fit in 200 s on
    # 2026-12-02; bench_train now stops a run once its measurements are written, and the timeout keeps a margin.
    bench bench_7b.log --shape 7b --steps 15 --paths forgather memory24 --profile forgather --profile-steps 2 \
        --timeout 360 "$@"
    # Without activation checkpointing the 7B step needs ~100 GiB; if it did not fit, the same with it.
    if ! $PY -c "import json, sys; sys.exit(not any(r['name'] == 'forgather' and 'tokens_per_s' in r
                 for r in json.load(open('$OUT/results_7b.json'))))"; then
        bench bench_7b.log --shape 7b --steps 15 --append --paths --variant forgather-ac activation_checkpointing=true \
            --profile forgather-ac --profile-steps 2 --timeout 360 "$@"
    fi
    # The compiled HF baselines last (mostly compile time; the issue has their figures already).
    bench bench_1b.log --shape 1b --steps 20 --append --paths hf-compile hf-liger-compile --timeout 150 "$@"
    ;;
b)
    bench bench_1b_options.log --shape 1b --label 1b_options --steps 20 --paths forgather --variant fused-proj fused_projections=true \
        --variant compile-model compile_scope=model \
        --variant fused-proj+compile-model fused_projections=true compile_scope=model \
        --variant sdpa attention_fn=sdpa --variant adamw-sr optimizer=adamw_sr \
        --variant adamw-inbw optimizer=adamw_in_backward --variant adamw-compiled optimizer=adamw_compiled \
        --timeout 150 "$@"
    # inductor tuning its own kernels: minutes of autotuning before the first step
    bench bench_1b_options.log --shape 1b --label 1b_options --steps 20 --append --paths \
        --variant max-autotune compile_mode=max-autotune-no-cudagraphs --timeout 420 "$@"
    ;;
d)
    bench bench_1b_best.log --shape 1b --label 1b_best --steps 20 --paths forgather hf-liger \
        --variant autotune+adamw-compiled compile_mode=max-autotune-no-cudagraphs optimizer=adamw_compiled \
        --timeout 420 "$@"
    ;;
e)
    bench bench_1b_best.log --shape 1b --label 1b_best --steps 40 --paths forgather hf-liger \
        --variant adamw-compiled optimizer=adamw_compiled \
        --variant cdt+adamw-compiled optimizer=adamw_compiled "compile_options={coordinate_descent_tuning:true}" \
        --profile cdt+adamw-compiled --profile-steps 10 --timeout 240 "$@"
    ;;
f)
    bench bench_1b_log20.log --shape 1b --label 1b_log20 --steps 80 --log-every 20 --paths forgather hf-liger \
        --timeout 200 "$@"
    bench bench_1b_trace.log --shape 1b --label 1b_trace --steps 20 --paths forgather --profile forgather \
        --profile-steps 6 --profile-trace --timeout 200 "$@"
    ;;
g)
    bench bench_1b_g.log --shape 1b --label 1b_g --steps 40 --paths forgather hf-liger \
        --variant cdt+adamw-compiled optimizer=adamw_compiled "compile_options={coordinate_descent_tuning:true}" \
        --profile forgather --profile-steps 6 --profile-trace --timeout 200 "$@"
    bench bench_1b_g.log --shape 1b --label 1b_g --steps 40 --append --paths \
        --variant autotune+adamw-compiled compile_mode=max-autotune-no-cudagraphs optimizer=adamw_compiled \
        --timeout 400 "$@"
    ;;
h)
    bench bench_1b_h.log --shape 1b --label 1b_h --steps 40 --paths \
        --variant ro+adamw-compiled compile_mode=reduce-overhead optimizer=adamw_compiled --timeout 120 "$@"
    ;;
j|i)
    if [ "$PART" = j ] && [ -z "${REHEARSE:-}" ]; then
        timeout 150 $PY scripts/bench_step_pieces.py --skip-optimizer --option-sets "fwd 64x64 w4 s3" \
            --json "$OUT/pieces.json" 2>&1 | grep -v Warning | tee "$OUT/pieces.txt"
    fi
    bench bench_1b_i.log --shape 1b --label 1b_i --steps 40 --paths forgather \
        --variant flex-fwd64 "attention_kernel_options={fwd_BLOCK_M:64,fwd_BLOCK_N:64,fwd_num_warps:4,fwd_num_stages:3}" \
        --variant flex-bwd32-64 "attention_kernel_options={bwd_BLOCK_M1:32,bwd_BLOCK_N1:64,bwd_BLOCK_M2:64,bwd_BLOCK_N2:32,bwd_num_warps:4,bwd_num_stages:3}" \
        --variant flex-bwd64-128 "attention_kernel_options={bwd_BLOCK_M1:64,bwd_BLOCK_N1:128,bwd_BLOCK_M2:128,bwd_BLOCK_N2:64,bwd_num_warps:8,bwd_num_stages:3}" \
        --timeout 150 "$@"
    ;;
k)
    TILING="attention_kernel_options={fwd_BLOCK_M:64,fwd_BLOCK_N:64,fwd_num_warps:4,fwd_num_stages:3,bwd_BLOCK_M1:64,bwd_BLOCK_N1:64,bwd_BLOCK_M2:64,bwd_BLOCK_N2:64,bwd_num_warps:4,bwd_num_stages:3}"
    bench bench_1b_k.log --shape 1b --label 1b_k --steps 40 --paths forgather hf-liger --variant flex-64 "$TILING" \
        --timeout 150 "$@"
    bench bench_1b_k.log --shape 1b --label 1b_k --steps 40 --append --paths \
        --variant flex-64+autotune+adamw-compiled "$TILING" compile_mode=max-autotune-no-cudagraphs \
        optimizer=adamw_compiled --timeout 330 "$@"
    ;;
l)
    if [ -z "${REHEARSE:-}" ]; then
        timeout 200 $PY -m pytest -n 0 tests/gpu/test_models_gpu.py -q -p no:cacheprovider -rs 2>&1 | tail -15 \
            | tee "$OUT/pytest_models.txt"
    fi
    bench bench_1b_l.log --shape 1b --label 1b_l --steps 40 --paths forgather hf-liger --timeout 150 "$@"
    bench bench_1b_l.log --shape 1b --label 1b_l --steps 40 --append --paths \
        --variant autotune+adamw-compiled compile_mode=max-autotune-no-cudagraphs optimizer=adamw_compiled \
        --timeout 330 "$@"
    ;;
m)
    if [ -z "${REHEARSE:-}" ]; then
        timeout 200 $PY -m pytest -n 0 tests/gpu/test_optim_gpu.py -k "overlapped or in_backward or raises" -q \
            -p no:cacheprovider -rs 2>&1 | tail -15 | tee "$OUT/pytest_optim.txt"
    fi
    bench bench_1b_m.log --shape 1b --label 1b_m --steps 40 --paths forgather \
        --variant adamw-inbw-50M optimizer=adamw_in_backward bucket_size=50000000 \
        --variant adamw-inbw-200M optimizer=adamw_in_backward bucket_size=200000000 \
        --profile forgather adamw-inbw-50M --profile-steps 6 --timeout 150 "$@"
    ;;
n)
    # our packed-document attention kernels: GPU tests, each kernel's tiles swept and the best dueled beside flex
    # and flash attention 2 on the bench's rows (CUDA graphs), then training with the default and the best tiles
    BEST=()
    if [ -z "${REHEARSE:-}" ]; then
        packed_tests
        OPTION=$(packed_sweep)
        [ -n "$OPTION" ] && BEST=(--variant packed-best attention_fn=packed "$OPTION")
    fi
    bench bench_1b_n.log --shape 1b --label 1b_n --steps 40 --paths forgather hf-liger --variant packed attention_fn=packed \
        "${BEST[@]}" --profile packed --profile-steps 6 --timeout 150 "$@"
    ;;
o)
    # after part n: the packed kernels' scales as constants (torch.compile's launcher passed them as fp64), IEEE
    # products for fp32, the sweep's best tiles as the default: their GPU tests, then training beside flex
    if [ -z "${REHEARSE:-}" ]; then
        packed_tests
    fi
    bench bench_1b_o.log --shape 1b --label 1b_o --steps 40 --paths forgather hf-liger --variant packed attention_fn=packed \
        --profile packed --profile-steps 6 --timeout 150 "$@"
    ;;
p)
    # after attention_fn=packed became the bench's forgather path: beside HF + Liger and flex (the path before),
    # then with the compiled AdamW
    bench bench_1b_p.log --shape 1b --label 1b_p --steps 40 --paths forgather hf-liger --variant flex attention_fn=flex \
        --variant packed+adamw-compiled optimizer=adamw_compiled --timeout 120 "$@"
    ;;
q)
    # prepared for the next session: the GPU tests (the kernels' helpers, reviewed after the last call, are
    # unchecked there), a wider sweep of the tiles (PACKED_SWEEP), the duel with the best, then the default beside
    # the best tiles, HF + Liger and the compiled AdamW in training
    BEST=()
    if [ -z "${REHEARSE:-}" ]; then
        packed_tests
        OPTION=$(packed_sweep)
        [ -n "$OPTION" ] && BEST=(--variant packed-best "$OPTION")
    fi
    bench bench_1b_q.log --shape 1b --label 1b_q --steps 40 --paths forgather hf-liger "${BEST[@]}" \
        --variant packed+adamw-compiled optimizer=adamw_compiled --timeout 150 "$@"
    ;;
r)
    # Nsight Compute over one forward + backward of two compiled layers of the 1.24B shape on the bench's packed
    # rows (scripts/profile_kernels.py): what bounds each kernel that is not a product (occupancy, stalls)
    if [ -z "${REHEARSE:-}" ]; then
        ncu --version | tail -1
        for attention in packed flex; do
            ncu_step 240 $attention $PY scripts/profile_kernels.py --attention $attention
        done
    fi
    ;;
s)
    # the packed kernels without the mask on the tiles every row sees whole: their GPU tests, the duel beside the
    # kernels before (BASELINE, a copy of that revision's packed_attention_kernels.py, carried in .whl/) on both
    # sets of rows, Nsight Compute over the packed kernels, then training beside HF + Liger and the compiled AdamW
    if [ -z "${REHEARSE:-}" ]; then
        packed_tests
        BASELINE=${BASELINE:-.whl/baseline_packed_attention_kernels.py}
        [ -f "$BASELINE" ] && BASE_ARGS=(--packed-baseline "$BASELINE") || BASE_ARGS=()
        timeout 200 $PY scripts/bench_step_pieces.py --duel --rows "stdlib rows" "random 128-1023" --rounds 5 \
            "${BASE_ARGS[@]}" --json "$OUT/duel.json" 2>&1 | grep -v Warning > "$OUT/duel.txt"
        grep -E '"(ms_per_layer_median|error)"|capture failed' "$OUT/duel.txt" | cut -c1-300
        ncu_step 150 packed --kernel-name regex:_packed_attention $PY scripts/profile_kernels.py
    fi
    bench bench_1b_s.log --shape 1b --label 1b_s --steps 40 --paths forgather hf-liger \
        --variant packed+adamw-compiled optimizer=adamw_compiled --timeout 150 "$@"
    ;;
u)
    # the residual add + RMSNorm as our Triton ops (fused_norm=true, forgather/models/fused_rms_norm.py):
    # their GPU tests, the norm alone beside inductor's and Liger's in CUDA graphs (bench_step_pieces.py --norm,
    # with a sweep of NORM_TILING), then training beside the default and HF + Liger (~8 minutes in all)
    if [ -z "${REHEARSE:-}" ]; then
        timeout 200 $PY -m pytest -n 0 tests/gpu/test_models_gpu.py -k "fused" -q -p no:cacheprovider -rs \
            --tb=short > "$OUT/pytest_norm.txt" 2>&1
        grep -E "^(FAILED|ERROR)|passed|failed|Error:" "$OUT/pytest_norm.txt" | tail -20
        timeout 150 $PY scripts/bench_step_pieces.py --norm --rounds 5 --json "$OUT/norm.json" 2>&1 | grep -v Warning \
            | tee "$OUT/norm.txt" | cut -c1-300
    fi
    bench bench_1b_u.log --shape 1b --label 1b_u --steps 30 --paths forgather hf-liger --variant fused-norm \
        fused_norm=true --timeout 110 "$@"
    ;;
v)
    # what parts t and u measured faster (the kernels then as patches), 40 steps beside the default and HF + Liger:
    # fused_norm=true with the compiled AdamW, and that under CUDA graphs (compile_mode=reduce-overhead: the step's
    # ~1,150 launches, ~2.5 ms of gaps, replayed as graphs)
    bench bench_1b_v.log --shape 1b --label 1b_v --steps 40 --paths forgather hf-liger --variant \
        fused-norm+adamw-compiled fused_norm=true optimizer=adamw_compiled --variant fused-norm+adamw-compiled+graphs \
        fused_norm=true optimizer=adamw_compiled compile_mode=reduce-overhead --timeout 130 "$@"
    ;;
w)
    if [ -z "${REHEARSE:-}" ]; then
        timeout 150 $PY -m pytest -n 0 tests/gpu/test_run_gpu.py -k "waits or (fused and adamw)" -q \
            -p no:cacheprovider -rs --tb=short > "$OUT/pytest_run.txt" 2>&1
        grep -E "^(FAILED|ERROR|E  )|passed|failed|Error:" "$OUT/pytest_run.txt" | tail -20
        timeout 120 $PY -m pytest -n 0 tests/gpu/test_serve_gpu.py -q -p no:cacheprovider -rs --tb=short \
            > "$OUT/pytest_serve.txt" 2>&1
        grep -E "^(FAILED|ERROR)|passed|failed|Error:" "$OUT/pytest_serve.txt" | tail -10
    fi
    bench bench_1b_w.log --shape 1b --label 1b_w --steps 40 --paths forgather hf-liger --variant adamw-compiled \
        optimizer=adamw_compiled --profile forgather --timeout 130 "$@"
    ;;
x)
    if [ -z "${REHEARSE:-}" ]; then
        gpu_tests 150 pytest_models.txt tests/gpu/test_models_gpu.py -k "norm or carried"
        gpu_tests 150 pytest_serve.txt tests/gpu/test_serve_gpu.py -k "device_map"
    fi
    bench bench_1b_x.log --shape 1b --label 1b_x --steps 40 --paths forgather hf-liger \
        --variant one-tensor carry_residual=false --variant fused-kv fused_projections=kv \
        --profile forgather --timeout 130 "$@"
    ;;
z)
    # the 7B step (Adafactor in Triton) after its vectors' updates were stacked into one a step: its idle time
    # (part of a's profile: ~6,700 launch gaps a step) against part a's 58.8% of 2026-12-02
    bench bench_7b_z.log --shape 7b --label 7b_z --steps 15 --paths forgather --profile forgather --profile-steps 2 \
        --timeout 360 "$@"
    ;;
y)
    if [ -z "${REHEARSE:-}" ]; then
        gpu_tests 150 pytest_optim.txt tests/gpu/test_optim_gpu.py -k "triton_adamw or compiled_adamw or stacks"
        gpu_tests 120 pytest_models.txt tests/gpu/test_models_gpu.py -k "norm or carried or sparse"
        gpu_tests 90 pytest_serve.txt tests/gpu/test_serve_gpu.py -k "device_map"
        timeout 120 $PY scripts/bench_step_pieces.py --only-optimizer --json "$OUT/optimizer.json" 2>&1 \
            | grep -v Warning | tee "$OUT/optimizer.txt"
    fi
    bench bench_1b_y.log --shape 1b --label 1b_y --steps 40 --paths forgather hf-liger \
        --variant adamw-triton optimizer=adamw_triton --variant one-tensor carry_residual=false \
        --variant sparse-tied sparse_tied_grad=true --profile adamw-triton --timeout 130 "$@"
    ;;
hint)
    # the ALIGNED hint on the pointers themselves (on the addresses before the cast it was lost: scalar loads, part
    # y's second run; scripts/adamw_ptx.py reads the PTX on a CPU): TritonAdamW's GPU tests, the optimizer step
    # alone (no compiled foreach: 45 s of compile), then the default beside optimizer=adamw_triton, 30 steps
    if [ -z "${REHEARSE:-}" ]; then
        gpu_tests 100 pytest_optim.txt tests/gpu/test_optim_gpu.py -k "triton_adamw"
        timeout 90 $PY scripts/bench_step_pieces.py --only-optimizer --skip-compiled --json "$OUT/optimizer.json" 2>&1 \
            | grep -v Warning | tee "$OUT/optimizer.txt"
    fi
    bench bench_1b_hint.log --shape 1b --label 1b_hint --steps 30 --paths forgather \
        --variant adamw-triton optimizer=adamw_triton --timeout 110 "$@"
    ;;
host)
    # who sets the pace (part y's profile: 107.2 ms a step over three unlogged steps, its timed windows 109.3): the
    # default profiled over five steps, a logged one among them, with the host's activity kept
    # (profile_train.host_during_gaps, host_lead: how far ahead the host launched each kernel, its waits), beside
    # HF + Liger, 80 steps, every window and the garbage collector's passes in the notes; then both logging every
    # 20 steps instead of 5 (what a logged step costs)
    bench bench_1b_host.log --shape 1b --label 1b_host --steps 80 --paths forgather hf-liger --profile forgather \
        --profile-steps 5 --profile-trace --timeout 200 "$@"
    bench bench_1b_host.log --shape 1b --label 1b_log20 --steps 80 --log-every 20 --paths forgather hf-liger \
        --timeout 150 "$@"
    ;;
bars)
    # the bars' run: the default (TritonAdamW, loss chunks of 2,048 tokens, the rotary tables rounded once, the
    # head's gradient scaled in forward) beside HF + Liger, 80 steps, the default profiled after its timed steps
    # between two marker kernels, its trace kept with the host's activity; beside them cuBLAS without a workspace
    # (no memset before each product; scripts/bench_matmuls.py, H100: the large products 1-2 us faster, the
    # narrow k/v ones slower), q/k/v as one product (fused_projections=qkv: no narrow k/v products left, and one
    # product for the input's gradient instead of three and their add), the tied head's gradient taking the
    # lookup's rows in place (sparse_tied_grad=true, embedding.TiedGradient), and the two together, with and
    # without the workspace; first the tied gradient's and the norm-measuring optimizer's GPU tests (against the
    # dense lookup and get_total_norm, no host wait); last the default of $BASELINE_TREE (an older commit's copy,
    # when given: the default now measures a logged step's gradient norm inside TritonAdamW's kernel)
    if [ -z "${REHEARSE:-}" ]; then
        gpu_tests 150 tests_tied.log tests/gpu/test_models_gpu.py tests/gpu/test_optim_gpu.py \
            -k "sparse_tied or measures_the_gradient_norm"
    fi
    bench bench_1b_bars.log --shape 1b --label 1b_bars --steps 80 --paths forgather hf-liger \
        --variant ws0 env:CUBLAS_WORKSPACE_CONFIG=:0:0 --variant qkv fused_projections=qkv \
        --variant tied sparse_tied_grad=true --variant qkv-tied fused_projections=qkv sparse_tied_grad=true \
        --variant qkv-tied-ws0 fused_projections=qkv sparse_tied_grad=true env:CUBLAS_WORKSPACE_CONFIG=:0:0 \
        --profile forgather --profile-trace --timeout 150 "$@"
    baseline_bench 80 150 "$@"  # the tree before (its default measures the logged norm in its own pass)
    ;;
confirm)
    # after part bars (H100, 2026-12-05: q/k/v as one product 1.006x, the tied gradient level, cuBLAS without a
    # workspace 1.002-1.008x, one run each): fused_projections=auto (q/k/v as one product on GPUs) the default; the
    # GPU tests of the fused projections under compile (auto among them), then the default beside HF + Liger, the
    # old default (fused_projections=false), cuBLAS without a workspace, and inductor's combo kernels, 120 steps
    # each (coordinate-descent tuning, its compile minutes long, is part inductor's)
    if [ -z "${REHEARSE:-}" ]; then
        gpu_tests 150 tests_fused.log tests/gpu/test_models_gpu.py -k "fused_projections"
    fi
    bench bench_1b_confirm.log --shape 1b --label 1b_confirm --steps 120 --paths forgather hf-liger \
        --variant separate fused_projections=false --variant ws0 env:CUBLAS_WORKSPACE_CONFIG=:0:0 \
        --variant combo "compile_options={combo_kernels:true}" --timeout 150 "$@"
    ;;
bar)
    # part confirm without its optional levers, for a short device budget (~4 min): the auto fusion's and the rotary
    # op's GPU tests under compile, then the default beside HF + Liger and the old default
    # (fused_projections=false), 100 steps each, the GPU's clocks and power logged beside each
    if [ -z "${REHEARSE:-}" ]; then
        gpu_tests 90 tests_auto.log tests/gpu/test_models_gpu.py -k "fused_projections and auto or fused_rotary"
    fi
    bench bench_1b_bar.log --shape 1b --label 1b_bar --steps 100 --paths forgather hf-liger \
        --variant separate fused_projections=false --clocks --timeout 100 "$@"
    baseline_bench 100 100 "$@"  # an older commit's default in the same call (at b6a59ee: 1.229x on an H200)
    ;;
chunks)
    # the loss's chunks under the power limit (both bar paths ran at the H100's 700 W cap, 2026-12-06): one chunk of
    # all 8,192 tokens (the head's products each one GEMM, its weight read once and its gradient written once, 2 GiB
    # of bf16 logits) and 4,096-token chunks with the tied gradient as rows (1.003x on the H100, 2026-12-05), beside
    # the default and HF + Liger, clocks and power logged; first the rotary op's GPU tests (its kernels' shared
    # prologue, 6032ed3, ran only under Triton's interpreter so far)
    if [ -z "${REHEARSE:-}" ]; then
        gpu_tests 150 tests_rotary.log tests/gpu/test_models_gpu.py -k "fused_rotary"
    fi
    bench bench_1b_chunks.log --shape 1b --label 1b_chunks --steps 100 --paths forgather hf-liger \
        --variant chunk8k ++loss.chunk_size=8192 --variant chunk4k_sparse ++loss.chunk_size=4096 sparse_tied_grad=true \
        --clocks --timeout 110 "$@"
    ;;
inback)
    # TritonAdamW stepped inside backward in buckets on a side stream (optimizer=adamw_in_backward with TritonAdamW as
    # its factory): the optimizer's ~4.4 ms a step of memory-bound work alongside backward's products instead of
    # after them, which under the power limit may cost less energy (with torch's fused AdamW as the factory:
    # 1.006-1.008x on an H100, 2026-12-04, before TritonAdamW), beside the default and HF + Liger, 100 steps
    local_ib="optimizer=adamw_in_backward ++optimizer.optimizer_factory._target_=forgather.optim.triton_adamw:TritonAdamW"
    local_ib="$local_ib ++optimizer.optimizer_factory.fused=null"
    bench bench_1b_inback.log --shape 1b --label 1b_inback --steps 100 --paths forgather hf-liger \
        --variant ib50 $local_ib bucket_size=50000000 --variant ib200 $local_ib bucket_size=200000000 \
        --clocks --timeout 110 "$@"
    ;;
swiglu)
    # SwiGLU's gate as our Triton op (fused_swiglu=true, forgather.models.fused_swiglu): inductor's drew the power
    # limit alone (696 W, 0.53 mJ a token, H100, 2026-12-06, scripts/bench_energy.py) where the norms moved their
    # bytes at 486 W. The op's GPU tests, the gate's energy three ways (inductor, ours, Liger's; all the step's
    # pieces: `cd scripts && python3 bench_energy.py`), then the default beside fused_swiglu=true and HF + Liger,
    # 100 steps, clocks and power logged
    if [ -z "${REHEARSE:-}" ]; then
        gpu_tests 150 tests_swiglu.log tests/gpu/test_models_gpu.py -k "swiglu"
        (cd scripts && timeout 150 $PY bench_energy.py --seconds 8 --json "$OUT/energy.json" --pieces swiglu \
            swiglu-ours swiglu-liger 2>&1 | grep -v Warning \
            | tee "$OUT/energy.txt" | grep -E "^[#|]")
    fi
    bench bench_1b_swiglu.log --shape 1b --label 1b_swiglu --steps 100 --paths forgather hf-liger \
        --variant swiglu fused_swiglu=true --clocks --timeout 110 "$@"
    ;;
tiles)
    # energy, not time (both bar paths run at the power limit): the gate's pieces again, Liger's now with fresh inputs
    # at each call (gate-copy: those copies alone); the packed kernels' tilings by the energy of a step's worth of
    # attention (TILING was chosen by time), then the least energy's tiles in the step beside the default and HF + Liger
    OPTION=""
    if [ -z "${REHEARSE:-}" ]; then
        (cd scripts && timeout 100 $PY bench_energy.py --seconds 6 --json "$OUT/energy_gate.json" --pieces swiglu \
            swiglu-ours swiglu-liger gate-copy 2>&1 | grep -v Warning | tee "$OUT/energy_gate.txt" | grep -E "^[#|]")
        (cd scripts && timeout 240 $PY bench_energy.py --seconds 3 --attention-sweep --json "$OUT/energy_tiles.json" \
            2>&1 | grep -v Warning | tee "$OUT/energy_tiles.txt" | grep -E "^([#|]|least)")
        OPTION=$(grep -o "attention_kernel_options=.*" "$OUT/energy_tiles.txt" | tail -1)
    fi
    [ -n "$OPTION" ] && VARIANT=(--variant tiles_energy "$OPTION") || VARIANT=()
    bench bench_1b_tiles.log --shape 1b --label 1b_tiles --steps 100 --paths forgather hf-liger "${VARIANT[@]}" \
        --clocks --timeout 110 "$@"
    ;;
rotary)
    # the fused q/k/v product rotated and split by our Triton op (forgather.models.fused_rotary): its GPU tests
    # (against the torch references; compiled layers against the torch rotation), then the attention layer as it
    # runs on a GPU beside the torch rotation in the order before (HeadsFirstAttention) and in storage order
    # (inductor's backward kernel that joins the gradients took 62-65 us a layer, H100 and H200, 2026-12-06, where
    # its bytes need ~20-30), compiled, forward + backward, timed in turn; then the bar (the default profiled), and
    # the default of $BASELINE_TREE (the tree before the change, when given)
    if [ -z "${REHEARSE:-}" ]; then
        gpu_tests 200 tests_rotary.log tests/gpu/test_models_gpu.py -k "fused_rotary"
        timeout 200 $PY scripts/bench_step_pieces.py --rotary --rounds 5 --json "$OUT/rotary.json" 2>&1 \
            | tee "$OUT/rotary.txt" | grep -E "^#|piece|Error"
    fi
    bench bench_1b_bar.log --shape 1b --label 1b_bar --steps 100 --paths forgather hf-liger --profile forgather \
        --clocks --timeout 130 "$@"
    baseline_bench 100 100 "$@"
    ;;
garbage)
    # who makes the garbage of runs that compile from a cold cache (~890 collector passes in 100 steps against
    # ~150 from a warm one, H100 and H200): the default alone, 100 steps, its row's note naming the unreachable
    # objects of step 59 (CollectorTimes), then the same again from the warm cache. Found with it (2026-12-06):
    # the epoch ends at step 59 with a short batch and every layer compiles again (drop_last=true avoids it)
    bench bench_1b_garbage.log --shape 1b --label 1b_garbage --steps 100 --paths forgather \
        --variant warm compile=true --garbage-step 58 --timeout 120 "$@"
    ;;
inductor)
    # inductor's settings that cut launches or tune the step's own kernels (the norms, SwiGLU, rotary, adds: 9.45 ms
    # a step in 1,087 kernels on the H200, 2026-12-05): combo kernels (independent small kernels as one launch) and
    # coordinate-descent tuning of each kernel's tiling, beside the default and HF + Liger, 80 steps
    bench bench_1b_inductor.log --shape 1b --label 1b_inductor --steps 80 --paths forgather hf-liger \
        --variant combo "compile_options={combo_kernels:true}" \
        --variant cdt "compile_options={coordinate_descent_tuning:true}" --timeout 300 "$@"
    ;;
kv)
    # fused_projections=kv crashed part bars (an illegal memory access, H100, 2026-12-05): the op with its values
    # a view with gaps, eager and compiled, then through packed_attention (dense inputs first); the packed tests
    # (two new: layers compiled with fused projections, the op compiled on views); then the default beside HF +
    # Liger and fused_projections=kv, 40 steps
    if [ -z "${REHEARSE:-}" ]; then
        timeout 240 $PY scripts/check_packed_layouts.py 2>&1 | grep -v Warning | tee "$OUT/check_packed_layouts.txt" \
            | grep "^|"
        packed_tests
    fi
    bench bench_1b_kv.log --shape 1b --label 1b_kv --steps 40 --paths forgather hf-liger --variant fused-kv \
        fused_projections=kv --timeout 130 "$@"
    ;;
blas)
    # What this session changed, beside what it changed from (the tree at $BASELINE_TREE, when given: a copy of an
    # older commit, e.g. `git archive b6a59ee | tar -x -C .old_tree`, carried to the device), and levers not yet
    # default: the loss's GPU tests (the head's weight gradient scaled in forward, its backward pass skipped when
    # the incoming gradient is 1); the default beside HF + Liger, sparse_tied_grad=true (the embedding's
    # gradient: a 155 us fill and a 360 us add a step on the H200) and inductor's max-autotune (1.021x in its
    # last run, 2026-12-04, before the packed kernels), 80 steps, the default and sparse_tied_grad profiled; the
    # baseline tree's default; last, the step's cuBLAS products under cuBLAS settings, with the memset launched
    # before almost every one, and the fused widths one stored parameter would give (scripts/bench_matmuls.py)
    if [ -z "${REHEARSE:-}" ]; then
        gpu_tests 240 pytest_loss.txt tests/gpu/test_loss_gpu.py
    fi
    bench bench_1b_blas.log --shape 1b --label 1b_blas --steps 80 --paths forgather hf-liger \
        --variant sparse-tied sparse_tied_grad=true \
        --variant max-autotune compile_mode=max-autotune-no-cudagraphs --profile forgather sparse-tied \
        --profile-trace --timeout 430 "$@"
    baseline_bench 80 150 "$@"
    if [ -z "${REHEARSE:-}" ]; then
        timeout 150 $PY scripts/bench_matmuls.py --json "$OUT/matmuls.json" 2>&1 | grep -v Warning \
            | tee "$OUT/matmuls.md"
    fi
    ;;
clip)
    # the optimizer as runs use it, clipping by norm at 1.0 (the configs' default; the bench's other rows clip
    # nothing, as the HF loops): torch's fused AdamW after Lightning's clip_grad_norm_ against TritonAdamW with the
    # clip folded into its kernel
    bench bench_1b_clip.log --shape 1b --label 1b_clip --steps 40 --paths forgather \
        --variant adamw-triton optimizer=adamw_triton --set gradient_clip_val=1.0 --timeout 130 "$@"
    ;;
c)
    # where the non-matmul time goes: flex attention's tilings on packed rows (bench_step_pieces.py), then one
    # profiled run whose summary lists the top kernels by name (inductor's fused pointwise kernels among them)
    if [ -z "${REHEARSE:-}" ]; then
        timeout 200 $PY scripts/bench_step_pieces.py --skip-optimizer --option-sets "fwd 64x64 w4 s3" "bwd 32/64 w4 s3" \
            "bwd 64/128 w8 s3" safe --json "$OUT/pieces.json" 2>&1 | grep -v Warning | tee "$OUT/pieces.txt"
    fi
    bench bench_1b_profile.log --shape 1b --label 1b_profile --steps 20 --paths forgather --profile forgather \
        --timeout 150 "$@"
    ;;
tests)
    timeout 300 $PY -m pytest -n 0 tests/gpu/test_models_gpu.py tests/gpu/test_run_gpu.py -q -p no:cacheprovider -rs 2>&1 \
        | tee "$OUT/pytest_models.txt"
    ;;
*)
    echo "unknown part '$PART': a-z, hint, host, bars, kv, blas, clip or tests"; exit 2 ;;
esac
echo "==================== summary ($(( $(date +%s) - START )) s in all) ===================="
# Parts without a training bench (t, tests) have no summary: that is not a failure of the call.
cat "$OUT"/summary_*.md 2>/dev/null || true
