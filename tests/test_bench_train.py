"""scripts/bench_train.py and scripts/profile_train.py on a CPU: the kernel classification and idle-gap
arithmetic of the profile on synthetic traces, and the benchmark's smoke mode end to end (every kind of row:
an HF loop with its profile, a baseline that fails, a forgather run with its profile callback), so the GPU call
only has the GPU left to find out."""

import json
import os
import re
import subprocess
import sys
import time
import types

import pytest

from helpers.scripts import SCRIPTS, load_script

profile_train = load_script("profile_train")
bench_train = load_script("bench_train")


@pytest.mark.parametrize("name, category", [
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm>", "matmul"),
    ("triton_tem_fused_flex_attention_backward_0", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", "attention"),
    ("liger_cross_entropy_kernel", "loss"),
    ("void at::native::(anonymous)::cunn_SoftMaxForward<8, float>", "pointwise"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("apply_update", "optimizer"),
    ("triton_for_fused_0", "optimizer"),  # inductor's compiled foreach step (CompiledAdamW)
    ("triton_poi_fused_add_mul_silu_3", "pointwise"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1", "pointwise"),
    ("_rms_norm_forward_kernel", "pointwise"),
    ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<c10::BFloat16>>", "pointwise"),
    ("Memcpy HtoD (Pinned -> Device)", "copies"),
    ("Memset (Device)", "copies"),
    ("some_kernel_nobody_named", "other"),
])
def test_kernels_are_classified_by_name(name, category):
    assert profile_train.classify(name) == category


def test_union_counts_overlapping_intervals_once():
    assert profile_train.union_length([(0, 10), (5, 15), (20, 30), (22, 25)]) == 25
    assert profile_train.union_length([]) == 0


def test_summary_per_step_with_overlaps_and_idle_gaps():
    # Two steps in 100 us of wall time: a GEMM overlapping an elementwise kernel (another stream), a flex
    # attention kernel, an unknown kernel, and gaps: busy = [0, 30] + [40, 50] + [60, 70] = 50 us.
    events = [("nvjet_gemm", 0, 20), ("triton_poi_fused_add_0", 10, 20), ("triton_tem_fused_0", 40, 10),
              ("mystery", 60, 10)]
    rows = {row["category"]: row for row in profile_train.summarize(events, wall_us=100, steps=2)}
    assert list(rows) == ["attention", "matmul", "pointwise", "other", "idle"]
    assert rows["matmul"]["ms_per_step"] == pytest.approx(0.010)
    assert rows["pointwise"]["share"] == pytest.approx(0.20)
    assert rows["attention"]["ms_per_step"] == pytest.approx(0.005)
    assert rows["other"]["share"] == pytest.approx(0.10)
    assert rows["idle"]["ms_per_step"] == pytest.approx(0.025)
    assert rows["idle"]["share"] == pytest.approx(0.50)
    table = profile_train.markdown_table(list(rows.values()))
    assert "| idle | 0.03 | 50.0% |" in table and "| matmul | 0.01 | 20.0% |" in table


def test_the_top_kernels_are_ranked_by_device_time_per_step_with_their_calls():
    events = [("triton_poi_fused_mul_silu_0", 0, 30), ("nvjet_gemm", 30, 100), ("triton_poi_fused_mul_silu_0", 130, 30),
              ("triton_per_fused_add_mean_rsqrt_1", 160, 20), ("nvjet_gemm", 180, 100)]
    top = profile_train.top_kernels(events, steps=2, count=2)
    assert [row["name"] for row in top] == ["nvjet_gemm", "triton_poi_fused_mul_silu_0"]
    assert top[0]["ms_per_step"] == pytest.approx(0.1) and top[0]["calls_per_step"] == 1
    assert top[1]["category"] == "pointwise" and top[1]["ms_per_step"] == pytest.approx(0.03)
    assert "| triton_poi_fused_mul_silu_0 | pointwise | 0.03 | 1 |" in profile_train.top_kernels_text(top)
    events += [("memset", 400, 1)] * 6
    assert [row["name"] for row in profile_train.top_kernels(events, steps=2, count=1, by="calls")] == ["memset"]
    assert len(profile_train.top_kernels(events, steps=2, count=None)) == 4


def test_idle_gaps_split_long_from_short_and_name_the_kernels_around_the_longest():
    # Two steps: kernels back to back but for 5 us launch gaps, one 300 us gap before "optimizer_kernel" and
    # one 150 us gap after an overlapping pair (the busy stretch ends with the longer kernel, "gemm_long").
    events = [("a", 0, 10), ("b", 15, 10), ("c", 30, 10), ("optimizer_kernel", 340, 10), ("gemm_long", 355, 50),
              ("poi_short", 360, 5), ("next_step_first", 555, 10), ("d", 570, 10)]
    gaps = profile_train.idle_gaps(events, steps=2, longest=2)
    assert gaps["long_ms"] == pytest.approx((0.300 + 0.150) / 2) and gaps["long_count"] == 1
    assert gaps["short_ms"] == pytest.approx(4 * 0.005 / 2) and gaps["short_count"] == 2
    assert gaps["longest"] == [{"ms": pytest.approx(0.3), "before": "c", "after": "optimizer_kernel"},
                               {"ms": pytest.approx(0.15), "before": "gemm_long", "after": "next_step_first"}]
    text = profile_train.gaps_text(gaps)
    assert "0.23 ms in 1.0 gaps of >= 0.1 ms" in text and "0.30 ms after c before optimizer_kernel" in text


def test_trace_events_keep_device_kernels_or_else_top_level_operators():
    device_trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "nvjet_a", "ts": 5, "dur": 2},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 1, "dur": 1},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 0, "dur": 1},
    ]}
    assert sorted(profile_train.trace_events(device_trace)) == [("Memcpy HtoD", 1.0, 1.0), ("nvjet_a", 5.0, 2.0)]
    cpu_trace = {"traceEvents": [
        {"ph": "X", "cat": "cpu_op", "name": "aten::linear", "ts": 0, "dur": 10, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 2, "dur": 5, "tid": 1},  # inside linear
        {"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 12, "dur": 3, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mul", "ts": 3, "dur": 3, "tid": 2},  # another thread
    ]}
    assert [name for name, _, _ in profile_train.trace_events(cpu_trace)] == ["aten::linear", "aten::add", "aten::mul"]


def test_summary_refuses_an_empty_window():
    with pytest.raises(ValueError, match="steps"):
        profile_train.summarize([], wall_us=10, steps=0)


def test_model_flops_count_matches_the_issue_figures():
    # Issue 17: 49,663 tokens/s of the 1.24B shape is 39.3% MFU at 989 TFLOP/s.
    assert bench_train.mfu(bench_train.SHAPES["1b"], 2048, 49663) == pytest.approx(0.393, abs=0.001)
    # The 7B shape: 6 x 6.74B parameters minus the embedding lookup, plus attention at 2048 tokens.
    assert bench_train.flops_per_token(bench_train.SHAPES["7b"], 2048) == pytest.approx(4.09e10, rel=0.01)


def test_failure_names_the_exception_or_the_timeout():
    lines = ["Traceback (most recent call last):", '  File "x.py", line 3', "torch.OutOfMemoryError: CUDA out of memory"]
    assert bench_train.failure(1, lines, 60) == "torch.OutOfMemoryError: CUDA out of memory"
    assert bench_train.failure(None, lines, 60) == "killed after the piece's timeout of 60 s"
    assert bench_train.failure(3, ["done"], 60) == "exit status 3: done"
    distributed = ["[rank0]:     raise NotImplementedError(", "[rank0]: torch._dynamo.exc.ObservedNotImplementedError: "
                   "raised exception NotImplementedError('no backward on CPU')", "[rank0]:[W] process group not destroyed"]
    assert bench_train.failure(1, distributed, 60).startswith("torch._dynamo.exc.ObservedNotImplementedError: raised")


def test_a_path_past_its_timeout_is_killed_with_its_children():
    start = time.monotonic()
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
            "print('started', flush=True); time.sleep(60)"
    status, lines = bench_train.run_process([sys.executable, "-c", child], timeout=2)
    assert status is None and lines == ["started"]
    assert time.monotonic() - start < 20  # the grandchild held the output pipe: it was killed too


def test_a_path_stops_as_soon_as_what_the_bench_measures_is_written(tmp_path):
    """A forgather run's end of fit (last checkpoint, model export) is not waited for: once `finished()` holds,
    the run is stopped and counts as a success."""
    start = time.monotonic()
    marker = tmp_path / "measured"
    child = f"import pathlib, time; print('training', flush=True); pathlib.Path({str(marker)!r}).touch(); time.sleep(60)"
    status, lines = bench_train.run_process([sys.executable, "-c", child], timeout=60, finished=marker.is_file)
    assert status == 0 and lines[0] == "training"
    assert time.monotonic() - start < 20


@pytest.mark.slow  # 30 s: every path end to end with the profiler; the profile summary, timeouts and the
# measured marker have their own tests here
def test_smoke_run_on_cpu_gives_every_kind_of_row(tmp_path):
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_train.py"), "--shape", "tiny", "--device", "cpu", "--steps", "4",
         "--log-every", "2", "--paths", "hf", "hf-liger", "forgather", "--profile", "hf", "forgather",
         "--profile-steps", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = {r["name"]: r for r in json.loads((tmp_path / "results_tiny.json").read_text())}
    assert results["hf"]["tokens_per_s"] > 0 and results["forgather"]["tokens_per_s"] > 0
    for name in ("hf", "forgather"):
        profile = results[name]["profile"]
        assert profile["steps"] == 2 and profile["kernels"] > 0
        assert {row["category"] for row in profile["rows"]} >= {"matmul", "idle"}
    # liger-kernel is a GPU extra: here its row carries the error and the run went on.
    assert "liger_kernel" in results["hf-liger"]["error"]
    summary = (tmp_path / "summary_tiny.md").read_text()
    assert "| hf-liger |" in summary and "profile of forgather" in summary


def test_the_gpu_run_of_a_profiled_path_has_the_profile_callback(tmp_path):
    """trainer/gpu.yaml includes trainer/cpu.yaml, whose callbacks block a child of gpu.yaml cannot reach: the
    GPU command's config must still carry the profile callback, on a GPU trainer in pure bf16."""
    args = bench_train.parse_args(["--shape", "1b", "--profile", "forgather"])
    command = bench_train.forgather_command(args, bench_train.SHAPES["1b"], tmp_path, "forgather", [])
    config = subprocess.run([*command, "--cfg", "job"], capture_output=True, text=True, check=True).stdout
    assert "profile_train.py:ProfileSteps" in config
    # the bench's callbacks join the trainer's, none replacing one of them (a callback list is keyed by name)
    for callback in ("ModelCheckpoint", "JobControl", "collector:GarbageCollection", "CollectorTimes", "MarkMeasured"):
        assert callback in config, callback
    assert "accelerator: gpu" in config and "precision: bf16-true" in config


def test_sync_sites_count_where_the_host_waited_most_first():
    import warnings

    def warning(message, filename, lineno):
        return warnings.WarningMessage(message, UserWarning, filename, lineno)

    caught = [warning("called a synchronizing CUDA operation", "module.py", 133),
              warning("called a synchronizing CUDA operation", "loss.py", 40),
              warning("called a synchronizing CUDA operation", "module.py", 133),
              warning("some other warning", "module.py", 133),
              warning("Synchronization debug mode is a prototype feature and does not yet detect all synchronizing "
                      "operations", "cuda/__init__.py", 1270)]
    assert profile_train.sync_sites(caught) == [("module.py:133", 2), ("loss.py:40", 1)]


@pytest.mark.slow
def test_the_measured_marker_appears_when_every_timed_window_is_on_disk(tmp_path):
    """The bench stops a forgather run at MarkMeasured's marker: by then the loggers have written every timed
    throughput window (Lightning's CSV logger would otherwise hold them until step 100 or the end)."""
    args = bench_train.parse_args(["--device", "cpu", "--tiny", "--steps", "6", "--log-every", "2"])
    command = bench_train.forgather_command(args, bench_train.SHAPES["tiny"], tmp_path, "forgather", [])
    marker, seen = tmp_path / bench_train.MEASURED, []

    def finished() -> bool:
        if marker.is_file() and not seen:
            seen.append(bench_train.logged_rates(tmp_path))
        return bool(seen)

    status, _ = bench_train.run_process(command, timeout=300, finished=finished)
    assert status == 0 and seen, "no marker"
    assert len(seen[0]) >= args.steps // args.log_every


def test_mark_measured_has_the_loggers_write_before_the_marker_appears(tmp_path):
    marker, order = tmp_path / "measured", []

    class Logger:
        def save(self):
            order.append(("save", marker.exists()))

    trainer = type("Trainer", (), {"global_step": 7, "loggers": [Logger(), Logger()]})()
    callback = profile_train.MarkMeasured(step=8, output=str(marker))
    callback.on_train_batch_end(trainer, None, None, None, 0)
    assert not order and not marker.exists()  # not yet at its step
    trainer.global_step = 8
    callback.on_train_batch_end(trainer, None, None, None, 0)
    assert order == [("save", False), ("save", False)] and marker.exists()
    callback.on_train_batch_end(trainer, None, None, None, 0)
    assert len(order) == 2  # once


def test_a_variant_with_its_own_optimizer_drops_the_fused_adamw_flag(tmp_path):
    """`--variant sr optimizer=adamw_sr`: that run's config has our AdamW, without torch's `fused` argument
    (which it does not take), while the plain run has optimizer=adamw as a user's run does: TritonAdamW, not told
    to take torch's fused step."""
    args = bench_train.parse_args(["--shape", "1b"])
    configs = {}
    for name, overrides in (("forgather", []), ("sr", ["optimizer=adamw_sr"])):
        command = bench_train.forgather_command(args, bench_train.SHAPES["1b"], tmp_path / name, name, overrides)
        assert sum(part.startswith("optimizer=") for part in command) == 1
        configs[name] = subprocess.run([*command, "--cfg", "job"], capture_output=True, text=True, check=True).stdout
    optimizers = {name: re.search(r"^optimizer:\n((?:  .*\n)+)", config, re.M).group(1)
                  for name, config in configs.items()}
    assert "triton_adamw:TritonAdamW" in optimizers["forgather"] and "fused" not in optimizers["forgather"]
    assert "forgather.optim:AdamW" in optimizers["sr"] and "fused" not in optimizers["sr"]


def test_the_in_backward_adamw_variant_gets_torch_s_fused_kernel_inside_its_factory(tmp_path):
    args = bench_train.parse_args(["--shape", "1b"])
    command = bench_train.forgather_command(args, bench_train.SHAPES["1b"], tmp_path, "inbw",
                                            ["optimizer=adamw_in_backward"])
    config = subprocess.run([*command, "--cfg", "job"], capture_output=True, text=True, check=True).stdout
    optimizer = re.search(r"^optimizer:\n((?:  .*\n)+)", config, re.M).group(1)
    assert "in_backward:OptimizerInBackward" in optimizer and "overlap: true" in optimizer
    factory = optimizer[optimizer.index("optimizer_factory:"):]
    assert "torch.optim:AdamW" in factory and "fused: true" in factory


def test_profile_kernels_tabulates_an_ncu_log(tmp_path):
    """Nsight Compute's `--csv --page details` log (long format, one metric a line, a preamble before the header)
    becomes one row per kernel, longest first: durations in any unit as microseconds, thousands separators read,
    the stall metrics ranked."""
    profile_kernels = load_script("profile_kernels")
    header = ['"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
              '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"']

    def line(kernel_id, kernel, metric, unit, value):
        return (f'"{kernel_id}","1","python3","h","{kernel}","1","7","(128, 1, 1)","(4096, 1, 1)","0","9.0",'
                f'"section","{metric}","{unit}","{value}"')

    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    log = ["==PROF== Connected to process 1", *header,
           line(0, "short_kernel", "Duration", "ns", "45,100"),
           line(1, "_packed_attention_dkdv", "Duration", "us", "250.0"),
           line(1, "_packed_attention_dkdv", "Registers Per Thread", "register/thread", "246"),
           line(1, "_packed_attention_dkdv", "Grid Size", "", "1,024"),
           line(1, "_packed_attention_dkdv", "Achieved Occupancy", "%", "11.4"),
           line(1, "_packed_attention_dkdv", stall.format("wait"), "ratio", "1.5"),
           line(1, "_packed_attention_dkdv", stall.format("long_scoreboard"), "ratio", "0.4"),
           line(1, "_packed_attention_dkdv", stall.format("barrier"), "ratio", "0.9"),
           line(1, "_packed_attention_dkdv", stall.format("selected"), "ratio", "1.0")]
    path = tmp_path / "ncu.csv"
    path.write_text("\n".join(log))
    table = profile_kernels.summarize(str(path), top=5).splitlines()
    assert table[0].startswith("2 kernels, 295 us")
    rows = [row for row in table if row.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == ["_packed_attention_dkdv", "short_kernel"]
    cells = [cell.strip() for cell in rows[0].split("|")]
    assert cells[2:8] == ["250.0", "", "", "246", "1024", ""]
    assert cells[8] == "/ 11"
    assert cells[9] == "wait 1.5, selected 1.0, barrier 0.9"
    assert [cell.strip() for cell in rows[1].split("|")][2] == "45.1"


def test_packed_schedule_counts_each_program_s_tiles_and_replays_the_dispatch():
    """scripts/packed_schedule.py: the tiles each program of the packed kernels visits (against a loop over the
    documents), and list scheduling in which the order decides when a long program comes last."""
    import torch

    from forgather.models.attention import document_bounds

    schedule = load_script("packed_schedule")
    ids = torch.tensor([[0] * 40 + [1] * 3 + [2] * 21, [0] * 64])
    start, end = document_bounds(ids)
    work = schedule.query_block_work(start, 8, 16)
    for b in range(2):
        for block in range(8):
            first = int(start[b, block * 8]) // 16 * 16
            assert work[b, block] == len(range(first, block * 8 + 8, 16))
    work = schedule.key_block_work(end, 8, 16)
    for b in range(2):
        for block in range(4):
            last_key = block * 16 + 15
            assert work[b, block] == len(range(block * 16 // 8, -(-int(end[b, last_key]) // 8)))
    assert schedule.drain_time([3, 1, 1, 1], slots=2, overhead=0) == 3
    assert schedule.drain_time([1, 1, 1, 3], slots=2, overhead=0) == 4
    assert schedule.drain_time([1, 1], slots=2, overhead=0.5) == 1.5


def test_the_gpu_check_scripts_parse():
    for script in sorted(SCRIPTS.glob("gpu_check_*.sh")):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"


def test_every_script_compiles():
    """The scripts that only a GPU runs (check_packed_layouts.py, ...) at least parse and compile here."""
    scripts = sorted(SCRIPTS.glob("*.py"))
    assert len(scripts) > 10
    for script in scripts:
        compile(script.read_text(), str(script), "exec")


@pytest.mark.slow
def test_the_next_gpu_check_part_rehearses_on_a_cpu(tmp_path):
    """Device time is scarce: gpu_check_train.sh's newest part runs its every command on the CPU (REHEARSE=1:
    tiny dimensions, nothing installed; ~40 s), leaving a summary with a row for the default and for its variant.
    Run it before a device call: `pytest -m slow -k rehearses`."""
    env = {**os.environ, "REHEARSE": "1", "PY": sys.executable, "OUT": str(tmp_path)}
    result = subprocess.run(["bash", str(SCRIPTS / "gpu_check_train.sh"), "kv"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = (tmp_path / "summary_1b_kv.md").read_text()
    # every timed window and the garbage collector's passes after the first window in the forgather row's note
    assert re.search(r"^\| forgather \| \d+ .*windows [\d.]+k [\d.]+k.*; gc \d+ passes", summary, re.M), summary
    assert re.search(r"^\| fused-kv fused_projections=kv \| \d+ ", summary, re.M), summary


@pytest.mark.slow
def test_a_baseline_tree_runs_its_own_templates(tmp_path):
    """`BASELINE_TREE=DIR ... gpu_check_train.sh bar` times an older commit's default in the same call. The editable
    install maps forgather.conf onto this tree's conf/, so the baseline's code once ran with today's templates: a
    baseline whose llama template defaults fused_projections to 'marker' must fail on that value, its own."""
    if not (SCRIPTS.parent / ".git").exists():
        pytest.skip("needs the repository's git history (git archive)")
    tree = tmp_path / "old_tree"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(SCRIPTS.parent), "archive", "HEAD"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    llama = tree / "conf" / "model" / "llama.yaml"
    text = llama.read_text()
    assert "default('auto')" in text
    llama.write_text(text.replace("default('auto')", "default('marker')"))
    out = tmp_path / "out"
    env = {**os.environ, "REHEARSE": "1", "PY": sys.executable, "OUT": str(out), "BASELINE_TREE": str(tree)}
    result = subprocess.run(["bash", str(SCRIPTS / "gpu_check_train.sh"), "bar"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"^\| forgather \| \d+ ", (out / "summary_1b_bar.md").read_text(), re.M)
    baseline = (out / "summary_1b_baseline.md").read_text()
    assert re.search(r"^\| forgather \| .*ERROR.*fused_projections='marker'", baseline, re.M), baseline


def test_the_host_during_an_idle_gap_is_what_began_before_the_late_launch():
    """A kept trace (host activity recorded): the device idles 300 us before `first_norm`, whose launch came 280 us
    after the idle began; in between the host began `CompiledFunction` (with an operator nested inside, not counted
    twice) and `aten::embedding`; an operator of another thread, one before the gap and the short gap's are left out."""
    def x(cat, name, ts, dur, tid=1, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}

    trace = {"traceEvents": [
        x("kernel", "gather", 0, 100, tid=7, correlation=1),
        x("kernel", "first_norm", 400, 50, tid=7, correlation=2),
        x("kernel", "mm", 460, 10, tid=7, correlation=3),  # a 10 us launch gap: not a long one
        x("cuda_runtime", "cudaLaunchKernel", 10, 5, correlation=1),
        x("cuda_runtime", "cudaLaunchKernel", 380, 5, correlation=2),
        x("cpu_op", "aten::early", 50, 20),  # began before the device went idle
        x("cpu_op", "aten::embedding", 110, 40),
        x("user_annotation", "CompiledFunction", 160, 240),
        x("cpu_op", "aten::inner", 170, 30),  # inside CompiledFunction
        x("cpu_op", "aten::other_thread", 120, 100, tid=2),
    ]}
    (row,) = profile_train.host_during_gaps(trace)
    assert row["ms"] == pytest.approx(0.3) and row["after"] == "first_norm"
    assert row["launch_late_ms"] == pytest.approx(0.28)
    assert row["host"] == [("CompiledFunction", pytest.approx(0.22)), ("aten::embedding", pytest.approx(0.04))]
    text = profile_train.host_gaps_text([row])
    assert "0.30 ms before first_norm: launched 0.28 ms after the device went idle" in text
    assert "CompiledFunction 0.22" in text
    del trace["traceEvents"][3:5]  # no launches recorded: the gap alone
    assert profile_train.host_during_gaps(trace) == [{"ms": pytest.approx(0.3), "after": "first_norm"}]
    # with the window's markers around the later kernels only, the gap before first_norm is the warm-up's, not
    # the window's: the 10 us gap inside the window is all there is, and it is not a long one
    marker = profile_train.WINDOW_MARKER
    trace["traceEvents"] += [x("kernel", marker, 455, 1, tid=7), x("kernel", marker, 480, 1, tid=7)]
    assert profile_train.host_during_gaps(trace) == []


def test_host_lead_says_how_far_ahead_kernels_were_launched_and_how_long_the_host_waited():
    """Four kernels launched 10, 20, 300 and 400 us before they start; over 2 steps the host waited 600 us in a
    stream synchronize (then in the waits that close the window, not counted), and one launch (200 us) waited for room in a full queue, one (5 us) did not."""
    def x(cat, name, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 1, "args": args}

    trace = {"traceEvents": [
        *(x("kernel", f"k{i}", start, 5, correlation=i) for i, start in enumerate((100, 200, 600, 900))),
        x("cuda_runtime", "cudaLaunchKernel", 90, 5, correlation=0),
        x("cuda_runtime", "cudaLaunchKernel", 180, 5, correlation=1),
        x("cuda_runtime", "cuLaunchKernel", 300, 200, correlation=2),
        x("cuda_runtime", "cudaLaunchKernel", 500, 5, correlation=3),
        x("cuda_runtime", "cudaStreamSynchronize", 190, 600),
        x("cuda_runtime", "cudaMemcpyAsync", 960, 900),  # pinned: no wait counted
        x("cuda_runtime", "cudaEventSynchronize", 2000, 5000),  # after the last launch: closing the window
        x("cuda_runtime", "cudaDeviceSynchronize", 7000, 10),
    ]}
    lead = profile_train.host_lead(trace, steps=2)
    assert lead["launches"] == 4
    assert lead["lead_ms"] == {"p10": pytest.approx(0.01), "p50": pytest.approx(0.3), "p90": pytest.approx(0.4)}
    assert lead["wait_ms"] == pytest.approx(0.3) and lead["blocked_ms"] == pytest.approx(0.1)
    assert "0.01 / 0.30 / 0.40 ms" in profile_train.host_lead_text(lead)
    assert profile_train.host_lead({"traceEvents": trace["traceEvents"][:4]}, 2) == {}  # no launches recorded


def _a_function_in_a_cycle() -> None:
    def inner() -> None:
        pass

    inner.me = inner  # garbage that only a pass of the collector frees, named by its code


def test_collector_times_count_the_passes_between_its_steps_only(tmp_path):
    import gc

    output = tmp_path / "gc.json"
    callback = profile_train.CollectorTimes(first_step=2, last_step=4, output=str(output))
    trainer = type("Trainer", (), {"global_step": 1})()
    gc.collect()  # before its first step: not counted
    callback.on_train_batch_end(trainer, None, None, None, 0)
    trainer.global_step = 2
    callback.on_train_batch_end(trainer, None, None, None, 0)
    cycles = [[] for _ in range(50)]
    for cycle in cycles:
        cycle.append(cycle)  # 50 lists in reference cycles: garbage only a pass frees
    del cycles, cycle
    gc.collect()
    gc.collect(0)
    kept = [[i] for i in range(1000)]  # lists alive at the last step, in the young generations
    trainer.global_step = 3  # the last step's garbage is kept, to be named
    callback.on_train_batch_end(trainer, None, None, None, 0)
    assert gc.get_debug() & gc.DEBUG_SAVEALL

    for _ in range(7):
        _a_function_in_a_cycle()
        cycle = {}
        cycle["me"] = cycle
        del cycle
    gc.collect(0)
    trainer.global_step = 4
    callback.on_train_batch_end(trainer, None, None, None, 0)
    assert not gc.get_debug() & gc.DEBUG_SAVEALL and not gc.garbage  # the flags and gc.garbage as they were
    del kept
    gc.collect()  # after its last step: not counted
    written = json.loads(output.read_text())
    assert written["steps"] == 2
    assert written["collections"]["2"] == 1 and written["collections"]["0"] >= 1
    assert set(written["ms"]) == set(written["collections"]) and all(ms >= 0 for ms in written["ms"].values())
    assert all(step == 2 and ms >= callback.LONG_PASS_MS for step, _, ms in written["long"])  # passes of >= 10 ms
    assert set(written["by_step"]) == {"3", "4"} and sum(written["by_step"].values()) == sum(
        written["collections"].values())
    assert callback._pass not in gc.callbacks
    assert written["freed"] >= 50
    young = dict(written["young"])
    assert young.get("list", 0) >= 500 and len(written["young"]) <= callback.YOUNG_TYPES
    garbage = dict(written["garbage"])
    assert written["garbage_step"] == 4
    assert garbage["dict"] >= 7 and len(written["garbage"]) <= callback.YOUNG_TYPES
    assert garbage["function _a_function_in_a_cycle.<locals>.inner (test_bench_train.py:"
                   f"{_a_function_in_a_cycle.__code__.co_firstlineno + 1})"] == 7


def test_collector_times_name_the_garbage_of_the_step_it_is_given_only(tmp_path):
    import gc

    output = tmp_path / "gc.json"
    with pytest.raises(ValueError, match="garbage_step 4 is outside the measured steps 2..3"):
        profile_train.CollectorTimes(first_step=2, last_step=4, output=str(output), garbage_step=4)
    callback = profile_train.CollectorTimes(first_step=2, last_step=4, output=str(output), garbage_step=2)
    trainer = type("Trainer", (), {"global_step": 2})()
    callback.on_train_batch_end(trainer, None, None, None, 0)  # the window opens, and step 3's garbage is kept
    for _ in range(5):
        _a_function_in_a_cycle()
    gc.collect(0)
    trainer.global_step = 3
    callback.on_train_batch_end(trainer, None, None, None, 0)
    assert not gc.get_debug() & gc.DEBUG_SAVEALL
    for _ in range(3):  # step 4's: collected, not named
        _a_function_in_a_cycle()
    gc.collect(0)
    trainer.global_step = 4
    callback.on_train_batch_end(trainer, None, None, None, 0)
    written = json.loads(output.read_text())
    assert written["garbage_step"] == 3
    assert sum(count for what, count in written["garbage"] if "_a_function_in_a_cycle" in what) == 5


def test_garbage_is_named_without_asking_a_dead_proxy_for_its_class():
    import weakref

    class Referent:
        pass

    referent = Referent()
    proxy = weakref.proxy(referent)
    del referent  # what the collector had cleared when an H100 run's garbage held such a proxy
    with pytest.raises(ReferenceError):
        isinstance(proxy, types.FunctionType)
    assert profile_train.garbage_label(proxy) == "ProxyType"
    assert profile_train.garbage_label([]) == "list"
    code = _a_function_in_a_cycle.__code__
    label = f"code _a_function_in_a_cycle (test_bench_train.py:{code.co_firstlineno})"
    assert profile_train.garbage_label(code) == label


def test_a_forgather_row_notes_its_windows_and_the_collector():
    row = {"windows": [60_123.0, 75_000.0, 74_500.0],
           "gc": {"steps": 10, "collections": {"0": 3, "2": 1}, "ms": {"0": 1.0, "2": 49.0}, "long": [[6, 2, 49.0]]}}
    assert bench_train.window_note(row) == "windows 60.1k 75.0k 74.5k; gc 4 passes, 5.00 ms a step, 49 ms at step 7"
    assert bench_train.window_note({"windows": [1000.0]}) == "windows 1.0k"
    row["gc"].update(freed=12, young=[["tuple", 900], ["list", 40], ["dict", 7], ["cell", 1]])
    assert bench_train.window_note(row).endswith("49 ms at step 7, 12 freed, young tuple 900 list 40 dict 7")
    row["gc"]["garbage"] = [["dict", 40], ["function f (x.py:3)", 2]]
    row["gc"]["garbage_step"] = 59
    assert bench_train.window_note(row).endswith("dict 7; step 59's garbage: 40 dict, 2 function f (x.py:3)")


def test_profile_steps_warms_the_profiler_up_for_a_step_and_leaves_its_events_out(tmp_path):
    """The profiler starts one step before the window (its start would otherwise stall the window's first step):
    the warm-up step's operators (sin) are not in the summary, the profiled steps' (cos) are, and the window
    holds `steps` steps."""
    import torch

    output = tmp_path / "profile.json"
    callback = profile_train.ProfileSteps(first_step=3, steps=2, output=str(output), title="t")
    trainer = type("Trainer", (), {"global_step": 3})()
    module = type("Module", (), {"device": torch.device("cpu")})()
    x = torch.randn(64, 64)
    for work in (torch.sin, torch.cos, torch.cos):  # steps 4 (warm-up), 5 and 6
        callback.on_train_batch_start(trainer, module, None, 0)
        work(x @ x)
        trainer.global_step += 1
        callback.on_train_batch_end(trainer, module, None, None, 0)
        assert output.exists() == (trainer.global_step == 6)
    summary = json.loads(output.read_text())
    names = {row["name"] for row in summary["all_kernels"]}
    assert summary["steps"] == 2 and "aten::cos" in names and "aten::sin" not in names


def test_launch_sites_name_the_innermost_operator_around_each_launch_and_the_outermost():
    """Memsets attributed to the host operator that launched them (through the launch's correlation id): the
    innermost one open at the launch and the outermost around it, a step; those outside the markers left out."""
    def op(name, ts, dur, tid=1):
        return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid}

    def launch(correlation, ts, tid=1):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemsetAsync", "ts": ts, "dur": 1,
                "args": {"correlation": correlation}, "tid": tid}

    def device(name, correlation, ts, dur=2.0, cat="gpu_memset"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}

    marker = "at::cuda::(anonymous namespace)::spin_kernel(long)"
    trace = {"traceEvents": [
        op("CompiledFunctionBackward", 0, 100), op("aten::zero_", 10, 5), op("aten::fill_", 11, 3),
        op("aten::zero_", 40, 5), op("Optimizer.step", 200, 50), op("aten::zeros", 210, 5),
        launch(1, 12), launch(2, 41), launch(3, 211), launch(4, 150), launch(5, 300),
        device(marker, 90, 5, 1, "kernel"), device("Memset (Device)", 1, 20), device("Memset (Device)", 2, 50),
        device("Memset (Device)", 3, 260, 4.0), device("Memset (Device)", 4, 270),
        device(marker, 91, 400, 1, "kernel"), device("Memset (Device)", 5, 410)]}
    rows = profile_train.launch_sites(trace, steps=1)
    assert rows == [
        {"op": "aten::fill_", "within": "CompiledFunctionBackward", "calls": 1.0, "ms": 0.002},
        {"op": "aten::zero_", "within": "CompiledFunctionBackward", "calls": 1.0, "ms": 0.002},
        {"op": "aten::zeros", "within": "Optimizer.step", "calls": 1.0, "ms": 0.004},
        {"op": "(no operator)", "within": "(no operator)", "calls": 1.0, "ms": 0.002},
    ]
    assert "who launched the Memset events" in profile_train.launch_sites_text(rows)


def test_window_events_keep_the_kernels_between_the_two_markers():
    """The warm-up step's last kernels run after the profiler began recording; the window is what runs between
    the marker kernels StepProfiler launches at its two ends (the markers left out); a trace without two markers
    (the CPU's) is kept whole."""
    marker = "at::cuda::(anonymous namespace)::spin_kernel(long)"
    events = [("warm-up tail", 0.0, 5.0), (marker, 5.0, 1.0), ("gemm a", 6.0, 10.0), ("gemm b", 16.0, 4.0),
              (marker, 20.0, 1.0), ("after", 21.0, 3.0)]
    assert profile_train.window_events(events) == ([("gemm a", 6.0, 10.0), ("gemm b", 16.0, 4.0)], True)
    assert profile_train.window_events(events[:2] + events[2:4]) == (events[:2] + events[2:4], False)


def test_step_profiler_profile_runs_one_warm_up_step_outside_the_window():
    """StepProfiler.profile(step, steps): `steps` + 1 calls, the first one's operators (sin) left out."""
    import torch

    calls = []
    x = torch.randn(64, 64)

    def step():
        calls.append((torch.cos if calls else torch.sin)(x @ x))

    summary = profile_train.StepProfiler("cpu", "t").profile(step, 2)
    names = {row["name"] for row in summary["all_kernels"]}
    assert len(calls) == 3 and summary["steps"] == 2 and "aten::cos" in names and "aten::sin" not in names
    assert summary["wall_ms_per_step"] > 0


def test_check_step_profiler_times_and_profiles_a_step_on_the_cpu():
    """scripts/check_step_profiler.py end to end on the CPU (on a GPU it also fails when the two disagree)."""
    run = subprocess.run([sys.executable, str(SCRIPTS / "check_step_profiler.py"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    match = re.search(r"timed ([\d.]+) ms a step, profiled ([\d.]+) \(([\d.]+)x\), (\d+) kernels", run.stdout)
    assert match and float(match[1]) > 0 and float(match[2]) > 0 and int(match[4]) > 0, run.stdout[-2000:]
    assert "| matmul |" in run.stdout


def test_a_variants_env_items_reach_its_run_only():
    """`--variant NAME env:NAME=VALUE OVERRIDE...`: the env items are the run's environment, not overrides."""
    env, overrides = bench_train.variant_environment(["env:CUBLAS_WORKSPACE_CONFIG=:0:0", "fused_projections=kv"])
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":0:0"} and overrides == ["fused_projections=kv"]
    with pytest.raises(SystemExit, match="env:NAME=VALUE"):
        bench_train.variant_environment(["env:NOVALUE"])
    status, lines = bench_train.run_process(
        [sys.executable, "-c", "import os; print('seen', os.environ.get('FG_BENCH_PROBE'))"], 60,
        env={"FG_BENCH_PROBE": "x=1"})
    assert status == 0 and any(line.strip() == "seen x=1" for line in lines), lines
    status, lines = bench_train.run_process(
        [sys.executable, "-c", "import os; print('seen', os.environ.get('FG_BENCH_PROBE'))"], 60)
    assert any(line.strip() == "seen None" for line in lines), lines


def test_clock_samples_are_summarized_under_load_with_the_power_caps_share():
    """`--clocks`: nvidia-smi's rows (SM MHz, power W, limit W, the power cap's state) -> medians over the samples
    drawing more than half the limit (compiling and loading left out); rows it could not read are skipped."""
    lines = ["345, 70.3, 700.00, Not Active",  # idle, before the run's steps
             "1650, 690.1, 700.00, Active", "1680, 695.0, 700.00, Active", "1980, 400.0, 700.00, Not Active",
             "[N/A], [N/A], 700.00, Not Active", "1700, 6"]
    clocks = bench_train.clock_summary(lines)
    assert clocks == {"sm_mhz": 1680.0, "power_w": 690.1, "power_limit_w": 700.0, "samples": 3,
                      "power_capped": pytest.approx(2 / 3)}
    assert bench_train.clock_note(clocks) == "SM 1680 MHz, 690 of 700 W (3 samples under load, power cap 67% of them)"
    assert bench_train.clock_note(clocks, 69010.0) == ("SM 1680 MHz, 690 of 700 W, 10.00 mJ a token (3 samples under "
                                                       "load, power cap 67% of them)")
    without_cap = bench_train.clock_summary(["1500.0, 500.0, 700.0"])
    assert without_cap["power_capped"] is None and "power cap" not in bench_train.clock_note(without_cap)
    assert bench_train.clock_summary(["345, 70.3, 700.00"]) is None  # never under load: no summary
