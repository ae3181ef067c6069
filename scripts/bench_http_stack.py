"""The HTTP layer of `forgather inf server` on the CPU, without a model: how many streamed tokens a second the
openai client and our app each carry, so a GPU measurement of many streams knows which of them it measures.

  client   a stand-in server (FastAPI + uvicorn, nothing else) sends each of N streams one completion chunk
           every --step seconds, perfectly timed, as a batch engine would; bench_serve's openai driver reads
           them from one client process, then from processes of --streams-per-client streams. Its gaps
           should be the step: a p99 far above it is the client's own backlog.
  server   forgather's app (create_app, a word-level tokenizer) over a stand-in engine that delivers a token to
           every running request each --step seconds; a plain httpx client reads the streams. Reports tokens/s
           through the app and the server process's CPU time per token (its event loop: detokenizing, JSON,
           SSE, the socket). The stand-in's thread works as the real engine's does: --host-us of Python a
           step holding the GIL (planning, launching, handing out), then a wait without it (the real one waits
           for the GPU in Event.synchronize). It records the period of its own steps: a step later than
           --step is the engine's thread waiting for the GIL while the event loop runs. A row per --servers
           entry: the GIL switch interval (sys.setswitchinterval in the server; Python's default is 5 ms) and
           uvicorn's HTTP implementation and event loop.

    python scripts/bench_http_stack.py [--streams 32] [--step 0.0018] [--tokens 256] [--streams-per-client 4]
                                       [--host-us 150] [--servers 5:auto:auto 0.5:h11:uvloop ...] [--skip-client]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_serve import drive, percentile, word_tokenizer  # noqa: E402
from fastapi import Request  # noqa: E402  (module level: FastAPI resolves the endpoint's annotation here)

from forgather.ports import free_port  # noqa: E402
from forgather.serve.client import wait_for_server  # noqa: E402

VOCAB = 512


def serve_standin(port: int, step: float) -> None:
    """Each completion streams `max_tokens` chunks, chunk i at start + i * step."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "bench", "object": "model", "created": 0, "owned_by": "x"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        count = (await request.json())["max_tokens"]

        def body(text: str, finish: str | None, usage: dict | None = None) -> str:
            chunk = {"id": "cmpl-bench", "object": "text_completion", "created": 0, "model": "bench",
                     "choices": [] if usage else [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps({**chunk, 'usage': usage} if usage else chunk)}\n\n"

        async def events():
            start = time.perf_counter()
            for index in range(count):
                delay = start + index * step - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                yield body(f" w{index % VOCAB}", "length" if index == count - 1 else None)
            yield body("", None, {"prompt_tokens": 1, "completion_tokens": count, "total_tokens": count + 1})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


class StandInEngine:
    """The engine's interface (submit, cancel, slots) delivering a token to every running request each `step`."""

    slots = 1024

    def __init__(self, step: float, host: float = 0.0):
        self.step, self.host, self.running, self.lock = step, host, [], threading.Lock()
        self.periods: list[float] = []  # seconds between the starts of consecutive steps that had requests
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, prompt_ids, params, deliver):
        request = {"deliver": deliver, "sent": 0, "max": params.max_tokens, "cancelled": False}
        with self.lock:
            self.running.append(request)
        return request

    def cancel(self, request) -> None:
        request["cancelled"] = True

    def _loop(self) -> None:
        due = last = time.perf_counter()
        while True:
            due += self.step
            now = time.perf_counter()
            with self.lock:
                running = list(self.running)
            if running:
                self.periods.append(now - last)
            last = now
            busy = now + self.host
            while time.perf_counter() < busy:  # the engine's own Python between two steps, holding the GIL
                pass
            for request in running:
                done = request["cancelled"] or request["sent"] == request["max"]
                if not done:
                    request["sent"] += 1
                    request["deliver"](7 + request["sent"] % (VOCAB - 7))
                    done = request["sent"] == request["max"]
                    if done:
                        request["deliver"]("length")
                if done:
                    with self.lock:
                        self.running.remove(request)
            time.sleep(max(0.0, due - time.perf_counter()))


def serve_app(port: int, step: float, host: float, switch: float, results: multiprocessing.Queue,
              http: str = "auto", loop: str = "auto") -> None:
    """forgather's app over a StandInEngine; on each SIGUSR1 puts the process's CPU seconds and the engine's
    step periods so far."""
    import signal

    import torch
    import transformers
    import uvicorn

    from forgather.serve.app import create_app
    from forgather.serve.backend import Backend

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    backend = Backend(transformers.LlamaForCausalLM(config), word_tokenizer(VOCAB), 4096, set())
    sys.setswitchinterval(switch)
    backend.engine = engine = StandInEngine(step, host)
    server = uvicorn.Server(uvicorn.Config(create_app(backend, "bench"), host="127.0.0.1", port=port,
                                           log_level="warning", http=http, loop=loop))
    signal.signal(signal.SIGUSR1, lambda *_: results.put((time.process_time(), list(engine.periods))))
    torch.set_num_threads(1)
    server.run()


async def read_streams(port: int, streams: int, tokens: int) -> tuple[int, float]:
    import httpx

    async def one(client) -> int:
        count = 0
        body = dict(model="bench", prompt=[1, 2, 3], max_tokens=tokens, stream=True)
        async with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                count += line.startswith('data: {"id"') and '"text":""' not in line.replace(" ", "")
        return count

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=streams + 4)) as client:
        await one(client)
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(client) for _ in range(streams)))
        return sum(counts), time.perf_counter() - start


def measure_app(context, args, switch: float, http: str, loop: str) -> dict:
    """One server process at switch interval `switch` with uvicorn's `http` and `loop`: tokens/s through the
    app, its CPU per token, and the stand-in engine's step periods while the streams ran."""
    import os
    import signal

    port = free_port()
    results = context.Queue()
    server = context.Process(target=serve_app, args=(port, args.step, args.host_us * 1e-6, switch, results, http,
                                                     loop), daemon=True)
    server.start()
    try:
        wait_for_server(f"http://127.0.0.1:{port}", server.is_alive, timeout=120)
        os.kill(server.pid, signal.SIGUSR1)
        cpu_before, periods_before = results.get(timeout=60)
        count, wall = asyncio.run(read_streams(port, args.streams, args.tokens))
        os.kill(server.pid, signal.SIGUSR1)
        cpu_after, periods = results.get(timeout=60)
    finally:
        server.terminate()
    periods = periods[len(periods_before):]
    return dict(tokens_per_s=count / wall, cpu_share=(cpu_after - cpu_before) / wall,
                cpu_us=1e6 * (cpu_after - cpu_before) / count, step_p50_ms=percentile(periods, 0.5) * 1e3,
                step_p99_ms=percentile(periods, 0.99) * 1e3, step_max_ms=max(periods) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--step", type=float, default=0.0018, help="seconds between a stream's tokens")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--streams-per-client", type=int, default=4)
    parser.add_argument("--host-us", type=float, default=150.0,
                        help="the stand-in engine's Python a step, holding the GIL (microseconds)")
    parser.add_argument("--servers", nargs="+", default=["5:auto:auto", "0.5:auto:auto"],
                        help="server rows, each SWITCH_MS:HTTP:LOOP (the GIL switch interval in ms, uvicorn's "
                             "http and loop: auto, h11 or httptools; auto, asyncio or uvloop)")
    parser.add_argument("--skip-client", action="store_true", help="only the server rows")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    offered = args.streams / args.step
    print(f"# {args.streams} streams x {args.tokens} tokens, a token per stream every {1e3 * args.step:.2f} ms "
          f"({offered:.0f} tokens/s offered)", flush=True)

    rows = []
    if not args.skip_client:
        port = free_port()
        standin = context.Process(target=serve_standin, args=(port, args.step), daemon=True)
        standin.start()
        try:
            wait_for_server(f"http://127.0.0.1:{port}", standin.is_alive, timeout=120)
            for per_process in (args.streams, args.streams_per_client):
                result = drive(f"http://127.0.0.1:{port}", args.streams, [1, 2, 3], args.tokens, per_process)
                rows.append((f"openai client, {result['client_processes']} process(es)", result))
        finally:
            standin.terminate()
    apps = []
    for server in args.servers:
        switch, http, loop = server.split(":")
        apps.append((server, measure_app(context, args, float(switch) * 1e-3, http, loop)))

    if rows:
        print("\n| side | tokens/s | ITL p50 ms | ITL p99 ms |\n| --- | ---: | ---: | ---: |")
        for name, r in rows:
            print(f"| {name} | {r['tokens_per_s']:.0f} | {r['itl_p50_ms']:.3f} | {r['itl_p99_ms']:.2f} |")
    print(f"\n| forgather's app, httpx client, engine Python {args.host_us:.0f} us a step | tokens/s | server CPU "
          f"share | server CPU us a token | engine step p50 / p99 / max ms |\n| --- | ---: | ---: | ---: | ---: |")
    for server, r in apps:
        print(f"| {server} | {r['tokens_per_s']:.0f} | {r['cpu_share']:.2f} | "
              f"{r['cpu_us']:.1f} | {r['step_p50_ms']:.2f} / {r['step_p99_ms']:.2f} / {r['step_max_ms']:.2f} |")


if __name__ == "__main__":
    main()
