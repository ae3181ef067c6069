"""`sweeper=basic` (the default): every combination of the swept values, `a=1,2`, `a=range(1,4)`,
`a=choice(x,y)`, `group=glob(ada*)`, in command-line order (Hydra's basic sweeper).

Paired axes (what Hydra lacks, hydra issue #1918): `sweeper.paired=[lr,warmup_steps]` sweeps the listed keys
together, the i-th value of each in the i-th point, instead of as a product; the axes stay ordinary Hydra
sweeps (`lr=1e-3,3e-4 warmup_steps=100,200` gives 2 points, not 4). Several groups: `[[a,b],[c,d]]`. The
paired axes must have as many values each.

Search-space grammar (`interval()`, `tag(log, ...)`) belongs to `sweeper=optuna`: here it is an error.
"""

from __future__ import annotations

import itertools

from forgather import overrides as ovr
from forgather.launch.base import Outcome
from forgather.launch.sweep import Plan, SweepContext, Sweeper


def search_space_overrides(arguments: list[str]) -> list[str]:
    """The overrides among `arguments` that describe a search space (interval(), or tagged sweeps)."""
    from hydra.core.override_parser.types import IntervalSweep, Sweep

    from forgather.overrides import parse_hydra

    found = []
    for item in parse_hydra(arguments):
        value = item.value()
        if isinstance(value, IntervalSweep) or (isinstance(value, Sweep) and value.tags):
            found.append(item.input_line)
    return found


class BasicSweeper(Sweeper):
    def __init__(self, paired: list | None = None) -> None:
        if isinstance(paired, str):  # list("lr") would pair the keys l and r
            raise ovr.OverrideError(f"sweeper.paired={paired}: name the keys swept together in a list, e.g. sweeper.paired=[lr,warmup_steps]")
        paired = list(paired or [])
        self.paired: list[list[str]] = [list(group) for group in paired] if paired and isinstance(paired[0], list) else ([paired] if paired else [])

    def plan(self, arguments: list[str], groups: dict[str, list[str]]) -> list[Plan]:
        spaces = search_space_overrides(arguments)
        if spaces:
            raise ovr.OverrideError(f"{spaces[0]}: interval() and tag() describe a search space, which the basic sweeper cannot enumerate: add sweeper=optuna")
        axes = [[point[0] for point in ovr.parse([argument], groups, multirun=True)] for argument in arguments]
        keys = [axis[0].key for axis in axes]
        for key in dict.fromkeys(keys):  # a second axis of one key would repeat every point under the first's values
            given = [argument for argument, k in zip(arguments, keys) if k == key]
            if len(given) > 1 and any(len(axis) > 1 for axis, k in zip(axes, keys) if k == key):
                raise ovr.OverrideError(f"{key} is swept twice ({' and '.join(given)}) ; give all its values in one override ({key}=a,b,c)")
        for group in self.paired:
            missing = [key for key in group if key not in keys or len(axes[keys.index(key)]) < 2]
            if missing:
                raise ovr.OverrideError(f"sweeper.paired names {', '.join(missing)}, which the command line does not sweep: give each paired key several values (key=a,b)")
            lengths = {key: len(axes[keys.index(key)]) for key in group}
            if len(set(lengths.values())) > 1:
                counts = ", ".join(f"{key} has {n}" for key, n in lengths.items())
                raise ovr.OverrideError(f"sweeper.paired=[{','.join(group)}]: paired axes need as many values each ({counts})")
        # Each factor of the product is a tuple of axes that move together: one axis, or a paired group.
        factors: list[list[tuple[ovr.Override, ...]]] = []
        placed: set[str] = set()
        for key, axis in zip(keys, axes):
            group = next((g for g in self.paired if key in g), None)
            if group is None:
                factors.append([(value,) for value in axis])
            elif key not in placed:
                placed.update(group)
                factors.append(list(zip(*(axes[keys.index(k)] for k in group))))
        swept = {key for key, axis in zip(keys, axes) if len(axis) > 1}
        plans = []
        for number, combination in enumerate(itertools.product(*factors)):
            point = [override for factor in combination for override in factor]
            label = " ".join(f"{o.key}={o.value}" for o in point if o.key in swept)
            plans.append(Plan(number, label, point))
        return plans

    def run(self, context: SweepContext) -> list[Outcome]:
        plans = self.plan(context.arguments, context.groups)
        for plan in plans:  # every point's overrides are checked before the first starts
            context.check(plan.point)
        return context.launch(plans)
