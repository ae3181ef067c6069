"""Benchmark a training step through `python -m forgather.run` against the strongest alternatives, one run.

Every path trains the same shape on the same tokens per step, in pure bf16 (`--shape`):
  1b    the 1.24B Llama-3.2-1B shape (hidden 2048, 16 layers, 32 / 8 heads, SwiGLU 8192, vocab 128256, tied),
        4 x 2048 tokens, AdamW (the HF loops: torch's fused kernel; forgather: optimizer=adamw, TritonAdamW), no
        gradient clipping
  7b    bench_memory's Llama-2-7B shape (hidden 4096, 32 layers, 32 heads, SwiGLU 11008, vocab 32000, untied),
        8 x 2048 tokens, Triton Adafactor (optimizer=adafactor_triton), no activation checkpointing
  tiny  a few-thousand-parameter Llama, 2 x 64 tokens, fp32: with `--device cpu` it checks this script itself
Paths (`--paths`, each run in a process of its own, so each frees its GPU memory and a crash or an exception
becomes a row with its error while the other rows go on):
  hf                transformers.LlamaForCausalLM, SDPA attention, logits then cross-entropy, a plain loop
  hf-compile        the same model under torch.compile
  hf-liger          liger_kernel's apply_liger_kernel_to_llama() before the model is built (RMSNorm, RoPE,
                    SwiGLU kernels; in training mode its forward computes the loss with Liger's fused linear
                    cross-entropy, no logits), eager
  hf-liger-compile  the same under torch.compile
  torchtitan        torchtitan's Llama 3 trainer on this shape (`torchtitan_worker`), compiled; `torchtitan-eager` not
  forgather         python -m forgather.run: our model, loss=fused, attention_fn=packed (our Triton kernels for
                    packed documents; flex before 2026-12-04, `--attention flex`), per-layer torch.compile,
                    Lightning Trainer(precision=bf16-true); `--variant NAME OVERRIDE...` adds more such runs
                    (an item `env:NAME=VALUE` sets an environment variable of that run only)
  memory24          bench_memory's 24 GiB configuration (7B shape, one 24,576-token row, activation
                    checkpointing, Adafactor in backward, MLP chunks of 4096 tokens): step time, MFU, peak
Timing: tokens over the wall time of windows of `--log-every` steps (the host waits for the device only at
window ends; for forgather runs this is the run's own `train/tokens_per_s`), median of the last two thirds of
the windows. MFU against 989 TFLOP/s (H100/H200 dense bf16 datasheet), counting model FLOPs only: 6 x matmul
parameters (the tied head once) + causal attention (6 x layers x hidden x sequence) per token.
`--profile NAME...` profiles `--profile-steps` more steps of those paths after their timed steps and one warm-up step
(scripts/profile_train.py: kernel time per category, idle gaps) into the summary. `--clocks` samples the GPU's
SM clock and power while each path runs (nvidia-smi) into its row's note: whether the power cap sets the pace.

    python scripts/bench_train.py [--shape 1b] [--paths hf hf-liger forgather ...] [--steps 30] [--out DIR]
        [--variant NAME OVERRIDE ...] [--profile forgather hf-liger] [--set OVERRIDE ...] [--clocks]
    python scripts/bench_train.py --shape tiny --device cpu     (the smoke test of every path on a CPU)
`--out DIR` writes results_LABEL.json and summary_LABEL.md (LABEL: `--label`, default the shape) after every
row, `--append` adds rows to that file's; `--tiny` keeps a shape's name and settings with the tiny dimensions,
so `--device cpu --tiny` rehearses a GPU command on a CPU (scripts/gpu_check_train.sh: REHEARSE=1).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
PEAK_FLOPS = 989e12
SHAPES = {
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tied=True,
               batch=4, seq=2048, optimizer="adamw"),
    "7b": dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000, tied=False,
               batch=8, seq=2048, optimizer="adafactor_triton"),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=4096, tied=True,
                 batch=2, seq=64, optimizer="adamw"),
}
HF_PATHS = ("hf", "hf-compile", "hf-liger", "hf-liger-compile")
TITAN_PATHS = ("torchtitan", "torchtitan-eager")
ALL_PATHS = (*HF_PATHS, *TITAN_PATHS, "forgather", "memory24")
MEMORY24_TOKENS, MEMORY24_MLP_CHUNK = 24576, 4096


def flops_per_token(shape: dict, seq: int) -> float:
    """6 x matmul parameters (the output head once, tied or not) + causal attention (6 L d T)."""
    d, layers = shape["hidden"], shape["layers"]
    kv = d * shape["kv_heads"] // shape["heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * shape["intermediate"]
    return 6 * (layers * per_layer + shape["vocab"] * d) + 6 * layers * d * seq


def mfu(shape: dict, seq: int, tokens_per_s: float) -> float:
    return tokens_per_s * flops_per_token(shape, seq) / PEAK_FLOPS


def median_of_late_windows(rates: list[float]) -> float:
    """The median of the last two thirds of the windows: the first ones hold compilation and warm-up."""
    if not rates:
        raise RuntimeError("no timed window: raise --steps to at least twice --log-every")
    return statistics.median(rates[len(rates) // 3:])


# Hugging Face loops (run in a worker process: `--worker hf-liger` ...)

def hf_worker(args: argparse.Namespace, shape: dict, path: str) -> dict:
    import torch

    if "liger" in path:
        # Patches transformers' Llama classes, so it must come before the model is built.
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    from transformers import LlamaConfig, LlamaForCausalLM

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = LlamaConfig(
        hidden_size=shape["hidden"], num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], intermediate_size=shape["intermediate"], vocab_size=shape["vocab"],
        tie_word_embeddings=shape["tied"], max_position_embeddings=shape["seq"], attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialized where it trains: a 1.24B init on the host takes many seconds
        model = LlamaForCausalLM(config).to(dtype)
    model.train()  # Liger's forward skips the logits (fused linear cross-entropy) only in training mode
    forward = torch.compile(model) if path.endswith("compile") else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), device=device)
    tokens = shape["batch"] * shape["seq"]

    def step() -> None:
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rates = []
    sync()
    start = time.perf_counter()
    for index in range(1, args.steps + 1):
        step()
        if index % args.log_every == 0:
            sync()
            now = time.perf_counter()
            rates.append(args.log_every * tokens / (now - start))
            start = now
    result = {"tokens_per_s": median_of_late_windows(rates), "windows": rates}
    if device == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if path in args.profile:
        result["profile"] = profile_steps(step, args.profile_steps, device, path)
    return result


def profile_steps(step, steps: int, device: str, title: str) -> dict:
    sys.path.insert(0, str(HERE))
    from profile_train import StepProfiler

    return StepProfiler(device, title).profile(step, steps)


# bench_memory's 24 GiB configuration (worker `memory24`)

def memory24_worker(args: argparse.Namespace) -> dict:
    """bench_memory's model, loss and in-backward Adafactor at 24,576 tokens (tiny shape and 256 tokens on a
    CPU): one warm-up step, then the median of `--memory-steps` steps."""
    import functools

    import torch

    spec = importlib.util.spec_from_file_location("bench_memory", HERE / "bench_memory.py")
    bench_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_memory)
    from forgather.optim.in_backward import OptimizerInBackward

    cuda = args.device == "cuda"
    shape_name, tokens, chunk = ("LLAMA_7B", MEMORY24_TOKENS, MEMORY24_MLP_CHUNK) if cuda else ("TINY", 256, 64)
    memory_shape = getattr(bench_memory, shape_name)
    if cuda:
        from forgather.loss.fused import FusedLoss as Loss
        from forgather.optim import TritonAdafactor as Adafactor
    else:
        from forgather.loss.chunked import ChunkedLoss as Loss
        from forgather.optim import Adafactor
    torch.manual_seed(0)
    with torch.device(args.device):
        model = bench_memory.build_model(memory_shape, chunk).to(torch.bfloat16)
    optimizer = OptimizerInBackward(model.parameters(), functools.partial(Adafactor, lr=1e-5))
    loss_fn = Loss()
    peaks, seconds = zip(*(bench_memory.step_peak(model, loss_fn, optimizer, tokens, args.device)
                           for _ in range(1 + args.memory_steps)))
    step_s = statistics.median(seconds[1:])
    shape = dict(hidden=memory_shape["hidden"], layers=memory_shape["layers"], heads=memory_shape["heads"],
                 kv_heads=memory_shape["heads"], intermediate=memory_shape["intermediate"], vocab=memory_shape["vocab"])
    result = {"tokens_per_s": tokens / step_s, "step_s": step_s, "warmup_s": seconds[0], "tokens": tokens,
              "mfu": mfu(shape, tokens, tokens / step_s)}
    return {**result, "peak_gib": max(peaks)} if cuda else result


# torchtitan (worker `torchtitan` / `torchtitan-eager`; needs the packages of .whl_titan/)

def torchtitan_worker(args: argparse.Namespace, shape: dict, path: str) -> dict:
    """torchtitan's own Trainer on this shape: a Llama 3 flavor registered here (its `_1B` flavor is the same
    1.24B shape; 7b and tiny are not among its flavors), random weights, random tokens of one document per row
    (no tokenizer, no download), pure bf16 (training.dtype), fused AdamW, flex attention, no activation
    checkpointing, no checkpoints; torch.compile of model and loss unless `-eager`. Its loop keeps what it
    always does (gradient clipping at norm 1, its chunked cross-entropy). Timed by windows of train_step."""
    import dataclasses

    import torch

    from forgather.ports import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))  # for its single-rank process group
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.dataloader import BaseDataLoader
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.components.optimizer import default_adamw
    from torchtitan.components.tokenizer import BaseTokenizer
    from torchtitan.config import CompileConfig, TrainingConfig
    from torchtitan.models import llama3
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.config_utils import decoder_vocab_size
    from torchtitan.trainer import Trainer

    batch, seq, vocab = shape["batch"], shape["seq"], shape["vocab"]

    class NoTokenizer(BaseTokenizer):
        """The data are token ids already: nothing to encode."""

        @dataclasses.dataclass(kw_only=True, slots=True)
        class Config(BaseTokenizer.Config):
            pass

        def __init__(self, config, tokenizer_path=None, **kwargs) -> None:
            super().__init__()

        def encode(self, *args, **kwargs) -> list[int]:
            raise NotImplementedError("the benchmark feeds token ids")

        def decode(self, *args, **kwargs) -> str:
            raise NotImplementedError("the benchmark feeds token ids")

        def get_vocab_size(self) -> int:
            return vocab

    class RandomTokens(BaseDataLoader):
        """Endless batches of random token ids, one document per row (positions 0..T-1)."""

        @dataclasses.dataclass(kw_only=True, slots=True)
        class Config(BaseDataLoader.Config):
            pass

        def __init__(self, config, *, local_batch_size: int, seq_len: int, **kwargs) -> None:
            generator = torch.Generator().manual_seed(0)
            self.ids = torch.randint(0, vocab, (local_batch_size, seq_len + 1), generator=generator)
            self.positions = torch.arange(seq_len).expand(local_batch_size, seq_len).contiguous()

        def __iter__(self):
            while True:
                yield {"input": self.ids[:, :-1], "positions": self.positions}, self.ids[:, 1:]

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state_dict: dict) -> None:
            pass

    def flavor(attn_backend: str, tp_gemm_backend: str = "default"):
        dim, heads = shape["hidden"], shape["heads"]
        head = Linear.Config(in_features=dim, out_features=vocab, param_init=llama3._output_linear_init(dim))
        return llama3.Llama3Model.Config(
            dim=dim, vocab_size=vocab, enable_weight_tying=shape["tied"],
            tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim,
                                            param_init=llama3._EMBEDDING_INIT),
            norm=RMSNorm.Config(normalized_shape=dim, param_init=llama3._NORM_INIT), lm_head=head,
            layers=llama3._build_llama3_layers(
                n_layers=shape["layers"], dim=dim, n_heads=heads, n_kv_heads=shape["kv_heads"],
                hidden_dim=shape["intermediate"], attn_backend=attn_backend, tp_gemm_backend=tp_gemm_backend,
                rope=ComplexRoPE.Config(dim=dim // heads, max_seq_len=seq, theta=500000, scaling="llama"),
            ),
        )

    llama3.llama3_configs["forgather_bench"] = flavor
    spec = llama3.model_registry("forgather_bench", attn_backend="flex")
    with tempfile.TemporaryDirectory() as tmp:
        config = Trainer.Config(
            model_spec=spec, dump_folder=tmp, hf_assets_path=tmp,
            loss=ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=decoder_vocab_size(spec))),
            optimizer=default_adamw(lr=1e-4),
            training=TrainingConfig(local_batch_size=batch, seq_len=seq, steps=args.steps, dtype="bfloat16"),
            tokenizer=NoTokenizer.Config(), dataloader=RandomTokens.Config(),
            metrics=MetricsProcessor.Config(log_freq=args.log_every),
            checkpoint=CheckpointManager.Config(enable=False), activation_checkpoint=None,
            compile=CompileConfig(enable=not path.endswith("eager")),
        )
        trainer = config.build()
        rates, window = [], {"steps": 0, "start": time.perf_counter()}
        train_step = trainer.train_step

        def timed_step(*step_args, **step_kwargs):
            train_step(*step_args, **step_kwargs)
            window["steps"] += 1
            if window["steps"] % args.log_every == 0:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                rates.append(args.log_every * batch * seq / (now - window["start"]))
                window["start"] = now

        trainer.train_step = timed_step
        try:
            trainer.train()
        finally:
            trainer.close()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    import torchtitan

    result = {"tokens_per_s": median_of_late_windows(rates), "version": torchtitan.__version__}
    return {**result, "peak_gib": torch.cuda.max_memory_allocated() / 2**30} if args.device == "cuda" else result


# forgather.run

BENCH_TEMPLATE = """\
## The {shape} shape of scripts/bench_train.py on the stdlib corpus.
-- set model = '{model}'
-- set trainer = '{trainer}'
-- set loss = '{loss}'
-- set default_block_size = {seq}
-- set default_batch_size = {batch}
-- extends 'experiment/tiny_llama.yaml'
{trainer_block}"""

# The bench's callbacks join the trainer's through a sub-template that extends the trainer template (an included
# template's blocks are its own: see examples/projects_overview/templates/configs/callbacks.yaml). trainer/gpu.yaml
# includes trainer/cpu.yaml, so its callbacks block is out of reach: on a GPU the sub-template extends cpu.yaml
# with gpu.yaml's settings. `measured` writes the loggers' rows and a marker once the steps the bench reads are
# done (after the profiled ones), so the bench stops the run there (run_process's `finished`).
GPU_TRAINER_SETS = "-- set accelerator = 'gpu'\n-- set precision = precision | default('bf16-true')\n"
BENCH_TRAINER_BLOCK = """
[trainer]
-- include 'bench.trainer'

#---------------- bench.trainer ----------------
{trainer_sets}-- extends 'trainer/cpu.yaml'
[trainer_callbacks]
== super()
{profile}        measured: !singleton:{script}:MarkMeasured
            step: {last_step}
            output: {marker}
        gc_times: !singleton:{script}:CollectorTimes
            first_step: {log_every}
            last_step: {timed_steps}
            output: {collector}
            garbage_step: {garbage_step}
"""
PROFILE_CALLBACK = """        profile: !singleton:{script}:ProfileSteps
            first_step: {first_step}
            steps: {steps}
            output: {output}
            title: {title}
            trace: {trace}
"""


# The override that gives an optimizer template torch's fused AdamW kernel (our own AdamW does not take it).
# optimizer=adamw is TritonAdamW, faster than torch's fused kernel (docs/benchmarks.md): the default's row runs it
# as a user's run would; `--variant torch-fused ++optimizer.fused=true` is torch's fused step.
FUSED_ADAMW = {"adamw_in_backward": ["++optimizer.optimizer_factory.fused=true"]}


def forgather_command(args: argparse.Namespace, shape: dict, tmp: Path, name: str, overrides: list[str]) -> list[str]:
    cpu = args.device == "cpu"
    profile = name in args.profile
    model = "llama" if args.tiny else {"1b": "llama_1b", "7b": "llama_7b"}.get(args.shape, "llama")
    trainer = "cpu" if cpu else "gpu"
    project = tmp / "bench"
    (project / "templates" / "configs").mkdir(parents=True)
    (project / "meta.yaml").write_text("name: bench\n")
    script = HERE / "profile_train.py"
    # One step past the timed ones when nothing is profiled: the last timed window's row is logged by then; when
    # profiled, the profiler's warm-up step and the profiled ones.
    last_step = args.steps + (1 + args.profile_steps if profile else 1)
    profile_callback = PROFILE_CALLBACK.format(script=script, first_step=args.steps, steps=args.profile_steps,
                                               output=tmp / "profile.json", title=json.dumps(name),
                                               trace=json.dumps(str(Path(args.out or tmp) / f"trace_{_slug(name)}.json.gz")
                                                                if args.profile_trace else None))
    trainer_block = BENCH_TRAINER_BLOCK.format(
        trainer_sets="" if cpu else GPU_TRAINER_SETS, profile=profile_callback if profile else "", script=script,
        last_step=last_step, marker=tmp / MEASURED, log_every=args.log_every, timed_steps=args.steps,
        collector=tmp / COLLECTOR, garbage_step="null" if args.garbage_step is None else args.garbage_step)
    (project / "templates" / "configs" / "bench.yaml").write_text(BENCH_TEMPLATE.format(
        shape=args.shape, model=model, trainer=trainer, loss="chunked" if cpu else args.loss, seq=shape["seq"],
        batch=shape["batch"], trainer_block=trainer_block,
    ))
    # A variant's own `optimizer=...` picks its optimizer (and leaves out the fused flag of torch's AdamW).
    chosen = [override.split("=", 1)[1] for override in overrides if override.startswith("optimizer=")]
    overrides = [override for override in overrides if not override.startswith("optimizer=")]
    optimizer = chosen[-1] if chosen else args.optimizer or SHAPES[args.shape]["optimizer"]
    if cpu and optimizer == "adafactor_triton":
        optimizer = "adafactor"  # the same algorithm without Triton
    sizes = [f"hidden_size={shape['hidden']}", f"num_layers={shape['layers']}", f"num_heads={shape['heads']}",
             f"num_kv_heads={shape['kv_heads']}", f"intermediate_size={shape['intermediate']}"]
    return [
        sys.executable, "-m", "forgather.run", "-p", str(project), "--outputs", str(tmp), "+experiment=bench",
        f"max_steps={last_step}", f"log_every_n_steps={args.log_every}",
        "val_check_interval=100000", "limit_val_batches=0", "checkpoint_every=100000",
        f"model.vocab_size={shape['vocab']}", *sizes, f"optimizer={optimizer}",
        *FUSED_ADAMW.get(optimizer, []),
        "gradient_clip_val=null",  # the HF loops do not clip either
        f"compile={'false' if cpu or args.no_compile else 'true'}", f"attention_fn={args.attention}",
        *args.set, *overrides,
    ]


def _slug(name: str) -> str:
    """A variant's name as part of a file name."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)


def logged_rates(tmp: Path) -> list[float]:
    """The run's train/tokens_per_s rows."""
    (metrics,) = tmp.glob("outputs/bench/*/csv/metrics.csv")
    with open(metrics, newline="") as file:
        return [float(r["train/tokens_per_s"]) for r in csv.DictReader(file) if r.get("train/tokens_per_s")]


MEASURED = "measured"  # the marker MarkMeasured writes in the run's temporary directory
COLLECTOR = "collector.json"  # CollectorTimes's record of the garbage collector's passes, beside it


def forgather_result(args: argparse.Namespace, tmp: Path, name: str) -> dict:
    rates = logged_rates(tmp)[: args.steps // args.log_every]  # the windows before the profiled steps
    result = {"tokens_per_s": median_of_late_windows(rates), "windows": rates}
    collector = tmp / COLLECTOR
    if collector.exists():  # the garbage collector's passes after the first window (CollectorTimes)
        result["gc"] = json.loads(collector.read_text())
    if name in args.profile:
        result["profile"] = json.loads((tmp / "profile.json").read_text())
    return result


# Running each path in a process of its own

def run_process(command: list[str], timeout: float, finished: Callable[[], bool] | None = None,
                env: dict[str, str] | None = None) -> tuple[int | None, list[str]]:
    """Run `command` in a session of its own, echoing its output; kill the session's processes (data loader
    workers, compile workers too) after `timeout` seconds, or as soon as `finished()` says everything to
    measure is written (status 0 then: a forgather run's end of fit writes its last checkpoint and exports
    the model, 13.5 GB each at 7B, which the bench does not need). Returns (exit status, or None when timed
    out, and the output lines)."""
    print("$", " ".join([*(f"{key}={value}" for key, value in (env or {}).items()), *command]), flush=True)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    lines: list[str] = []
    timer_fired = False
    done = threading.Event()

    def kill() -> None:
        nonlocal timer_fired
        timer_fired = True
        os.killpg(process.pid, signal.SIGKILL)

    def watch() -> None:
        while not done.wait(0.5):
            if finished():
                done.set()
                os.killpg(process.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    watcher = threading.Thread(target=watch, daemon=True) if finished is not None else None
    if watcher is not None:
        watcher.start()
    try:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            print("    " + line, end="", flush=True)
        process.wait()
    finally:
        timer.cancel()
        early = done.is_set()
        done.set()
    if early and not timer_fired:
        print("    (stopped: what the bench measures is written)", flush=True)
        return 0, lines
    return (None if timer_fired else process.returncode), lines


EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b:?.*)$")


def failure(status: int | None, lines: list[str], timeout: float) -> str:
    """One line saying why a path gave no result: the timeout, or the last exception line of its output
    (`Name: message`, also behind torch.distributed's `[rank0]:` prefix), else its last line."""
    if status is None:
        return f"killed after the piece's timeout of {timeout:.0f} s"
    for line in reversed(lines):
        match = EXCEPTION_LINE.match(line.strip())
        if match:
            return match.group(1)[:300]
    tail = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
    return f"exit status {status}: {tail[:300]}"


class GpuClocks:
    """The GPU's SM clock and power sampled by nvidia-smi every 250 ms while a path runs (`--clocks`), summarized
    over the samples under load (power above half the limit, which leaves out compiling and loading): why a
    step whose kernels got shorter can run no faster. On an H100 (2026-12-06) both bar paths drew ~690 W of the
    700 W limit with the software power cap active, the SM clock ~1,650-1,680 MHz instead of its 1,980 boost: a
    power-bound step pays for the energy its kernels use, and memory-bound time saved lets the products run
    hotter at a lower clock."""

    FIELDS = ("clocks.sm", "power.draw", "power.limit")
    CAP_FIELDS = ("clocks_event_reasons.sw_power_cap", "clocks_throttle_reasons.sw_power_cap")  # new, old name

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.output = ""

    def __enter__(self) -> "GpuClocks":
        if shutil.which("nvidia-smi") is None:  # a CPU rehearsal: rows without clocks
            return self
        cap = next((field for field in self.CAP_FIELDS if subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader", "-i", "0"],
            capture_output=True).returncode == 0), None)
        fields = ",".join([*self.FIELDS, *([cap] if cap else [])])
        self.process = subprocess.Popen(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits",
                                         "-lms", "250", "-i", "0"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.output = self.process.communicate()[0]

    def summary(self) -> dict | None:
        return clock_summary(self.output.splitlines())


def clock_summary(lines: list[str]) -> dict | None:
    """nvidia-smi's CSV rows (SM MHz, power W, limit W[, power cap Active/Not Active]) -> medians under load."""
    rows = []
    for line in lines:
        values = [value.strip() for value in line.split(",")]
        try:
            rows.append((float(values[0]), float(values[1]), float(values[2]), values[3:4]))
        except (ValueError, IndexError):  # "[N/A]", a partial line at the end
            continue
    loaded = [row for row in rows if row[1] > row[2] / 2]
    if not loaded:
        return None
    capped = [row[3][0] == "Active" for row in loaded if row[3]]
    return {"sm_mhz": statistics.median(row[0] for row in loaded),
            "power_w": statistics.median(row[1] for row in loaded), "power_limit_w": loaded[0][2],
            "samples": len(loaded), "power_capped": sum(capped) / len(capped) if capped else None}


def clock_note(clocks: dict, tokens_per_s: float | None = None) -> str:
    """The row's clock note; with the row's throughput, the energy a token takes at the median power."""
    capped = "" if clocks["power_capped"] is None else f", power cap {100 * clocks['power_capped']:.0f}% of them"
    energy = f", {1e3 * clocks['power_w'] / tokens_per_s:.2f} mJ a token" if tokens_per_s else ""
    return (f"SM {clocks['sm_mhz']:.0f} MHz, {clocks['power_w']:.0f} of {clocks['power_limit_w']:.0f} W{energy} "
            f"({clocks['samples']} samples under load{capped})")


def run_path(args: argparse.Namespace, shape: dict, name: str, overrides: list[str] | None) -> dict:
    """One row: `overrides` is a list for forgather runs (the `forgather` path and each variant), else None."""
    if args.clocks:
        with GpuClocks() as clocks:
            result = run_path_measured(args, shape, name, overrides)
        summary = clocks.summary()
        if summary is not None:
            result["clocks"] = summary
        return result
    return run_path_measured(args, shape, name, overrides)


def run_path_measured(args: argparse.Namespace, shape: dict, name: str, overrides: list[str] | None) -> dict:
    start = time.perf_counter()
    if overrides is not None:
        env, run_overrides = variant_environment(overrides)
        with tempfile.TemporaryDirectory() as tmp:
            command = forgather_command(args, shape, Path(tmp), name, run_overrides)
            status, lines = run_process(command, args.timeout, (Path(tmp) / MEASURED).is_file, env)
            try:
                result = forgather_result(args, Path(tmp), name) if status == 0 else {
                    "error": failure(status, lines, args.timeout)}
            except Exception as error:
                result = {"error": f"{type(error).__name__}: {error}"}
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, *worker_args(args)]
        status, lines = run_process(command, args.timeout)
        results = [line[len("RESULT "):] for line in lines if line.startswith("RESULT ")]
        result = json.loads(results[-1]) if status == 0 and results else {"error": failure(status, lines, args.timeout)}
    result["wall_s"] = time.perf_counter() - start
    result["name"] = name + (" " + " ".join(overrides) if overrides else "")
    if "tokens_per_s" in result and "mfu" not in result:
        result["mfu"] = mfu(shape, shape["seq"], result["tokens_per_s"])
    print(f"--- {result['name']}: " + (f"{result['tokens_per_s']:.0f} tokens/s, MFU {100 * result['mfu']:.1f}%"
                                      if "tokens_per_s" in result else f"ERROR {result['error']}")
          + f", {result['wall_s']:.0f} s wall", flush=True)
    return result


ENV_PREFIX = "env:"


def variant_environment(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """A variant's `env:NAME=VALUE` items (environment variables of its run only, e.g. cuBLAS's
    `env:CUBLAS_WORKSPACE_CONFIG=:0:0`, read when the library starts) apart from its overrides."""
    env, rest = {}, []
    for item in overrides:
        if item.startswith(ENV_PREFIX):
            key, sep, value = item[len(ENV_PREFIX):].partition("=")
            if not key or not sep:
                raise SystemExit(f"bench_train: variant item {item!r}: write env:NAME=VALUE")
            env[key] = value
        else:
            rest.append(item)
    return env, rest


def worker_args(args: argparse.Namespace) -> list[str]:
    return ["--shape", args.shape, *(["--tiny"] if args.tiny else []), "--device", args.device, "--steps", str(args.steps), "--log-every",
            str(args.log_every), "--profile-steps", str(args.profile_steps), "--memory-steps", str(args.memory_steps),
            "--profile", *args.profile]


def window_note(result: dict) -> str:
    """A forgather row's timed windows (tokens/s, in thousands) and the garbage collector's time in its steps."""
    note = "windows " + " ".join(f"{rate / 1000:.1f}k" for rate in result["windows"])
    collector = result.get("gc")
    if collector and collector["steps"]:
        passes = sum(collector["collections"].values())
        note += f"; gc {passes} passes, {sum(collector['ms'].values()) / collector['steps']:.2f} ms a step"
        note += "".join(f", {ms:.0f} ms at step {step + 1}" for step, _, ms in collector.get("long", [])[:4])
        if "freed" in collector:
            note += f", {collector['freed']} freed"
        if collector.get("young"):
            note += ", young " + " ".join(f"{name} {count}" for name, count in collector["young"][:3])
        if collector.get("garbage"):
            note += f"; step {collector.get('garbage_step', '?')}'s garbage: " + ", ".join(
                f"{count} {what}" for what, count in collector["garbage"])
    return note


def summary_table(results: list[dict], shape: dict, args: argparse.Namespace) -> str:
    reference = next((r for r in results if r["name"] == "hf-liger" and "tokens_per_s" in r), None)
    lines = [f"shape {args.shape} ({shape['batch']} x {shape['seq']} tokens a step), device {args.device}\n",
             "| path | tokens/s | MFU | vs hf-liger | wall s | note |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        if "tokens_per_s" in r:
            ratio = f"{r['tokens_per_s'] / reference['tokens_per_s']:.3f}x" if reference and r["name"] != "memory24" else ""
            note = (f"{r['step_s']:.2f} s a {r['tokens']}-token step, warm-up {r['warmup_s']:.1f} s"
                    if "step_s" in r else "")
            note += f"{'; ' if note else ''}peak {r['peak_gib']:.2f} GiB" if "peak_gib" in r else ""
            note += f"{'; ' if note else ''}{window_note(r)}" if "windows" in r else ""
            note += f"{'; ' if note else ''}{clock_note(r['clocks'], r['tokens_per_s'])}" if "clocks" in r else ""
            lines.append(f"| {r['name']} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | {ratio} | "
                         f"{r['wall_s']:.0f} | {note} |")
        else:
            lines.append(f"| {r['name']} | | | | {r['wall_s']:.0f} | ERROR: {r['error'].replace('|', '/')} |")
    text = "\n".join(lines) + "\n"
    for r in results:
        if "profile" in r:
            profile = r["profile"]
            text += (f"\nprofile of {r['name']}: {profile['steps']} steps, {profile['wall_ms_per_step']:.1f} ms "
                     f"wall a step, {profile['kernels']} kernels\n\n{profile['table']}")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny dimensions under the shape's name: a CPU rehearsal of a GPU command")
    parser.add_argument("--paths", nargs="*", choices=ALL_PATHS, default=None,
                        help="default: every HF path, torchtitan and forgather (1b, tiny); forgather and memory24 (7b)")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "OVERRIDE"),
                        help="one more forgather run named NAME with these overrides (repeatable)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5, help="window length (forgather: log_every_n_steps)")
    parser.add_argument("--profile", nargs="*", default=[], metavar="NAME", help="paths or variants to profile")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--clocks", action="store_true",
                        help="sample the GPU's SM clock and power (nvidia-smi) while each path runs: medians under "
                             "load and how often the power cap held the clock, in each row's note")
    parser.add_argument("--profile-trace", action="store_true",
                        help="keep each profiled forgather run's chrome trace, host operators included, as "
                             "OUT/trace_NAME.json.gz (what the host did during each gap of the device's)")
    parser.add_argument("--memory-steps", type=int, default=3, help="memory24: timed steps after the warm-up")
    parser.add_argument("--garbage-step", type=int, default=None,
                        help="forgather rows name the garbage collected in the step after this one (default: the "
                             "last timed step's)")
    parser.add_argument("--loss", default="fused", help="loss group option for forgather runs (cpu: chunked)")
    parser.add_argument("--optimizer", default=None, help="optimizer group option (default: the shape's)")
    parser.add_argument("--no-compile", action="store_true", help="forgather runs with compile=false")
    parser.add_argument("--attention", default="packed", help="attention_fn of our model")
    parser.add_argument("--set", nargs="*", default=[], metavar="OVERRIDE", help="more overrides for every forgather run")
    parser.add_argument("--timeout", type=float, default=300, help="seconds each path may take before it is killed")
    parser.add_argument("--out", type=Path, help="write results_LABEL.json and summary_LABEL.md here")
    parser.add_argument("--label", help="the output files' LABEL (default: the shape)")
    parser.add_argument("--append", action="store_true", help="add the rows to those of --out's results_LABEL.json")
    parser.add_argument("--worker", choices=(*HF_PATHS, *TITAN_PATHS, "memory24"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.paths is None:
        args.paths = ["forgather", "memory24"] if args.shape == "7b" else [*HF_PATHS, "torchtitan", "forgather"]
    if args.steps < 2 * args.log_every:
        parser.error(f"--steps {args.steps} gives fewer than two windows of --log-every {args.log_every}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shape = SHAPES["tiny"] if args.tiny else SHAPES[args.shape]
    if args.worker:
        if args.worker == "memory24":
            result = memory24_worker(args)
        elif args.worker in TITAN_PATHS:
            result = torchtitan_worker(args, shape, args.worker)
        else:
            result = hf_worker(args, shape, args.worker)
        print("RESULT " + json.dumps(result), flush=True)
        return
    runs = [(name, [] if name == "forgather" else None) for name in args.paths]
    runs += [(variant[0], variant[1:]) for variant in args.variant]
    label = args.label or args.shape
    previous = args.out / f"results_{label}.json" if args.out else None
    results = json.loads(previous.read_text()) if args.append and previous and previous.exists() else []
    for name, overrides in runs:
        results.append(run_path(args, shape, name, overrides))
        text = summary_table(results, shape, args)
        if args.out:  # after every row: a run cut short by the device's time limit keeps the rows it made
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"results_{label}.json").write_text(json.dumps(results, indent=1))
            (args.out / f"summary_{label}.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
