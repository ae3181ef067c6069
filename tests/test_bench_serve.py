"""scripts/bench_serve.py on the CPU with its tiny shape: every kind of row comes out (HF generate, the engine
for both model kinds with the fused decoder, the HTTP server driven from several client processes), so the
GPU run of the script is not where a mistake in it shows first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_serve.py"
VARIANTS = ("default", "matmul", "sdpa", "reduce", "cublas", "fused", "skinny", "fused_all", "pdl_end", "fused_down_end",
            "nopdl", "fused_nopdl", "serial", "modules", "sampled")


def test_bench_serve_gives_every_row_on_the_cpu(tmp_path):
    rows_file = tmp_path / "rows.json"
    subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--skip-7b", "--prompt", "4", "--tokens", "8",
                    "--concurrency", "1", "3", "--streams-per-client", "2", "--json", str(rows_file),
                    # every variant but prefill_compiled (minutes of compiling on a CPU; its own test is slow)
                    "--variants", *(name for name in VARIANTS if name != "prefill_compiled")],
                   check=True, capture_output=True, text=True, timeout=600)
    rows = {row["name"]: row for row in json.loads(rows_file.read_text())}
    assert rows["hf eager"]["tokens_per_s"] > 0
    for name in ("engine hf-llama", "engine forgather"):
        assert rows[name]["fused"] and rows[name]["same_argmax"] and rows[name]["logit_error"] < 0.05
    assert rows["engine hf-llama"]["itl_max_ms"] >= rows["engine hf-llama"]["itl_p99_ms"]
    assert rows["engine hf-llama"]["gc_ms"] >= rows["engine hf-llama"]["gc_longest_ms"] >= 0
    assert rows["engine hf-llama, the model's modules"]["fused"] is False
    assert rows["engine hf-llama, reduce attention"]["same_argmax"] and rows["engine hf-llama, no lookahead"]["fused"]
    for name in ("engine hf-llama burst 3", "engine hf-llama burst 3 again"):
        assert rows[name]["ttft_max_ms"] >= rows[name]["ttft_ms"] > 0 and rows[name]["tokens_per_s"] > 0
    sampled = "engine hf-llama, sampled (temperature 0.7, top-p 0.9)"
    assert rows[sampled]["tokens_per_s"] > 0 and rows[f"{sampled} burst 8"]["tokens_per_s"] > 0
    assert rows["engine hf-llama, no PDL"]["pdl"] is False
    assert rows["engine hf-llama, down product ours (split-K), PDL trigger at the end"]["matmul"] == "fused_down"
    assert rows["http 3 streams"]["client_processes"] == 2  # 2 + 1 streams
    assert rows["http 3 streams"]["tokens_per_chunk"] >= 1 and rows["http 1 streams"]["tokens_per_s"] > 0


def test_every_variant_sets_engine_options_and_decode_settings_that_exist():
    """The variants whose settings change nothing on a CPU (PDL, the attention's split, the tuner) are not run by
    the CPU test above; their names are checked here: each setting is a decode_attention attribute, each option
    an Engine argument (or the bench's own `bursts` and `sampling`)."""
    import inspect

    from forgather.serve import decode_attention
    from forgather.serve.engine import Engine

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_serve
    finally:
        sys.path.remove(str(SCRIPT.parent))
    engine_options = set(inspect.signature(Engine).parameters) | {"settings", "bursts", "sampling"}
    for name, (_, options) in bench_serve.VARIANTS.items():
        assert set(options) <= engine_options, name
        for setting in options.get("settings", {}):
            assert hasattr(decode_attention, setting), (name, setting)


def test_each_further_server_runs_the_http_rows_again_under_its_own_name(monkeypatch):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_serve
    finally:
        sys.path.remove(str(SCRIPT.parent))
    servers = []
    monkeypatch.setattr(bench_serve, "_bench_http", lambda *args: servers.append(args[-2:]))
    bench_serve.bench_http(Path("model"), [1, 2], 8, [1, 32], 4, ["default", "http=h11,switch-interval=0.005"])
    assert servers == [([], ""), (["--http", "h11", "--switch-interval", "0.005"],
                                  ", server http=h11,switch-interval=0.005")]


def test_the_profile_finds_the_step_graph_of_engines_before_and_after_the_turns():
    """profile_step's graph at a batch size and the shortest window, whether the engine keys its graphs by
    (batch, window) or by (batch, window, turn): gpu_check_serve.sh's `versus` runs this bench against an older
    engine."""
    from types import SimpleNamespace

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_serve
    finally:
        sys.path.remove(str(SCRIPT.parent))
    older = SimpleNamespace(key_buckets=[256, 512], graphs={(1, 512): ("g512", "in", "out"), (1, 256): ("g256", "in", "out")})
    newer = SimpleNamespace(key_buckets=[256, 512], graphs={(4, 256, 0): ("g4", "out"), (1, 256, 1): ("t1", "out"),
                                                            (1, 256, 0): ("t0", "out")})
    assert bench_serve._graph(older, 1) == "g256"
    assert bench_serve._graph(newer, 1) in ("t0", "t1") and bench_serve._graph(newer, 4) == "g4"
