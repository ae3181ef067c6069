"""forgather.serve.tuning: a decode product's tiling chosen by timing each candidate over copies of its weight
(the GPU timing itself runs in tests/gpu/ and scripts/bench_serve.py; here a stand-in timer)."""

from __future__ import annotations

import pytest
import torch

from forgather.serve import decode_attention as da
from forgather.serve import tuning


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(tuning, "_CHOSEN", {})


def test_the_fastest_candidate_is_chosen_once_per_key_and_failing_ones_are_skipped():
    speeds = {16: 9.0, 32: 4.0, 64: 6.0}
    timed, launched = [], []

    def timer(step):
        launched.clear()
        step()
        candidate = launched[0][0]
        timed.append(candidate)
        if candidate == 128:
            raise RuntimeError("out of resource: shared memory")
        return speeds[candidate] * len(launched)  # a pass over the copies: one launch each

    candidates = [dict(BLOCK_N=n) for n in (16, 128, 32, 64)]
    run = lambda tiling, i: launched.append((tiling["BLOCK_N"], i))  # noqa: E731
    assert tuning.choose("k", candidates, run, copies=3, timer=timer) == dict(BLOCK_N=32)
    assert timed == [16, 128, 32, 64]
    assert tuning.chosen()["k"] == (dict(BLOCK_N=32), 4.0)  # microseconds a launch, not a pass
    assert tuning.choose("k", candidates, run, copies=3, timer=timer) == dict(BLOCK_N=32)
    assert len(timed) == 4  # remembered: not timed again
    assert tuning.choose("other", candidates[2:], run, copies=1, timer=timer) == dict(BLOCK_N=32)


def test_a_product_none_of_whose_tilings_runs_is_an_error_naming_it():
    def timer(step):
        raise RuntimeError("PassManager::run failed")

    with pytest.raises(RuntimeError, match=r"\('skinny', \(8, 4\)\).*PassManager::run failed"):
        tuning.choose(("skinny", (8, 4)), [dict(BLOCK_N=16)], lambda tiling, i: None, copies=1, timer=timer)


def test_copies_outgrow_the_l2_cache_twice_within_bounds():
    assert tuning.copies_for(12 << 20, 50 << 20) == 9  # the 1.24B q/k/v product: 12 MiB x 9 >= 100 MiB
    assert tuning.copies_for(64 << 20, 50 << 20) == 2
    assert tuning.copies_for(1 << 30, 50 << 20) == 1
    assert tuning.copies_for(1, 50 << 20) == tuning.MOST_COPIES


@pytest.mark.parametrize("norm", [False, True])
def test_the_graph_tuner_times_each_launch_on_its_own_copy_and_splits_k_only_without_the_norm(monkeypatch, norm):
    seen = {}

    def choose(key, candidates, run, copies):
        seen.update(key=key, candidates=candidates, copies=copies)
        for i in range(copies):
            run(candidates[0], i)
        return candidates[-1]

    launches = []
    monkeypatch.setattr(tuning, "choose", choose)
    monkeypatch.setattr(tuning, "l2_bytes", lambda device: 4 * 64 * 2 * 5)  # five weights' worth of "L2"
    monkeypatch.setattr(da, "launch_skinny", lambda x, weight, *args, **kwargs: launches.append(
        (weight.data_ptr(), kwargs["config"], kwargs["release_late"])))
    x, weight = torch.randn(1, 64), torch.randn(4, 64, dtype=torch.bfloat16)
    delta, norm_weight = (torch.randn(1, 64), torch.ones(64)) if norm else (None, None)
    tiling = da._graph_tuned(x, weight, None, delta, norm_weight, 1e-5, False, True)
    assert seen["copies"] == 10
    assert len({pointer for pointer, _, _ in launches}) == 10 and launches[0][0] == weight.data_ptr()
    assert all(late for _, _, late in launches)
    assert any("SPLIT_K" in t for t in seen["candidates"]) is not norm
    assert tiling == seen["candidates"][-1]
    assert seen["key"][1:3] == ((4, 64), torch.bfloat16) and seen["key"][4] is norm


def test_a_product_already_chosen_copies_no_weight(monkeypatch):
    # _graph_tuned runs on every launch, also while the decode step's CUDA graph is captured: a copy made
    # there would join the graph and run on every step (it made the graph-tuned engine 2.4x slower on an H200).
    monkeypatch.setattr(tuning, "_CHOSEN", {})
    monkeypatch.setattr(tuning, "l2_bytes", lambda device: 4 * 64 * 2 * 5)
    monkeypatch.setattr(da, "launch_skinny", lambda *args, **kwargs: None)
    clones = []
    real_clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda self, *a, **k: clones.append(1) or real_clone(self, *a, **k))
    original_choose = tuning.choose
    monkeypatch.setattr(tuning, "choose", lambda key, candidates, run, copies: original_choose(
        key, candidates, run, copies, timer=lambda step: (step(), 1.0)[1]))
    x, weight = torch.randn(1, 64), torch.randn(4, 64, dtype=torch.bfloat16)
    first = da._graph_tuned(x, weight, None, None, None, 0.0, False, False)
    assert len(clones) == 9  # ten copies in all for the first choice
    assert da._graph_tuned(x, weight, None, None, None, 0.0, False, False) == first
    assert len(clones) == 9


def test_an_unknown_tuner_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setattr(da, "TUNER", "autotune")
    with pytest.raises(ValueError, match="'triton' or 'graph'"):
        da.launch_skinny(torch.randn(1, 8), torch.randn(4, 8), None)
