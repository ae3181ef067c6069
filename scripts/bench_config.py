"""Benchmark the configuration pipeline against Hydra, side by side, in one run (CPU).

Measures
  1. `forgather --help` wall time (fresh interpreter, median of runs);
  2. pp + construct of a 5-level inheritance chain (templates -> YAML -> graph -> config -> objects) with
     a fresh template environment per iteration;
  3. Hydra compose + instantiate of the equivalent config: a 5-level defaults chain, same objects.
Both build a model (Sequential of Linear layers) and an AdamW over its parameters. Prints a table and the ratio.

    .venv/bin/python scripts/bench_config.py [--iterations 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

LEVELS = 5


def write_forgather_chain(root: str) -> None:
    os.makedirs(os.path.join(root, "templates", "configs"))
    with open(os.path.join(root, "meta.yaml"), "w") as file:
        file.write("name: bench\n")
    base = (
        "[model]\n"
        "model: &model !singleton:torch.nn:Sequential@model\n"
        "    - !singleton:torch.nn:Linear [{{ width | default(16) }}, 32]\n"
        "    - !singleton:torch.nn:ReLU []\n"
        "    - !singleton:torch.nn:Linear [32, 4]\n"
        "[optimizer]\n"
        "optimizer: !call:torch.optim:AdamW\n"
        "    params: !call:torch.nn.Module.parameters [*model]\n"
        "    [optimizer_args]\n"
        "    lr: 1.0e-3\n"
    )
    with open(os.path.join(root, "templates", "level0.yaml"), "w") as file:
        file.write(base)
    for level in range(1, LEVELS):
        parent = f"level{level - 1}.yaml"
        with open(os.path.join(root, "templates", f"level{level}.yaml"), "w") as file:
            file.write(f"-- extends '{parent}'\n[optimizer_args]\n    lr: {level}.0e-3\n    weight_decay: 0.0{level}\n")
    with open(os.path.join(root, "templates", "configs", "bench.yaml"), "w") as file:
        file.write(f"-- extends 'level{LEVELS - 1}.yaml'\n")


def write_hydra_chain(root: str) -> None:
    os.makedirs(root)
    base = (
        "model:\n  _target_: torch.nn.Sequential\n  _args_:\n"
        "    - {_target_: torch.nn.Linear, in_features: 16, out_features: 32}\n"
        "    - {_target_: torch.nn.ReLU}\n"
        "    - {_target_: torch.nn.Linear, in_features: 32, out_features: 4}\n"
        "optimizer:\n  _target_: torch.optim.AdamW\n  _partial_: true\n  lr: 1.0e-3\n"
    )
    with open(os.path.join(root, "level0.yaml"), "w") as file:
        file.write(base)
    for level in range(1, LEVELS):
        with open(os.path.join(root, f"level{level}.yaml"), "w") as file:
            file.write(f"defaults:\n  - level{level - 1}\n  - _self_\noptimizer:\n  lr: {level}.0e-3\n  weight_decay: 0.0{level}\n")
    with open(os.path.join(root, f"level{LEVELS}.yaml"), "w") as file:  # the experiment: inherits only
        file.write(f"defaults:\n  - level{LEVELS - 1}\n  - _self_\n")


def time_forgather(root: str, iterations: int) -> tuple[list[float], object]:
    from forgather.project import Project

    project = Project.load(root)
    times, built = [], None
    for _ in range(iterations):
        start = time.perf_counter()
        built = project.load_config("bench.yaml").construct()
        times.append(time.perf_counter() - start)
    return times, built


def time_hydra(root: str, iterations: int) -> tuple[list[float], object]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    times, built = [], None
    for _ in range(iterations):
        start = time.perf_counter()
        with initialize_config_dir(config_dir=root, version_base=None):
            config = compose(config_name=f"level{LEVELS}")
        model = instantiate(config.model)
        built = {"model": model, "optimizer": instantiate(config.optimizer)(model.parameters())}
        times.append(time.perf_counter() - start)
        GlobalHydra.instance().clear()
    return times, built


def time_help(runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "forgather", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=50)
    args = parser.parse_args()
    import torch  # noqa: F401  (imported up front so neither side pays for it)

    with tempfile.TemporaryDirectory() as tmp:
        write_forgather_chain(os.path.join(tmp, "fg"))
        write_hydra_chain(os.path.join(tmp, "hydra"))
        time_forgather(os.path.join(tmp, "fg"), 3)  # warm imports
        time_hydra(os.path.join(tmp, "hydra"), 3)
        fg_times, fg_built = time_forgather(os.path.join(tmp, "fg"), args.iterations)
        hy_times, hy_built = time_hydra(os.path.join(tmp, "hydra"), args.iterations)
    for key in ("lr", "weight_decay"):
        assert fg_built["optimizer"].defaults[key] == hy_built["optimizer"].defaults[key]
    for built in (fg_built, hy_built):
        assert [p.shape for p in built["optimizer"].param_groups[0]["params"]] == [p.shape for p in built["model"].parameters()]
    help_times = time_help(7)
    fg, hy, help_s = statistics.median(fg_times), statistics.median(hy_times), statistics.median(help_times)
    print(f"{'measure':<46} {'median':>10}")
    print(f"{'forgather --help (fresh interpreter)':<46} {help_s * 1e3:>8.1f} ms")
    print(f"{'forgather pp+construct, 5-level chain':<46} {fg * 1e3:>8.2f} ms")
    print(f"{'Hydra compose+instantiate, 5-level chain':<46} {hy * 1e3:>8.2f} ms")
    print(f"ratio forgather / Hydra: {fg / hy:.3f}x   (bar: <= 0.2x; --help bar: < 300 ms)")


if __name__ == "__main__":
    main()
