"""`PipelineRuntime`: one rank's share of a pipelined model and the torch.distributed.pipelining schedule.

Plain torch, no Lightning: the Lightning strategy (pipeline.py) and the benchmark both drive it.
Built on every rank of a 2-D device mesh ("pp", "dp"): pipeline stages along "pp", replicas along "dp".
Construction cuts the model (pipeline_stages.py), prunes it in place to this rank's stages, and builds the
schedule; move the model to its device afterwards.

`step(batch)` runs forward and backward of every microbatch and returns the batch loss on every rank of the
pipeline (computed on the last stage, broadcast). The loss of microbatch m enters as
`mean_m * count_m / count_batch` (count: the terms a loss averages, e.g. target tokens) with the schedule's
own 1/n_microbatches scaling off, so loss and gradients equal those of the whole batch run at once, even when
padding leaves microbatches with different token counts. Afterwards the gradients of a tied head are summed
between the first and last stages, and all gradients are averaged over the replicas. `step(batch, scale)`
divides by `scale` instead of count_batch: an accumulation window gives all its batches one scale and, at its
end, `scale_grads` by scale x replicas over the window's counts on all replicas (`replica_sum`), which makes the
step's gradient the mean over every term of the window on every replica, as CausalLMModule's is on one
process or under DDP. A batch's rows must
divide by n_microbatches; a batch of other shapes than the one before gets a new schedule (torch's stages keep
the shapes of their first step).
`evaluate(batch)` runs forward only and returns the batch loss. `grad_norm()` and `clip_grad_norm_()` see
the whole model's gradients, not just this rank's. `unpipeline()` gathers the whole model on the first
stage's rank (after training, e.g. to export it); `repipeline()` prunes it to that rank's stages again.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from forgather.errors import did_you_mean

from .pipeline_split import stage_indices, stage_layer_ranges, stage_rank
from .pipeline_stages import prune_to, restore, stages_for

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
V_SHAPED_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")


def schedule_class_for(schedule: str, n_microbatches: int, stages_per_rank: int | None) -> type:
    """The torch schedule class named `schedule`, once the arguments are checked to fit it and each other.

    Raises ValueError naming the argument (and the strategy's config value) and what to give instead.
    """
    names = {name.lower(): name for name in SCHEDULES}
    if not isinstance(schedule, str) or schedule.lower() not in names:
        hint = ""
        if isinstance(schedule, str):
            same = {_spelling(name): name for name in SCHEDULES}.get(_spelling(schedule))  # e.g. looped_bfs
            hint = f"did you mean {same!r}?" if same else did_you_mean(schedule, SCHEDULES)
        raise ValueError(f"schedule={schedule!r} (config value `pp_schedule`) is not a pipeline schedule; "
                         f"{hint + ' ' if hint else ''}choose one of {', '.join(SCHEDULES)}")
    for name, value in (("n_microbatches", n_microbatches), ("stages_per_rank", stages_per_rank)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}={value!r} (config value `{name}`) must be a whole number of at least 1"
                             + (", or null for the schedule's default" if name == "stages_per_rank" else ""))
    schedule = names[schedule.lower()]
    schedule_class = get_schedule_class(schedule)
    single = issubclass(schedule_class, PipelineScheduleSingle)
    if single and stages_per_rank not in (None, 1):
        raise ValueError(f"stages_per_rank={stages_per_rank}: schedule {schedule} runs one stage a rank; leave "
                         "stages_per_rank unset, or choose a multi-stage schedule (Interleaved1F1B, LoopedBFS, "
                         "InterleavedZeroBubble)")
    if schedule in V_SHAPED_SCHEDULES and stages_per_rank not in (None, 2):
        raise ValueError(f"stages_per_rank={stages_per_rank}: schedule {schedule} folds the stages in a V, exactly "
                         "2 a rank; leave stages_per_rank unset (or 2)")
    return schedule_class


def _spelling(name: str) -> str:
    """A schedule's name as compared for a suggestion: case, separators and torch's class prefix set aside."""
    return "".join(c for c in name.lower() if c.isalnum()).removeprefix("schedule")


def pipeline_mesh(device_type: str, pp_size: int, dp_size: int = 1) -> DeviceMesh:
    """The ("pp", "dp") mesh over all ranks of the initialized default process group."""
    return init_device_mesh(device_type, (pp_size, dp_size), mesh_dim_names=("pp", "dp"))


class PipelineRuntime:
    """This rank's pipeline stages, its schedule, and the gradient bookkeeping around it.

    Args:
        model: a CausalLM or an nn.Sequential (pruned in place to this rank's stages).
        loss: the model's loss (`loss(hidden, weight, labels)` for a CausalLM, `loss(output, target)` else).
        mesh: a 2-D DeviceMesh with dims ("pp", "dp"), e.g. from `pipeline_mesh`.
        device: where this rank computes.
        schedule: a torch.distributed.pipelining schedule name (see SCHEDULES).
        n_microbatches: microbatches a batch is cut into (the batch size must divide by it).
        stages_per_rank: virtual stages a rank holds; default 1 for single-stage schedules, else 2.
        split_points: first layer of every stage after the first; default: balanced (pipeline_split.py).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[..., torch.Tensor],
        mesh: DeviceMesh,
        device: torch.device,
        schedule: str = "1F1B",
        n_microbatches: int = 4,
        stages_per_rank: int | None = None,
        split_points: list[int] | None = None,
    ) -> None:
        schedule_class = schedule_class_for(schedule, n_microbatches, stages_per_rank)
        self._place(schedule_class, mesh, stages_per_rank)
        self.device = torch.device(device)
        self.n_microbatches = n_microbatches
        self.parts = stages_for(model, loss)
        tied = self.parts.tied_head  # asked before pruning, which may drop an untied head from this rank
        self._cut(model, split_points)
        self.tied_weight, self.tied_group = self._tied_head(mesh) if tied else (None, None)
        self._schedule_class = schedule_class
        self.schedule = self._build_schedule()
        self._schedule_shapes: tuple | None = None  # the input shapes the schedule sized its buffers for

    def _place(self, schedule_class: type, mesh: DeviceMesh, stages_per_rank: int | None) -> None:
        """How many stages there are, and which of them this rank holds."""
        single = issubclass(schedule_class, PipelineScheduleSingle)
        self.stages_per_rank = stages_per_rank or (1 if single else 2)
        self.pp_group, self.dp_group = mesh.get_group("pp"), mesh.get_group("dp")
        self.pp_size, self.dp_size = mesh["pp"].size(), mesh["dp"].size()
        self.pp_rank = mesh["pp"].get_local_rank()
        self.style = "v" if schedule_class.__name__.removeprefix("Schedule") in V_SHAPED_SCHEDULES else "loop"
        self.num_stages = self.pp_size * self.stages_per_rank
        self.stage_ids = stage_indices(self.pp_rank, self.pp_size, self.stages_per_rank, self.style)
        self.last_rank = self._holder(self.num_stages - 1)

    def _cut(self, model: nn.Module, split_points: list[int] | None) -> None:
        """This rank's stage modules; the model pruned to them, other stages' weights freed."""
        if self.num_stages > self.parts.num_layers:
            raise ValueError(
                f"the model has {self.parts.num_layers} layers, too few for {self.num_stages} pipeline stages "
                f"({self.pp_size} ranks x stages_per_rank={self.stages_per_rank}; each stage needs a layer): use "
                "fewer devices or a smaller pipeline_parallel_size, or a single-stage schedule (1F1B, GPipe)"
            )
        self.layer_ranges = stage_layer_ranges(
            self.parts.num_layers, self.num_stages, split_points, self.parts.head_cost
        )
        last = self.num_stages - 1
        self.modules = [
            self.parts.stage(self.layer_ranges[index], index == 0, index == last) for index in self.stage_ids
        ]
        self.removed = prune_to(model, self.modules)
        _release(self.removed, self.parameters())
        self.gathered = False  # whether `unpipeline` put the whole model back on this rank

    def _build_schedule(self) -> Any:
        schedule_class = self._schedule_class
        stages = [
            PipelineStage(module, index, self.num_stages, self.device, group=self.pp_group)
            for module, index in zip(self.modules, self.stage_ids)
        ]
        single = issubclass(schedule_class, PipelineScheduleSingle)
        try:
            return schedule_class(
                stages[0] if single else stages, self.n_microbatches, loss_fn=self._microbatch_loss, scale_grads=False
            )
        except ValueError as error:  # torch's own limits, e.g. DualPipeV's at least a microbatch a stage
            raise ValueError(
                f"n_microbatches={self.n_microbatches} (config value `n_microbatches`) does not suit "
                f"{schedule_class.__name__} with {self.num_stages} stages: {error}"
            ) from error

    # Parameters and the tied head

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, each once."""
        unique = {id(p): p for module in self.modules for p in module.parameters()}
        return list(unique.values())

    def _tied_head(self, mesh: DeviceMesh) -> tuple[nn.Parameter | None, dist.ProcessGroup | None]:
        """The embedding weight shared by the first and last stages when those live on different ranks.

        Every rank creates every pair's group (new_group is collective), and keeps the one it belongs to.
        """
        if self.last_rank == 0:
            return None, None
        mine = None
        for replica in range(self.dp_size):
            ranks = [int(mesh.mesh[0, replica]), int(mesh.mesh[self.last_rank, replica])]
            group = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                mine = group
        return (self.parts.model.embed.weight, mine) if mine is not None else (None, None)

    # Steps

    def step(self, batch: Any, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and backward of one batch; returns its loss (the mean of its own terms) on every rank of the
        pipeline. Its gradients are those of the sum of its loss terms over `scale` (default: its count, which
        makes them the batch mean's), averaged over the replicas."""
        args, kwargs, target = self.parts.inputs(batch)
        self._check_microbatches(target.shape[0])
        self._fit_schedule_to(args, kwargs)
        count = self.parts.count(target).clamp(min=1)
        denominator = count if scale is None else scale
        losses: list[torch.Tensor] = []
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False,
                           loss_kwargs={"denominator": denominator}, **kwargs)
        if losses:
            loss = torch.stack(losses).sum().float() * (denominator / count)
        else:
            loss = torch.zeros((), device=self.device)
        loss = self._from_last_stage(loss)
        self._sync_grads()
        return loss

    def check_same_batch(self, batch: Any) -> None:
        """Refuse, on every rank of the pipeline, a batch that is not the same on all of them (a collective).

        The first stage embeds its batch's inputs and the last scores against its own batch's labels: batches
        that differ (loaders shuffled or sharded by each process alone) would train on nonsense, silently.
        Compared by a fingerprint: the shapes and a position-weighted sum of every tensor.
        """
        if self.pp_size == 1:
            return
        args, kwargs, target = self.parts.inputs(batch)
        tensors = [t for t in (*args, *kwargs.values(), target) if isinstance(t, torch.Tensor)]
        fingerprint = torch.zeros(2, dtype=torch.float64, device=self.device)
        for index, tensor in enumerate(tensors, 1):
            values = tensor.detach().to(self.device, torch.float64).flatten().nan_to_num()  # NaN == NaN here
            positions = torch.arange(1, values.numel() + 1, dtype=torch.float64, device=self.device)
            fingerprint[0] += values.numel() * index
            fingerprint[1] += (values * positions).sum() * index
        first = fingerprint.clone()
        dist.broadcast(first, group_src=0, group=self.pp_group)
        differs = (first != fingerprint).any().to(torch.int64)
        dist.all_reduce(differs, op=dist.ReduceOp.MAX, group=self.pp_group)
        if differs:
            raise ValueError(
                "the ranks of a pipeline read different training batches, but every stage must read the same one "
                "(the first embeds its inputs, the last scores its labels): keep Lightning's distributed sampler "
                "(use_distributed_sampler=True), or shuffle and shard by "
                "trainer.strategy.distributed_sampler_kwargs (the data-parallel replica), not by global rank, "
                "with one seed on every rank"
            )

    def count(self, batch: Any) -> torch.Tensor:
        """How many terms the batch's loss averages (e.g. target tokens), on the device."""
        return self.parts.count(self.parts.inputs(batch)[2])

    def replica_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a count over the replicas (the ranks of the "dp" dimension holding this rank's stages)."""
        if self.dp_size == 1:
            return value
        total = value.detach().clone()
        dist.all_reduce(total, group=self.dp_group)
        return total

    def scale_grads(self, factor: torch.Tensor) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor.float())

    def _check_microbatches(self, rows: int) -> None:
        # The schedule sizes every microbatch's receive buffers like the first one's: uneven ones cannot pass.
        if rows % self.n_microbatches:
            raise ValueError(
                f"a training batch of {rows} rows does not cut into n_microbatches={self.n_microbatches} equal "
                f"microbatches (PipelineParallelStrategy's n_microbatches, config value `n_microbatches`): make the "
                f"per-replica batch size a multiple of {self.n_microbatches}, and drop a smaller last batch "
                "(DataLoader(drop_last=True), config value `drop_last=true`)"
            )

    def _fit_schedule_to(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """A new schedule when the batch's shapes change (a smaller last batch, another sequence length).

        torch's stages infer the shapes they send and receive at their first step and keep them; a batch of
        other shapes would be received into buffers of the old ones. The pipeline's ranks read the same
        batches, so they all rebuild at the same step.
        """
        shapes = tuple((tuple(t.shape), t.dtype) for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
        if self._schedule_shapes not in (None, shapes):
            self.schedule = self._build_schedule()
        self._schedule_shapes = shapes

    def _from_last_stage(self, loss: torch.Tensor) -> torch.Tensor:
        if self.pp_size > 1:
            dist.broadcast(loss, group_src=self.last_rank, group=self.pp_group)
        return loss

    @torch.no_grad()
    def evaluate(self, batch: Any) -> torch.Tensor:
        """Forward only; returns the batch loss on every rank of the pipeline.

        Runs the stages itself, one microbatch after another through every stage, instead of the schedule's
        `eval`: that re-initializes the schedule's buffers on every switch between training and evaluation,
        and fails for the V-shaped schedules in torch 2.13.
        """
        args, kwargs, target = self.parts.inputs(batch)
        denominator = self.parts.count(target).clamp(min=1)
        # A smaller (last) batch may have fewer rows than microbatches, or an uneven cut: both are exact here.
        chunks = min(self.n_microbatches, target.shape[0])
        args_chunks, kwargs_chunks = split_args_kwargs_into_chunks(args, kwargs, chunks)
        target_chunks = target.tensor_split(chunks)
        loss = torch.zeros((), device=self.device)
        for chunk in range(chunks):
            x = args_chunks[chunk][0]
            for index, module in zip(self.stage_ids, self.modules):
                if index > 0 and self._holder(index - 1) != self.pp_rank:
                    x = _receive(self._holder(index - 1), self.pp_group, self.device)
                x = module(x, **kwargs_chunks[chunk])
                if index == self.num_stages - 1:
                    loss += self._microbatch_loss(x, target_chunks[chunk], denominator).float()
                elif self._holder(index + 1) != self.pp_rank:
                    _send(x, self._holder(index + 1), self.pp_group)
        return self._from_last_stage(loss)

    def _holder(self, stage: int) -> int:
        return stage_rank(stage, self.pp_size, self.stages_per_rank, self.style)

    def _microbatch_loss(self, output: torch.Tensor, target: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
        last_stage = self.modules[-1]
        return self.parts.stage_loss(last_stage, output, target) * (self.parts.count(target) / denominator)

    def _sync_grads(self) -> None:
        if self.tied_weight is not None and self.tied_weight.grad is not None:
            dist.all_reduce(self.tied_weight.grad, group=self.tied_group)
        if self.dp_size > 1:
            _average(
                [p.grad for p in self.parameters() if p.grad is not None], self.dp_group, self.dp_size
            )

    # Gradient norm

    def grad_norm(self) -> torch.Tensor:
        """The 2-norm of the whole model's gradients (the tied head counted once)."""
        counted = [p.grad for p in self.parameters() if p.grad is not None and p is not self._last_tied_copy]
        squares = torch.zeros((), device=self.device)
        if counted:
            squares = torch.nn.utils.get_total_norm(counted, 2.0).float().square()
        if self.pp_size > 1:
            dist.all_reduce(squares, group=self.pp_group)
        return squares.sqrt()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients so that the whole model's norm is at most `max_norm`; returns the norm before."""
        norm = self.grad_norm()
        torch.nn.utils.clip_grads_with_norm_(self.parameters(), max_norm, norm)
        return norm

    # The whole model again

    def unpipeline(self) -> nn.Module | None:
        """Collective over the pipeline group: the whole model, on the CPU, on the first stage's rank.

        Every rank sends its share of the weights to the first stage's rank, which puts the other stages'
        modules back into the model and loads them; that model is returned there (None elsewhere). The other
        ranks keep their stages. To train on, `repipeline` first.
        """
        model = self.parts.model
        share = {key: value.detach().cpu() for key, value in model.state_dict().items()}
        shares = [None] * self.pp_size if self.pp_rank == 0 else None
        dist.gather_object(share, shares, group_dst=0, group=self.pp_group)
        if self.pp_rank != 0:
            return None
        for module in self.removed.values():
            module.to_empty(device="cpu", recurse=True)
        restore(model, self.removed)
        whole: dict[str, torch.Tensor] = {}
        for part in shares:
            whole.update(part)
        model.to("cpu").load_state_dict(whole)
        self.gathered = True
        return model

    def repipeline(self) -> None:
        """Undo `unpipeline` on the first stage's rank: the model pruned to this rank's stages again, the other
        stages' weights freed, so that an optimizer over it holds this rank's parameters only. Elsewhere nothing
        to do."""
        if self.gathered:
            self.removed = prune_to(self.parts.model, self.modules)
            _release(self.removed, self.parameters())
            self.gathered = False

    @property
    def _last_tied_copy(self) -> nn.Parameter | None:
        """The tied weight as the last stage holds it (its gradient equals the first stage's after syncing)."""
        return self.tied_weight if self.pp_rank == self.last_rank else None


def _release(removed: dict[str, nn.Module], kept: list[nn.Parameter]) -> None:
    """Free the weights of other ranks' stages, keeping their structure (on the meta device) for `unpipeline`."""
    kept_ids = {id(p) for p in kept}
    for module in removed.values():
        if all(id(p) not in kept_ids for p in module.parameters()):
            module.to("meta")


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_HEADER = 8  # dtype index, number of dimensions, up to 6 sizes


def _send(tensor: torch.Tensor, peer: int, group: dist.ProcessGroup) -> None:
    """Send a tensor of any (float) dtype and shape: a fixed-size header first, then the data."""
    header = torch.zeros(_HEADER, dtype=torch.int64, device=tensor.device)
    header[:2] = torch.tensor([_DTYPES.index(tensor.dtype), tensor.dim()])
    header[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape)
    dist.send(header, group_dst=peer, group=group)
    dist.send(tensor.contiguous(), group_dst=peer, group=group)


def _receive(peer: int, group: dist.ProcessGroup, device: torch.device) -> torch.Tensor:
    header = torch.empty(_HEADER, dtype=torch.int64, device=device)
    dist.recv(header, group_src=peer, group=group)
    dtype, dims, *sizes = header.tolist()
    tensor = torch.empty(sizes[:dims], dtype=_DTYPES[dtype], device=device)
    dist.recv(tensor, group_src=peer, group=group)
    return tensor


def _average(tensors: list[torch.Tensor], group: dist.ProcessGroup, size: int) -> None:
    """Average tensors in place across `group`, one all-reduce per dtype (gloo has no AVG op)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for same in by_dtype.values():
        flat = torch.cat([tensor.reshape(-1) for tensor in same])
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        offset = 0
        for tensor in same:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
