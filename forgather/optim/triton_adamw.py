"""TritonAdamW: torch's AdamW whose CUDA step is one Triton launch over all of a group's tensors.

Why: the step of a pure-bf16 1.24B model moves 14 bytes a parameter (read the parameter, gradient and two
moments, write three), ~17 GB, 3.6 ms at the H200's 4.8 TB/s. torch's fused AdamW took 6.4 ms (2.7 TB/s), and
the foreach step compiled by inductor (CompiledAdamW) 4.5 ms, after a compile of 30-60 s on first use
(docs/benchmarks.md). This class is torch.optim.AdamW (its arguments, its state, its state dict, its CPU path)
with the CUDA update replaced by adamw_kernels.adamw_multi_tensor:

- per step and param group, the parameters with a gradient are bucketed by (dtypes, step count), normally one
  bucket; each bucket is one kernel launch, whose programs take BLOCK elements of one tensor each from a work
  list built once per set of tensor sizes (cached), and the tensors' addresses from a table that is uploaded
  (pinned memory, no host wait) only when an address changed since the last step: the caching allocator hands
  the gradients the same blocks every step, so normally nothing is uploaded;
- the step count stays a CPU tensor per parameter (torch's AdamW does the same without capturable/fused), so
  the bias corrections are host floats and the step never reads the GPU; the rate is a float each step, not a
  new compile (Triton does not specialize on floats);
- the arithmetic is fp32 in the order of torch's fused kernel (reference_step is it in torch ops, and what
  tensors the kernel cannot take use: non-contiguous ones, dtypes other than fp32/bf16/fp16);
- parameters off CUDA (the CPU, and with it the tutorial), DTensors (FSDP2's shards) and a CUDA machine
  without triton (a warning) run torch's own AdamW step unchanged; a kernel that fails to build at its first
  launch is a warning, and steps without it from then on, not the end of the run;
- clipping by global norm (`clip_grad_norm_`, which forgather's LightningModule calls for Lightning's
  gradient_clip_val on one device or under DDP) computes the norm and leaves the factor to the next step's
  kernel, which scales each gradient as it reads it: torch's clip_grad_norm_ reads and writes every gradient
  once more for that (~1.2 ms a step at the 1.24B shape), besides the read for the norm;
- `stochastic_rounding=True` writes bf16 parameters rounded stochastically (forgather/optim/rounding.py, the
  step's seed from `seed`), which keeps updates below half a bf16 step in expectation (what optimizer=adamw_sr is
  for), and `state_dtype=torch.float32` keeps the moments in fp32 beside bf16 parameters (8 more bytes a
  parameter to move); off CUDA such parameters step through reference_step, which does the same.

torch's AdamW arguments are all taken: amsgrad, capturable and differentiable, which the kernel does not do, and
foreach=True or fused=True, which ask for one of torch's implementations by name, make every step torch's own
(so the class can stand wherever torch.optim.AdamW is configured). Checkpoints move both ways between
this and torch's AdamW (and CompiledAdamW: a loaded step count or rate on the GPU is moved to the host once).
Under Triton's interpreter (TRITON_INTERPRET=1) the kernel runs on CPU tensors, for scripts/interpret_adamw.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import warnings
from typing import Any, Callable, Iterable

import torch

from forgather.optim.rounding import step_seed, stochastic_round_to_bf16
from forgather.optim.state import adam_layout, load_state_keeping_fp32, to_device
from forgather.triton_support import interpreting

# The dtypes the kernel loads and stores; a tensor in another goes through reference_step.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def reference_step(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, lr: float,
    beta1: float, beta2: float, eps: float, weight_decay: float, step: float, maximize: bool,
    grad_scale: torch.Tensor | None = None, stochastic_seed: int | None = None,
) -> None:
    """One AdamW step of one tensor in fp32, in torch's fused kernel's order (and adamw_multi_tensor's), each
    result rounded once into its tensor. `step` is the count after this step (1 on the first); `grad_scale`, a
    0-d fp32 tensor, multiplies the gradient as it is read (clipping); with `stochastic_seed` (the step's seed)
    a bf16 parameter is rounded stochastically (rounding.py), the rest to nearest."""
    scalars = step_scalars(lr, beta1, beta2, weight_decay, step)
    g = grad.float() if grad_scale is None else grad.float() * grad_scale
    if maximize:
        g = -g
    p, m, v = param.float(), exp_avg.float(), exp_avg_sq.float()
    p = p - scalars["lr_weight_decay"] * p
    m = beta1 * m + scalars["one_minus_beta1"] * g
    v = beta2 * v + scalars["one_minus_beta2"] * g * g
    denom = v.sqrt() / scalars["bias_correction2_sqrt"] + eps
    p = p - scalars["step_size"] * m / denom
    stochastic = stochastic_seed is not None and param.dtype == torch.bfloat16
    param.copy_(stochastic_round_to_bf16(p, stochastic_seed) if stochastic else p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def step_scalars(lr: float, beta1: float, beta2: float, weight_decay: float, step: float) -> dict[str, float]:
    """The step's host numbers, in double as torch computes them before its kernel takes them as floats."""
    return dict(
        lr_weight_decay=lr * weight_decay, one_minus_beta1=1.0 - beta1, one_minus_beta2=1.0 - beta2,
        step_size=lr / (1.0 - beta1 ** step), bias_correction2_sqrt=math.sqrt(1.0 - beta2 ** step),
    )


def plan_programs(numels: list[int], block: int) -> torch.Tensor:
    """The work list, int32 [2, programs]: for each program, the index of its tensor (row 0) and of its block in
    that tensor (row 1); every element of every tensor in exactly one program, empty tensors in none."""
    counts = torch.tensor([-(-numel // block) for numel in numels], dtype=torch.int64)
    tensors = torch.repeat_interleave(torch.arange(len(numels)), counts)
    firsts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)  # each program's tensor's first
    return torch.stack([tensors, torch.arange(len(tensors)) - firsts]).to(torch.int32)


class TritonAdamW(torch.optim.AdamW):
    """torch.optim.AdamW with its CUDA step in one Triton launch per bucket (module docstring). `block` and
    `num_warps` tune the kernel (defaults: adamw_kernels.BLOCK, NUM_WARPS)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, stochastic_rounding: bool = False, seed: int = 0,
                 state_dtype: torch.dtype | None = None, block: int | None = None, num_warps: int | None = None):
        # torch's own implementations asked for by name, and what the kernel does not do, are torch's step
        self._torch_only = bool(amsgrad or foreach or capturable or differentiable or fused)
        if stochastic_rounding and self._torch_only:
            raise ValueError("TritonAdamW: stochastic_rounding is its own step's; torch's (fused, foreach, amsgrad, "
                             "capturable, differentiable) rounds to nearest: leave those out")
        if state_dtype is not None and self._torch_only:
            raise ValueError("TritonAdamW: state_dtype is its own step's; torch's (fused, foreach, amsgrad, "
                             "capturable, differentiable) keeps the moments in the parameters' dtype: leave those out")
        self._stochastic_rounding, self._seed, self._state_dtype = stochastic_rounding, seed, state_dtype
        if not self._torch_only and (isinstance(lr, torch.Tensor) or any(isinstance(b, torch.Tensor) for b in betas)):
            raise ValueError("TritonAdamW takes its rate and betas as floats (a schedule sets the rate each step "
                             "without a recompile); for a tensor rate use optimizer=adamw_compiled")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused)
        self._block, self._num_warps = block, num_warps
        self._start_caches()

    # torch's Optimizer pickles its defaults, state and groups only; the options above travel too, the caches
    # start anew (a copy, or an optimizer sent to another process)
    _OPTIONS = ("_torch_only", "_stochastic_rounding", "_seed", "_state_dtype", "_block", "_num_warps")

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), **{name: getattr(self, name) for name in self._OPTIONS}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._start_caches()

    def _start_caches(self) -> None:
        self._kernels = None  # adamw_kernels, imported at the first step that runs on CUDA; False: not to be used
        self._built: set[tuple] = set()  # bucket kinds whose kernel has launched once
        self._grad_scale: torch.Tensor | None = None  # clip_grad_norm_'s factor for the next step
        self._clip_norm: torch.Tensor | None = None  # clip_grad_norm_'s norm, for the next step
        self._norm_wanted = False  # request_grad_norm: the next step measures its gradients' norm
        self._norm_parts: list[torch.Tensor] | None = None  # while a step measures: its sums of squares
        self._grad_norm: torch.Tensor | None = None  # the last measured norm, until take_grad_norm
        self._work: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}  # numels -> (work, numels, programs)
        self._tables: dict[tuple, tuple[tuple[int, ...], torch.Tensor]] = {}  # bucket -> (addresses, on device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts the moments to each parameter's dtype as it loads them: fp32 ones are put back unrounded
        keys = {"exp_avg", "exp_avg_sq"} if self._state_dtype == torch.float32 else set()
        load_state_keeping_fp32(self, state_dict, keys, super().load_state_dict, adam_layout)
        if self._torch_only:
            return
        # A checkpoint of a capturable or fused AdamW keeps the step count (and CompiledAdamW the rate) on the
        # GPU: read once here, so that no step reads them.
        for group in self.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = group["lr"].item()
        for state in self.state.values():
            if isinstance(state.get("step"), torch.Tensor) and state["step"].device.type != "cpu":
                state["step"] = state["step"].to("cpu", torch.float32)
        self._tables.clear()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over this optimizer's gradients; where the kernel runs, the scaling is
        left to the next step, whose kernel multiplies each gradient as it reads it (no pass of its own over
        the gradients, which the norm has just read). Returns the total norm before clipping. A step that does
        not follow (a skipped fp16 step, zero_grad) drops it. Only for whole gradients (one device, DDP): a
        sharded model's norm is its strategy's (FSDP's clip_grad_norm_)."""
        params = self._params_with_grads()
        self._grad_scale = self._clip_norm = None
        if not params or not self._runs_kernel(params):
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            self._clip_norm = norm if norm_type == 2.0 and params else None
            return norm
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
        # torch's clip_grad_norm_'s factor, in the norm's dtype as there
        self._grad_scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(torch.float32)
        self._clip_norm = norm if norm_type == 2.0 else None
        return norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grad_scale = self._clip_norm = None
        super().zero_grad(set_to_none)

    def folds_grad_norm(self) -> bool:
        """Whether the next step's kernel can measure the gradients' norm as it reads them (request_grad_norm):
        on CUDA (or the interpreter), with the kernel usable."""
        params = self._params_with_grads()
        return bool(params) and self._runs_kernel(params)

    def request_grad_norm(self) -> None:
        """Measure the next step's gradients' total 2-norm (before clipping), for `take_grad_norm` after it: the
        norm clip_grad_norm_ computed for that step, else the kernel's sums of squares, a store per program of
        what it reads anyway, summed in one launch (get_total_norm is a pass over every gradient: 1.06 ms a
        step at the 1.24B shape on an H200). Gradients the kernel does not step (the reference path) add their
        own sums; a step that is torch's measures with get_total_norm first."""
        self._norm_wanted = True

    def take_grad_norm(self) -> torch.Tensor | None:
        """The norm the last step measured after request_grad_norm (a device tensor, read without waiting),
        once; None where no such step ran."""
        norm, self._grad_norm = self._grad_norm, None
        return norm

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:  # Lightning's: forward and backward, which give the gradients
            with torch.enable_grad():
                loss = closure()
        params = self._params_with_grads()
        grad_scale, self._grad_scale = self._grad_scale, None
        clip_norm, self._clip_norm = self._clip_norm, None
        wanted, self._norm_wanted = self._norm_wanted, False
        self._grad_norm = None
        if wanted and clip_norm is not None:
            self._grad_norm, wanted = clip_norm, False
        elif wanted and not params:
            wanted = False
        # what torch's step would not do: round stochastically, keep the moments in another dtype
        ours_only = (self._stochastic_rounding and any(p.dtype == torch.bfloat16 for p in params)
                     or self._state_dtype is not None and any(p.dtype != self._state_dtype for p in params))
        if not self._runs_kernel(params) and not ours_only:
            if wanted:
                self._grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if grad_scale is not None:
                torch._foreach_mul_([p.grad for p in params], grad_scale)
            _torch_adamw_step(self)
            return loss
        self._norm_parts = [] if wanted else None
        for group in self.param_groups:
            self._step_group(group, grad_scale)
        if wanted:
            parts = [part.reshape(-1) for part in self._norm_parts]
            self._grad_norm = torch.cat(parts).sum().sqrt() if parts else None
        self._norm_parts = None
        return loss

    # Helpers

    def _params_with_grads(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _runs_kernel(self, params: list[torch.Tensor]) -> bool:
        """Whether this step is ours: some parameter on CUDA (or the interpreter's CPU), none a DTensor, and
        triton importable. Decided per step, as Lightning may build the optimizer before moving the model."""
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in params):
            if self._stochastic_rounding:
                raise ValueError("TritonAdamW(stochastic_rounding=True) steps whole tensors, and these parameters are "
                                 "sharded (DTensor): use optimizer=adamw_sr, which rounds each shard")
            return False
        if self._torch_only:
            return False
        if not (interpreting() or any(p.is_cuda for p in params)):
            return False
        if self._kernels is None:
            self._kernels = _load_kernels() or False
            if self._kernels is False:
                warnings.warn("TritonAdamW steps with torch's AdamW: Triton is not installed (pip install triton, or "
                              "forgather[gpu])", stacklevel=3)
        return self._kernels is not False

    def _step_group(self, group: dict[str, Any], grad_scale: torch.Tensor | None) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("TritonAdamW does not support sparse gradients")
            state = self.state[p]
            if not state:  # torch's AdamW's state, so that checkpoints move between the two
                scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                moments = self._state_dtype or p.dtype
                state["step"] = torch.tensor(0.0, dtype=scalar)
                state["exp_avg"] = torch.zeros_like(p, dtype=moments, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=moments, memory_format=torch.preserve_format)
        steps = [self.state[p]["step"] for p in params]
        torch._foreach_add_(steps, 1)  # CPU tensors: no launch, no wait
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for p, count in zip(params, torch.stack(steps).tolist()):
            buckets.setdefault((*self._kernel_key(p), count), []).append(p)
        lr, (beta1, beta2) = float(group["lr"]), group["betas"]
        options = dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                       maximize=group["maximize"])
        for key, bucket in buckets.items():
            *dtypes, count = key
            seed = step_seed(self._seed, int(count)) if self._stochastic_rounding else None
            if dtypes[0] is not None and self._kernels and self._launched(key, bucket, count, options, grad_scale,
                                                                          seed):
                continue
            for p in bucket:  # tensors the kernel does not take (or where it could not be built), and the CPU's
                state = self.state[p]  # where parameters round stochastically
                if self._norm_parts is not None:
                    self._norm_parts.append(p.grad.detach().float().square().sum())
                reference_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"], step=count, grad_scale=grad_scale,
                               stochastic_seed=seed, **options)

    def _launched(self, key: tuple, bucket: list[torch.Tensor], count: float, options: dict[str, Any],
                  grad_scale: torch.Tensor | None, seed: int | None) -> bool:
        """Launch the kernel for `bucket`; False where its first build fails (another GPU or Triton than those it
        was written for): then this bucket is stepped by reference_step and every later step by torch's step (or
        reference_step, rounding stochastically), with a warning, rather than the run stopping. (An error after a
        first launch is not caught: it is a bug.)"""
        if key[:-1] in self._built:
            self._launch(key, bucket, count, options, grad_scale, seed)
            return True
        try:
            self._launch(key, bucket, count, options, grad_scale, seed)
        except Exception as error:  # noqa: BLE001 - a build failure of ours must not end the user's run
            self._kernels = False
            warnings.warn(f"TritonAdamW steps without its kernel from now on: the kernel could not be built "
                          f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})", stacklevel=4)
            return False
        self._built.add(key[:-1])
        return True

    def _kernel_key(self, p: torch.Tensor) -> tuple:
        """(device, param dtype, grad dtype, state dtype) where the kernel can step `p`, else (None, ...)."""
        state, grad = self.state[p], p.grad
        tensors = (p, grad, state["exp_avg"], state["exp_avg_sq"])
        takes = (
            all(t.is_contiguous() and t.dtype in KERNEL_DTYPES and t.device == p.device for t in tensors)
            and state["exp_avg"].dtype == state["exp_avg_sq"].dtype and (p.is_cuda or interpreting())
        )
        return (p.device, p.dtype, grad.dtype, state["exp_avg"].dtype) if takes else (None, None, None, None)

    def _launch(self, key: tuple, bucket: list[torch.Tensor], count: float, options: dict[str, Any],
                grad_scale: torch.Tensor | None, seed: int | None) -> None:
        k = self._kernels
        block = self._block or k.BLOCK
        device = bucket[0].device
        states = [self.state[p] for p in bucket]
        sizes = tuple(p.numel() for p in bucket)
        if (sizes, block, device) not in self._work:
            work = plan_programs(list(sizes), block)
            self._work[sizes, block, device] = (to_device(work, device),
                                                to_device(torch.tensor(sizes, dtype=torch.int64), device),
                                                work.shape[1])
        work, numels, programs = self._work[sizes, block, device]
        if not programs:
            return
        addresses = (*(p.data_ptr() for p in bucket), *(p.grad.data_ptr() for p in bucket),
                     *(s["exp_avg"].data_ptr() for s in states), *(s["exp_avg_sq"].data_ptr() for s in states))
        table_key = (*key[:-1], id(bucket[0]))  # param groups of the same dtypes keep a table each
        cached = self._tables.get(table_key)
        if cached is None or cached[0] != addresses:
            table = to_device(torch.tensor(addresses, dtype=torch.int64), device)
            aligned = all(a % 16 == 0 for a in addresses) and all(n % 16 == 0 for n in sizes)
            self._tables[table_key] = cached = (addresses, table, aligned)
        scalars = step_scalars(options["lr"], options["beta1"], options["beta2"], options["weight_decay"], count)
        first = next(p for p in bucket if p.numel())  # the kernel reads the dtypes off it (an empty one's
        param_dtype = key[1]  # address may be 0, which Triton's launcher refuses)
        # Triton launches on the current device: a bucket on another GPU of this process (a model split by hand)
        # must make its own current
        partials = None if self._norm_parts is None else torch.empty(programs, dtype=torch.float32, device=device)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            k.adamw_multi_tensor[(programs,)](
                cached[1], numels, work, programs, len(bucket), numels if grad_scale is None else grad_scale,
                numels if partials is None else partials, seed or 0, first, first.grad, self.state[first]["exp_avg"],
                scalars["lr_weight_decay"], options["beta1"], scalars["one_minus_beta1"], options["beta2"],
                scalars["one_minus_beta2"], scalars["step_size"], scalars["bias_correction2_sqrt"], options["eps"],
                MAXIMIZE=bool(options["maximize"]), HAS_GRAD_SCALE=grad_scale is not None, HAS_NORM=partials is not None,
                STOCHASTIC_ROUNDING=seed is not None and param_dtype == torch.bfloat16, ALIGNED=cached[2], BLOCK=block,
                num_warps=self._num_warps or k.NUM_WARPS,
            )
        if partials is not None:  # after the launch: a bucket whose build fails is summed on the reference path
            self._norm_parts.append(partials)


def _load_kernels():
    """adamw_kernels, or None where triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    from forgather.optim import adamw_kernels

    return adamw_kernels


def _torch_adamw_step(optimizer: TritonAdamW) -> None:
    """torch's AdamW step itself, without the profiling and hook wrapper torch puts around every optimizer's
    step (ours already ran inside it)."""
    step = torch.optim.AdamW.step
    getattr(step, "__wrapped__", step)(optimizer)


