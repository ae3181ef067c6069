"""Where a training step's time goes: device kernels grouped by kind, per step, from a torch.profiler trace.

Contract: `StepProfiler` records `steps` training steps (only the device's activity on CUDA, so the trace stays
small and the host is not slowed; on a CPU, the top-level operators, so the plumbing runs there too) and returns
a summary: for each category, milliseconds per step and share of the step's wall time, plus `idle` = wall time
minus the union of all kernel intervals (the device waiting for the host, or between launches). Kernels of
several streams may overlap, so the categories' shares may add up to more than the busy share.

Categories come from kernel names (`classify`), first match wins, anything else is `other`:
  copies     memcpy / memset
  optimizer  multi-tensor and fused optimizer kernels (torch's fused AdamW, our Triton Adafactor, inductor's
             horizontal kernels of a compiled foreach step: CompiledAdamW)
  loss       cross-entropy kernels (Liger's, which our `fused` loss calls per chunk; torch's)
  attention  flex attention (inductor template kernels `triton_tem_*`), FlashAttention, cuDNN / efficient SDPA
  matmul     cuBLAS / CUTLASS GEMMs (gemm, nvjet, xmma, sm90_*, cutlass)
  pointwise  everything elementwise or reducing: norms, RoPE, SwiGLU, residual adds (inductor `triton_poi/red/
             per`, eager `elementwise` / `reduce` kernels, Liger's RMSNorm / RoPE / SwiGLU kernels)
The loss's own logits matmuls are GEMMs, so they count as matmul, like the model's.

On CUDA the profiled steps also run under `torch.cuda.set_sync_debug_mode("warn")`: every operation that
makes the host wait for the device warns, and the summary lists where (`syncs`: file:line and count), the
first place to look when `idle` is large. Then the idle itself (`gaps`): how much of it lies in gaps of at
least GAP_US between kernels (the host fell behind: a wait, or slow host work there) against the many short
gaps between launches, and the longest gaps with the kernels on either side, which say where in the step the
host was late.

Used by scripts/bench_train.py: `ProfileSteps` is a Lightning callback (added to the forgather run's trainer
by the bench's template) and the Hugging Face loops call `StepProfiler` directly.

    python scripts/profile_train.py TRACE.json [--steps N] [--wall-ms MS]   (summarize a saved chrome trace)
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Callable, Iterable

CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("copies", ("memcpy", "memset")),
    ("optimizer", ("multi_tensor", "fused_adam", "adafactor", "grad_sq_sums", "update_sq_sum", "apply_update",
                   "finalize", "foreach", "optimizer", "triton_for_")),  # triton_for_: inductor's compiled foreach
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "element_mul_kernel")),
    ("attention", ("flex_attention", "triton_tem", "flash", "fmha", "attention", "sdpa", "attn")),
    ("matmul", ("gemm", "nvjet", "xmma", "sm90_", "sm80_", "cutlass", "cublas", "splitk", "aten::mm", "aten::addmm",
                "aten::bmm", "aten::matmul", "aten::linear")),
    ("pointwise", ("triton_poi", "triton_red", "triton_per", "elementwise", "reduce", "rms_norm", "layer_norm",
                   "rope", "rotary", "swiglu", "silu", "softmax", "aten::")),
]
CATEGORY_ORDER = [name for name, _ in CATEGORIES] + ["other", "idle"]
DEVICE_EVENT_KINDS = ("kernel", "gpu_memcpy", "gpu_memset")

Event = tuple[str, float, float]  # (kernel name, start, duration), microseconds
# torch.cuda._sleep's kernel: StepProfiler launches one at each end of its window, to find the window's kernels
WINDOW_MARKER = "spin_kernel"


def classify(name: str) -> str:
    """The category of one kernel name (case-insensitive substring rules above); `other` when none matches."""
    lowered = name.lower()
    for category, patterns in CATEGORIES:
        if any(pattern in lowered for pattern in patterns):
            return category
    return "other"


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def summarize(events: list[Event], wall_us: float, steps: int) -> list[dict]:
    """Rows {category, ms_per_step, share} in CATEGORY_ORDER (categories with no kernel left out), `idle` last:
    wall time minus the union of all kernel intervals (never below 0)."""
    if steps < 1 or wall_us <= 0:
        raise ValueError(f"need steps >= 1 and a positive wall time, got steps={steps}, wall_us={wall_us}")
    totals: dict[str, float] = {}
    for name, _, duration in events:
        category = classify(name)
        totals[category] = totals.get(category, 0.0) + duration
    busy = union_length((start, start + duration) for _, start, duration in events)
    totals["idle"] = max(0.0, wall_us - busy)
    return [
        {"category": category, "ms_per_step": totals[category] / steps / 1000, "share": totals[category] / wall_us}
        for category in CATEGORY_ORDER if category in totals
    ]


GAP_US = 100.0  # an idle gap at least this long is the host falling behind, not the launch of the next kernel


def device_gaps(intervals: Iterable[tuple[float, float, object]]) -> list[tuple[float, float, object, object]]:
    """The device's idle gaps among (start, duration, item) intervals, which may overlap: (length, idle from,
    the item that ended the busy stretch before the gap, the item that ended the gap), in time order."""
    gaps, reach, last = [], None, None
    for start, duration, item in sorted(intervals, key=lambda interval: interval[0]):
        if reach is not None and start > reach:
            gaps.append((start - reach, reach, last, item))
        if reach is None or start + duration > reach:
            reach, last = start + duration, item
    return gaps


def idle_gaps(events: list[Event], steps: int, longest: int = 6) -> dict:
    """The device's idle time between kernels: {long_ms, long_count, short_ms, short_count} per step, split at
    GAP_US, and `longest`: the longest gaps as {ms, before, after} (the kernel that ended the busy stretch
    before the gap and the kernel that ended the gap), longest first."""
    gaps = [(length, before, after) for length, _, before, after in device_gaps((s, d, n) for n, s, d in events)]
    long = [gap for gap in gaps if gap[0] >= GAP_US]
    short = [gap for gap in gaps if gap[0] < GAP_US]
    return {
        "long_ms": sum(g[0] for g in long) / steps / 1000, "long_count": len(long) / steps,
        "short_ms": sum(g[0] for g in short) / steps / 1000, "short_count": len(short) / steps,
        "longest": [{"ms": g[0] / 1000, "before": g[1], "after": g[2]}
                    for g in sorted(gaps, key=lambda g: -g[0])[:longest]],
    }


HOST_EVENT_KINDS = ("cpu_op", "user_annotation", "python_function")  # the host's side of a kept trace


def window_device_events(events: list[dict]) -> list[dict]:
    """A trace's device events (kernels, copies, memsets) that start inside `window_bounds`, markers left out."""
    device = [e for e in events if e.get("cat") in DEVICE_EVENT_KINDS]
    low, high = window_bounds([(e["name"], float(e["ts"]), float(e["dur"])) for e in device])
    return [e for e in device if WINDOW_MARKER not in e["name"] and low <= float(e["ts"]) < high]


def launches_by_correlation(events: list[dict]) -> dict:
    """A trace's kernel launches (runtime calls) by the correlation id that their device events carry too."""
    return {e["args"]["correlation"]: e for e in events
            if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}


def host_during_gaps(trace: dict, longest: int = 4, ops: int = 4) -> list[dict]:
    """What the host did while the device sat idle, from a trace with the host's activity (`trace=` kept): for
    the `longest` gaps of at least GAP_US, {ms, after (the kernel that ended the gap), launch_late_ms (how long
    after the device went idle the host launched it), host: [(operator, ms)]}, the host's operators on the
    launching thread that began in that time, outermost ones only, longest first (`ops` of them). A gap whose
    kernel has no launch in the trace (no host activity recorded) gets no `host`. Only the kernels of the marker
    window (`window_bounds`, as the profile's own tables), markers left out."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels = [(float(e["ts"]), float(e["dur"]), e) for e in window_device_events(events)]
    launches = launches_by_correlation(events)
    host = sorted((e for e in events if e.get("cat") in HOST_EVENT_KINDS),
                  key=lambda e: (float(e["ts"]), -float(e["dur"])))
    gaps = [gap for gap in device_gaps(kernels) if gap[0] >= GAP_US]
    found = []
    for gap_us, idle_from, _, kernel in sorted(gaps, key=lambda g: -g[0])[:longest]:
        row = {"ms": gap_us / 1000, "after": kernel["name"]}
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        if launch is not None:
            launched = float(launch["ts"])
            row["launch_late_ms"] = (launched - idle_from) / 1000
            began = [e for e in host if e.get("tid") == launch.get("tid") and idle_from <= float(e["ts"]) < launched]
            outer, covered = [], float("-inf")
            for e in began:  # sorted by start, longest first at equal starts: a nested operator starts inside one kept
                if float(e["ts"]) >= covered:
                    outer.append((e["name"], min(float(e["dur"]), launched - float(e["ts"])) / 1000))
                    covered = float(e["ts"]) + float(e["dur"])
            row["host"] = sorted(outer, key=lambda op: -op[1])[:ops]
        found.append(row)
    return found


HOST_WAITS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy",
              "cudaStreamQuery")  # runtime calls that return only once the device got somewhere (cudaMemcpy:
# the synchronous one; cudaMemcpyAsync is left out, it waits only from pageable memory, and the step's is pinned)
BLOCKED_LAUNCH_US = 50.0  # a launch call longer than this waited for room in the device's full queue


def host_lead(trace: dict, steps: int) -> dict:
    """Whether the host or the device set the pace, from a trace with the host's activity: {lead_ms: the
    10th, 50th and 90th percentiles of how long before its start each kernel was launched (near zero: the device
    ran each kernel as soon as the host launched it, the host is the bottleneck), wait_ms: the host's time a step
    in calls that wait for the device (HOST_WAITS, synchronous copies; those after the last launch, which close
    the window, left out), blocked_ms: its time a step in launches
    that took longer than BLOCKED_LAUNCH_US (the device's queue full: the host far ahead), launches: kernels
    matched to their launch}. Empty when no launch was recorded."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    launches = {e["args"]["correlation"]: float(e["ts"]) for e in runtime if "correlation" in e.get("args", {})}
    leads = sorted(float(e["ts"]) - launches[e["args"]["correlation"]] for e in events
                   if e.get("cat") in DEVICE_EVENT_KINDS and e.get("args", {}).get("correlation") in launches)
    if not leads:
        return {}
    # after the last launch, only the waits that close the window (StepProfiler's own, the profiler's)
    last_launch = max(float(e["ts"]) for e in runtime if "Launch" in e["name"])
    wait = sum(float(e["dur"]) for e in runtime if e["name"] in HOST_WAITS and float(e["ts"]) < last_launch)
    blocked = sum(float(e["dur"]) for e in runtime
                  if "Launch" in e["name"] and float(e["dur"]) > BLOCKED_LAUNCH_US)

    def percentile(q: float) -> float:
        return leads[min(len(leads) - 1, int(q * len(leads)))] / 1000

    return {"lead_ms": {"p10": percentile(0.1), "p50": percentile(0.5), "p90": percentile(0.9)},
            "wait_ms": wait / steps / 1000, "blocked_ms": blocked / steps / 1000, "launches": len(leads)}


LAUNCHER_MATCH = ("Memset",)  # the device events launch_sites attributes (a 1.24B step had ~290 memsets)


def launch_sites(trace: dict, steps: int, match: tuple[str, ...] = LAUNCHER_MATCH, count: int = 8) -> list[dict]:
    """Which host operators launched the device events whose names contain one of `match`, from a trace with the
    host's activity: [{op: the innermost operator around the launch on its thread, within: the outermost one,
    calls and ms: a step}], most calls first. Only the events between the window's markers (WINDOW_MARKER)
    where there are two; empty when no launch was recorded."""
    from bisect import bisect_right

    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    launches = launches_by_correlation(events)
    threads: dict = {}
    for e in sorted((e for e in events if e.get("cat") in HOST_EVENT_KINDS),
                    key=lambda e: (float(e["ts"]), -float(e["dur"]))):
        threads.setdefault(e.get("tid"), []).append(e)
    starts = {tid: [float(e["ts"]) for e in ops] for tid, ops in threads.items()}
    outermost = {}  # id(op) -> the outermost operator open at its start on its thread (itself at top level)
    for ops in threads.values():
        stack: list[dict] = []
        for op in ops:
            while stack and float(stack[-1]["ts"]) + float(stack[-1]["dur"]) <= float(op["ts"]):
                stack.pop()
            outermost[id(op)] = stack[0] if stack else op
            stack.append(op)
    sites: dict[tuple[str, str], list[float]] = {}
    for e in window_device_events(events):
        if not any(m in e["name"] for m in match):
            continue
        launch = launches.get(e.get("args", {}).get("correlation"))
        if launch is None:
            continue
        ops, at = threads.get(launch.get("tid"), []), float(launch["ts"])
        # the innermost operator open at the launch: the latest to start of those still open (they nest)
        inner = next((ops[i] for i in range(bisect_right(starts.get(launch.get("tid"), []), at) - 1, -1, -1)
                      if float(ops[i]["ts"]) + float(ops[i]["dur"]) >= at), None)
        key = (inner["name"], outermost[id(inner)]["name"]) if inner else ("(no operator)", "(no operator)")
        sites.setdefault(key, []).append(float(e["dur"]))
    rows = [{"op": op, "within": within, "calls": len(durations) / steps, "ms": sum(durations) / steps / 1000}
            for (op, within), durations in sites.items()]
    return sorted(rows, key=lambda row: -row["calls"])[:count]


def launch_sites_text(rows: list[dict], match: tuple[str, ...] = LAUNCHER_MATCH) -> str:
    if not rows:
        return ""
    lines = [f"\nwho launched the {' / '.join(match)} events, a step:"]
    lines += [f"  {row['calls']:.1f} calls, {row['ms']:.3f} ms: {row['op'][:60]} (within {row['within'][:50]})"
              for row in rows]
    return "\n".join(lines) + "\n"


def host_lead_text(lead: dict) -> str:
    if not lead:
        return ""
    p = lead["lead_ms"]
    return (f"\nkernels launched ahead of their start: {p['p10']:.2f} / {p['p50']:.2f} / {p['p90']:.2f} ms "
            f"(10th / 50th / 90th percentile of {lead['launches']}); a step, the host waited {lead['wait_ms']:.2f} "
            f"ms for the device and {lead['blocked_ms']:.2f} ms in launches into a full queue\n")


def host_gaps_text(rows: list[dict]) -> str:
    lines = ["\nthe host during the longest idle gaps:"]
    for row in rows:
        line = f"  {row['ms']:.2f} ms before {row['after'][:60]}"
        if "host" in row:
            done = ", ".join(f"{name[:50]} {ms:.2f}" for name, ms in row["host"]) or "no operator began"
            line += f": launched {row['launch_late_ms']:.2f} ms after the device went idle; the host began {done} (ms)"
        lines.append(line)
    return "\n".join(lines) + "\n"


def top_kernels(events: list[Event], steps: int, count: int | None = 20, by: str = "time") -> list[dict]:
    """The `count` kernels (by name; None: all) that take the most device time (by="calls": the most launches):
    {name, category, ms_per_step, calls_per_step}, most first. Inductor names its kernels after what they fuse
    (triton_per_fused_add_mean_mul_pow_rsqrt...): the pointwise share's parts by name."""
    totals: dict[str, list[float]] = {}
    for name, _, duration in events:
        total = totals.setdefault(name, [0.0, 0])
        total[0] += duration
        total[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0 if by == "time" else 1])[:count]
    return [{"name": name, "category": classify(name), "ms_per_step": us / steps / 1000, "calls_per_step": calls / steps}
            for name, (us, calls) in ranked]


def top_kernels_text(rows: list[dict]) -> str:
    lines = ["\n| kernel | category | ms per step | calls per step |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {row['name'][:90]} | {row['category']} | {row['ms_per_step']:.2f} | {row['calls_per_step']:g} |"
              for row in rows]
    return "\n".join(lines) + "\n"


def gaps_text(gaps: dict) -> str:
    lines = [f"\nidle between kernels, a step: {gaps['long_ms']:.2f} ms in {gaps['long_count']:.1f} gaps of "
             f">= {GAP_US / 1000:g} ms, {gaps['short_ms']:.2f} ms in {gaps['short_count']:.0f} shorter ones"]
    lines += [f"  {g['ms']:.2f} ms after {g['before'][:70]} before {g['after'][:70]}" for g in gaps["longest"]]
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict]) -> str:
    step_ms = sum(row["ms_per_step"] for row in rows if row["category"] != "idle")
    lines = ["| category | ms per step | share |", "| --- | ---: | ---: |"]
    lines += [f"| {row['category']} | {row['ms_per_step']:.2f} | {100 * row['share']:.1f}% |" for row in rows]
    lines.append(f"| (kernels, summed) | {step_ms:.2f} | |")
    return "\n".join(lines) + "\n"


def trace_events(trace: dict) -> list[Event]:
    """Device kernels, copies and memsets of a chrome trace; when it has none (a CPU run), the top-level
    operators of each thread (an operator inside another one of its thread is left out: counted once)."""
    device = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") in DEVICE_EVENT_KINDS]
    if device:
        return [(e["name"], float(e["ts"]), float(e["dur"])) for e in device]
    operators = sorted((e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") == "cpu_op"),
                       key=lambda e: (e.get("tid"), float(e["ts"]), -float(e["dur"])))
    top, reach = [], {}
    for e in operators:
        start, duration, thread = float(e["ts"]), float(e["dur"]), e.get("tid")
        if start >= reach.get(thread, float("-inf")):
            top.append((e["name"], start, duration))
            reach[thread] = start + duration
    return top


def window_bounds(events: list[Event], marker: str = WINDOW_MARKER) -> tuple[float, float]:
    """[the first `marker` kernel's end, the last one's start): where the window's kernels start. The device runs
    the warm-up step's last kernels after the profiler began recording (the host queues ~80 ms ahead), and those
    are not the window's: the first GPU profile with the warm-up step counted 4 optimizer steps in 3. Without two
    markers (a CPU trace), everything: (-inf, inf)."""
    marks = sorted((start, start + duration) for name, start, duration in events if marker in name)
    if len(marks) < 2:
        return float("-inf"), float("inf")
    return marks[0][1], marks[-1][0]


def window_events(events: list[Event], marker: str = WINDOW_MARKER) -> tuple[list[Event], bool]:
    """(the events inside `window_bounds`, markers left out; whether there were two markers)."""
    low, high = window_bounds(events, marker)
    if (low, high) == (float("-inf"), float("inf")):
        return events, False
    return [e for e in events if marker not in e[0] and low <= e[1] < high], True


class DeviceClock:
    """Wall time from construction to `elapsed_us()`: on CUDA between two events in the stream's order (nothing
    waits at the start, so steps timed from here find the device's queue as full as any others), else host clock
    readings."""

    def __init__(self, device: str) -> None:
        import torch

        self._start = time.perf_counter()
        self._event = None
        if device == "cuda":
            self._event = torch.cuda.Event(enable_timing=True)
            self._event.record()

    def elapsed_us(self) -> float:
        import torch

        if self._event is None:
            return (time.perf_counter() - self._start) * 1e6
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self._event.elapsed_time(end) * 1000


def timed_steps(step: Callable[[], object], steps: int, device: str) -> float:
    """ms a step over `steps` calls of `step`, timed as StepProfiler's window is, without the profiler."""
    clock = DeviceClock(device)
    for _ in range(steps):
        step()
    return clock.elapsed_us() / steps / 1000


class StepProfiler:
    """Profile a number of steps: `start()` one step before the first (a warm-up step), `begin()` before the
    first, `stop(steps)` after the last -> summary dict {steps, wall_ms_per_step, rows, syncs, table}.

    The profiler starts during the warm-up step (torch.profiler's schedule: one warm-up step, whose events are
    discarded), since its start holds the host for longer than the device's queue lasts: a window that began with
    it would start with launches the device waits for, idle gaps no other step has. On CUDA the window is timed on
    the device, between two events in the stream's order, and nothing waits at its start, so the profiled steps
    find the queue as full as the timed ones do. On a CPU both ends are host clock readings."""

    def __init__(self, device: str, title: str = "", trace: str | None = None) -> None:
        self.device, self.title, self.trace = device, title, trace
        self._profile, self._clock = None, None

    def profile(self, step: Callable[[], object], steps: int) -> dict:
        """Profile `steps` calls of `step` after one warm-up call: start, warm-up, begin, the steps, stop."""
        self.start()
        step()
        self.begin()
        for _ in range(steps):
            step()
        return self.stop(steps)

    def start(self) -> None:
        """Start the profiler, at the start of the warm-up step."""
        from torch.profiler import ProfilerActivity, profile, schedule

        # On CUDA the device's activity alone, unless the trace is kept: then the host's operators and launches
        # too, which say what the host did during each gap.
        activities = [ProfilerActivity.CPU] if self.trace or self.device != "cuda" else []
        if self.device == "cuda":
            activities.append(ProfilerActivity.CUDA)
        # recording from the first `begin` until `stop`, whatever the number of steps
        self._profile = profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=1 << 30))
        self._profile.__enter__()

    def begin(self) -> None:
        """The window opens: at the start of the first profiled step."""
        self._profile.step()  # from the warm-up to recording
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        self._sync_debug(True)
        self._mark()
        self._clock = DeviceClock(self.device)

    def _mark(self) -> None:
        """A WINDOW_MARKER kernel in the stream (CUDA), which the summary keeps the window's kernels between."""
        import torch

        if self.device == "cuda":
            torch.cuda._sleep(1)

    def _sync_debug(self, on: bool) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.set_sync_debug_mode("warn" if on else "default")

    def stop(self, steps: int) -> dict:
        self._sync_debug(False)
        self._mark()
        wall_us = self._clock.elapsed_us()
        self._warnings.__exit__(None, None, None)
        self._profile.__exit__(None, None, None)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            self._profile.export_chrome_trace(path)
            text = Path(path).read_text()
            exported = json.loads(text)
            events, marked = window_events(trace_events(exported))
            with_host = self.trace and self.device == "cuda"
            host = host_during_gaps(exported) if with_host else []
            lead = host_lead(exported, steps) if with_host else {}
            sites = launch_sites(exported, steps) if with_host else []
            if self.trace:
                with gzip.open(self.trace, "wt") as kept:
                    kept.write(text)
        rows = summarize(events, wall_us, steps)
        syncs = sync_sites(self._caught)
        gaps = idle_gaps(events, steps)
        table = markdown_table(rows) + "".join(f"\nhost waits at {site}: {count} times in {steps} steps"
                                               for site, count in syncs)
        top = top_kernels(events, steps)
        launched = top_kernels(events, steps, 10, by="calls")  # the launches a step's idle gaps come between
        table += ("\n" if syncs else "") + gaps_text(gaps) + (host_gaps_text(host) if host else "")
        table += host_lead_text(lead) + launch_sites_text(sites)
        table += top_kernels_text(top) + top_kernels_text(launched)
        if self.device == "cuda" and not marked:
            table += (f"\n(no two {WINDOW_MARKER} kernels in the trace: these figures count every kernel the "
                      f"profiler recorded, the warm-up step's last ones too)")
        return {"title": self.title, "steps": steps, "wall_ms_per_step": wall_us / steps / 1000, "kernels": len(events),
                "rows": rows, "syncs": syncs, "gaps": gaps, "host_during_gaps": host, "host_lead": lead,
                "launch_sites": sites,
                "top_kernels": top,
                "all_kernels": top_kernels(events, steps, None), "table": table}


def sync_sites(caught: list[warnings.WarningMessage]) -> list[tuple[str, int]]:
    """Where the warnings of `set_sync_debug_mode("warn")` came from, as (file:line, count), most first."""
    # torch's notice that the mode is a prototype ("... does not yet detect all synchronizing operations") is
    # raised where the mode is set, and is no wait.
    sites = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught
                                if "called a synchronizing" in str(w.message).lower())
    return sites.most_common()


def garbage_label(obj) -> str:
    """What CollectorTimes calls an unreachable object: its type's name, and for a function, frame or code
    object the code's qualified name and place, which say who made the cycle."""
    kind = type(obj)  # not isinstance: it asks a weakref proxy's dead referent for its class (ReferenceError)
    if kind is types.FunctionType:
        code = obj.__code__
    elif kind is types.FrameType:
        code = obj.f_code
    elif kind is types.CodeType:
        code = obj
    else:  # no attribute lookups on other objects: a class's __getattr__ could run anything
        return kind.__name__
    name = getattr(code, "co_qualname", code.co_name)
    return f"{kind.__name__} {name} ({Path(code.co_filename).name}:{code.co_firstlineno})"


try:
    import pytorch_lightning as pl

    class ProfileSteps(pl.Callback):
        """Profiles optimizer steps `first_step + 2 .. first_step + 1 + steps` of a Lightning run, after the
        warm-up step `first_step + 1` (StepProfiler), and writes the summary as JSON to `output` (the forgather
        run of scripts/bench_train.py adds it to its trainer); with `trace`, also the whole chrome trace, host
        operators included, gzipped there."""

        def __init__(self, first_step: int, steps: int, output: str, title: str = "", trace: str | None = None
                     ) -> None:
            self.first_step, self.steps, self.output, self.title, self.trace = first_step, steps, output, title, trace
            self._profiler: StepProfiler | None = None
            self._done = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self._done:
                return
            if self._profiler is None and trainer.global_step == self.first_step:
                self._profiler = StepProfiler(pl_module.device.type, self.title, self.trace)
                self._profiler.start()
            elif self._profiler is not None and trainer.global_step == self.first_step + 1:
                self._profiler.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self._profiler is not None and trainer.global_step >= self.first_step + 1 + self.steps:
                summary = self._profiler.stop(trainer.global_step - self.first_step - 1)
                self._profiler, self._done = None, True
                Path(self.output).write_text(json.dumps(summary))

    class MarkMeasured(pl.Callback):
        """After optimizer step `step`: the loggers write what they hold (Lightning's CSV logger keeps rows in
        memory for 100 steps), then the file `output` appears; scripts/bench_train.py stops the run there, not
        waiting for the end of fit's checkpoint and model export."""

        def __init__(self, step: int, output: str) -> None:
            self.step, self.output = step, output

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step >= self.step and not Path(self.output).exists():
                for logger in trainer.loggers:
                    logger.save()
                Path(self.output).touch()

    class CollectorTimes(pl.Callback):
        """The garbage collector's passes during optimizer steps `first_step + 1 .. last_step` (gc.callbacks):
        written as JSON to `output`, {steps, collections: {generation: count}, ms: {generation: total ms}, long:
        [[step, generation, ms] of each pass of at least LONG_PASS_MS], by_step: {step: passes}, freed: the
        objects the passes found unreachable (garbage in reference cycles), young: [[type, count]] the YOUNG_TYPES
        most common types in generations 0 and 1 at the last step (what the steps keep allocating: one 80-step
        run had ~11 passes a step where others had ~1.4), garbage: [[what, count]] the YOUNG_TYPES most common
        objects that the passes of step `garbage_step + 1` (default: the last) found unreachable (a function or
        frame by its code's name and place), kept for that one step with gc.DEBUG_SAVEALL, garbage_step: that
        step}. Runs that compiled from a cold cache made ~890 passes in 100 steps, ~840 of them in step 59 (the
        bench's epoch ends there with a short batch, and the layers compile again), against ~150 for a warm
        cache. A full pass can stop the host for most of a second, far longer than the device's queue lasts."""

        LONG_PASS_MS = 10.0
        YOUNG_TYPES = 8

        def __init__(self, first_step: int, last_step: int, output: str, garbage_step: int | None = None) -> None:
            self.first_step, self.last_step, self.output = first_step, last_step, output
            self.garbage_step = last_step - 1 if garbage_step is None else garbage_step
            if not first_step <= self.garbage_step < last_step:
                raise ValueError(f"CollectorTimes: garbage_step {self.garbage_step} is outside the measured steps "
                                 f"{first_step}..{last_step - 1} (the garbage of the step after it is named)")
            self.collections: collections.Counter = collections.Counter()
            self.seconds: collections.Counter = collections.Counter()
            self.long: list[list] = []
            self.by_step: collections.Counter = collections.Counter()
            self._began, self._step, self.freed = 0.0, 0, 0
            self.garbage: collections.Counter = collections.Counter()
            self._debug: int | None = None  # gc's debug flags before DEBUG_SAVEALL, while it is on
            self._saved = 0  # len(gc.garbage) then: what was there before is not ours to count or clear

        def _pass(self, phase: str, info: dict) -> None:
            if phase == "start":
                self._began = time.perf_counter()
            else:
                seconds = time.perf_counter() - self._began
                self.collections[info["generation"]] += 1
                self.seconds[info["generation"]] += seconds
                self.by_step[self._step + 1] += 1
                self.freed += info.get("collected", 0)
                if seconds * 1000 >= self.LONG_PASS_MS:
                    self.long.append([self._step, info["generation"], seconds * 1000])

        def _name_the_garbage(self) -> None:
            """DEBUG_SAVEALL off again, and what it kept counted and let go."""
            import gc

            gc.set_debug(self._debug)
            self._debug = None
            self.garbage.update(map(garbage_label, gc.garbage[self._saved:]))
            del gc.garbage[self._saved:]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            import gc

            self._step = trainer.global_step  # a pass before the next batch's end counts as the next step's
            if trainer.global_step == self.first_step and self._pass not in gc.callbacks:
                gc.callbacks.append(self._pass)
            if self._debug is not None:
                self._name_the_garbage()
            elif trainer.global_step == self.garbage_step and self._pass in gc.callbacks:
                self._debug, self._saved = gc.get_debug(), len(gc.garbage)
                gc.set_debug(self._debug | gc.DEBUG_SAVEALL)
            if trainer.global_step >= self.last_step and self._pass in gc.callbacks:
                gc.callbacks.remove(self._pass)
                young = collections.Counter(type(o).__name__ for g in (0, 1) for o in gc.get_objects(generation=g))
                Path(self.output).write_text(json.dumps({
                    "steps": trainer.global_step - self.first_step, "collections": dict(self.collections),
                    "ms": {generation: 1000 * s for generation, s in self.seconds.items()}, "long": self.long,
                    "by_step": dict(self.by_step), "freed": self.freed,
                    "young": [list(pair) for pair in young.most_common(self.YOUNG_TYPES)],
                    "garbage": [list(pair) for pair in self.garbage.most_common(self.YOUNG_TYPES)],
                    "garbage_step": self.garbage_step + 1}))

        def teardown(self, trainer, pl_module, stage: str) -> None:
            if self._debug is not None:  # a run that ended inside the named step
                self._name_the_garbage()

except ImportError:  # the summarizer alone needs no Lightning
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trace", help="a chrome trace (torch.profiler export_chrome_trace; .json or .json.gz)")
    parser.add_argument("--steps", type=int, default=1, help="how many steps the trace holds")
    parser.add_argument("--wall-ms", type=float, help="the traced window's wall time (default: first to last event)")
    args = parser.parse_args()
    opener = gzip.open if args.trace.endswith(".gz") else open  # the bench keeps its traces gzipped
    with opener(args.trace, "rt") as file:
        trace = json.load(file)
    events = trace_events(trace)
    if not events:
        raise SystemExit(f"{args.trace}: no kernel or operator events in this trace")
    span = max(s + d for _, s, d in events) - min(s for _, s, _ in events)
    print(markdown_table(summarize(events, args.wall_ms * 1000 if args.wall_ms else span, args.steps)))
    print(gaps_text(idle_gaps(events, args.steps)))
    host = host_during_gaps(trace)
    if any("host" in row for row in host):
        print(host_gaps_text(host))
    print(host_lead_text(host_lead(trace, args.steps)), end="")


if __name__ == "__main__":
    main()
