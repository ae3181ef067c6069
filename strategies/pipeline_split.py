"""Where a layer stack is cut into pipeline stages, and which rank runs which stage.

`stage_layer_ranges(num_layers, num_stages, split_points=None, head_cost=0.0)` returns one `range` of layer
indices per stage. Explicit `split_points` are the first layer of every stage after the first (so `[2]` cuts
4 layers into 0-1 | 2-3). Without them the cut minimizes the most expensive stage, counting each layer as 1
and the last stage's output head (plus loss) as `head_cost` layers: a 128k-vocabulary head costs several
layers, and an even cut by layer count would leave the last stage the bottleneck.

`stage_indices(rank, pp_size, stages_per_rank, style)` lists the stages one rank holds: "loop" puts stage s on
rank s % pp_size (GPipe, 1F1B, Interleaved1F1B, InterleavedZeroBubble); "v" folds the stages back (rank r
holds r and 2 * pp_size - 1 - r), the placement that ZBVZeroBubble and DualPipeV expect.
"""

from __future__ import annotations

from functools import lru_cache


def stage_layer_ranges(
    num_layers: int, num_stages: int, split_points: list[int] | None = None, head_cost: float = 0.0
) -> list[range]:
    """Contiguous layer ranges, one per stage, covering 0..num_layers-1 in order."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be at least 1, got {num_stages}")
    if split_points is None:
        split_points = balanced_split_points(num_layers, num_stages, head_cost)
    _check_split_points(list(split_points), num_layers, num_stages)
    bounds = [0, *split_points, num_layers]
    return [range(start, stop) for start, stop in zip(bounds, bounds[1:])]


def _check_split_points(split_points: list[int], num_layers: int, num_stages: int) -> None:
    where = f"split_points={split_points} (config value `split_points`)"
    if len(split_points) != num_stages - 1:
        raise ValueError(
            f"{where} gives {len(split_points) + 1} stages, but the pipeline has {num_stages}; "
            f"give {num_stages - 1} layer indices (the first layer of each stage after the first), or null to balance"
        )
    if not all(isinstance(point, int) and not isinstance(point, bool) for point in split_points):
        raise ValueError(f"{where} must be layer indices (whole numbers): N for the stage that starts at layer "
                         "N, not a module name such as 'layers.N'")
    missing = [point for point in split_points if not 0 <= point < num_layers]
    if missing:
        raise ValueError(
            f"{where} names layer {missing[0]}, but the model's layers are 0..{num_layers - 1}; "
            f"give indices within 1..{num_layers - 1}"
        )
    bounds = [0, *split_points, num_layers]
    if any(start >= stop for start, stop in zip(bounds, bounds[1:])):
        raise ValueError(
            f"{where} must increase strictly within 1..{num_layers - 1} "
            f"(every stage of the {num_layers}-layer stack needs at least one layer)"
        )


def balanced_split_points(num_layers: int, num_stages: int, head_cost: float = 0.0) -> list[int]:
    """Cut points minimizing the largest stage cost (layers cost 1, the last stage adds `head_cost`)."""
    if num_stages > num_layers:
        raise ValueError(f"{num_layers} layers cannot fill {num_stages} stages (at least one layer a stage)")

    @lru_cache(maxsize=None)
    def best(start: int, stages: int) -> tuple[float, tuple[int, ...]]:
        """(largest stage cost, cut points) for layers start.. split into `stages` stages."""
        if stages == 1:
            return num_layers - start + head_cost, ()
        options = []
        for stop in range(start + 1, num_layers - stages + 2):
            rest_cost, rest_cuts = best(stop, stages - 1)
            options.append((max(stop - start, rest_cost), (stop, *rest_cuts)))
        return min(options)

    return list(best(0, num_stages)[1])


def stage_indices(rank: int, pp_size: int, stages_per_rank: int, style: str = "loop") -> list[int]:
    """The stage indices `rank` holds, in increasing order."""
    if style == "loop":
        return [rank + round_ * pp_size for round_ in range(stages_per_rank)]
    if style == "v":
        if stages_per_rank != 2:
            raise ValueError(f"the V placement needs exactly 2 stages per rank, got {stages_per_rank}")
        return [rank, 2 * pp_size - 1 - rank]
    raise ValueError(f"unknown stage placement {style!r}; use 'loop' or 'v'")


def stage_rank(stage: int, pp_size: int, stages_per_rank: int, style: str = "loop") -> int:
    """The rank (within the pipeline group) that holds `stage`."""
    for rank in range(pp_size):
        if stage in stage_indices(rank, pp_size, stages_per_rank, style):
            return rank
    raise ValueError(f"stage {stage} is outside a pipeline of {pp_size * stages_per_rank} stages")
