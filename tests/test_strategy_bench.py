"""scripts/bench_pipeline.py end to end in its dry CPU mode (gloo, tiny model): all three runs finish and
report a positive throughput, so the GPU run only needs the GPUs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_pipeline.py"


@pytest.mark.slow  # three trainings of two processes each
def test_bench_pipeline_dry_run_measures_all_three_runs(tmp_path):
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    assert result["microbatches"] == 4
    assert all(result[name] > 0 for name in ("one GPU", "hand-written", "strategy"))
    assert "vs one GPU" in run.stdout
