"""The engine under load, over HTTP, on the CPU: more concurrent requests than slots, of different prompt lengths,
arriving while others decode, streamed or not, each get the text it gets alone; clients that leave free their
slots; a step that fails ends its requests, not the engine; closing the engine or shutting the server down ends
every running and queued request at once with a 503 error (in a stream: an error event, then [DONE]), and
refuses new ones."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn

from forgather.models.export import build_model, save_model
from forgather.ports import free_port
from forgather.serve.app import create_app
from forgather.serve.backend import SamplingParams
from forgather.serve.client import wait_for_server
from forgather.serve.engine import Engine, EngineStopped
from forgather.serve.server import stopping_server
from helpers.tiny_lm import tiny_tree
from test_serve import ROOT, serving
from test_serve_engine import CONTEXT, Collector, backend, tokenizer, wait_for  # noqa: F401

WORDS = "once upon a time there was a tiny model".split()


def slowed(engine: Engine, seconds: float) -> Engine:
    """`engine` taking `seconds` more a step: requests overlap as a GPU's long completions do."""
    run_step = engine.run_step

    def slow_step(plan):
        time.sleep(seconds)
        run_step(plan)

    engine.run_step = slow_step
    return engine


def completion(url: str, prompt: str, max_tokens: int, stream: bool) -> str:
    """The greedy completion's text, joined from the events when streamed (an error event fails the test)."""
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if not stream:
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]
    text = ""
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line.removeprefix("data: "))
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["text"]
    return text


@pytest.fixture
def loaded(backend):
    """The backend with an engine of 3 slots and 2-token prefill chunks (prompts prefill while others decode)."""
    backend.start_engine(3, prefill_chunk=2)
    yield backend
    backend.engine.close()
    backend.engine = None


def test_more_requests_than_slots_arriving_mid_decode_each_get_their_text_alone(loaded, one_thread):
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 16))) for _ in range(10)]
    max_tokens = [rng.randrange(1, 24) for _ in prompts]
    with serving(create_app(loaded, "m")) as url:
        alone = [completion(url, p, m, False) for p, m in zip(prompts, max_tokens)]
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = []
            for i, (prompt, most) in enumerate(zip(prompts, max_tokens)):
                futures.append(pool.submit(completion, url, prompt, most, i % 2 == 0))
                time.sleep(rng.random() * 0.02)  # some arrive while others decode
            together = [future.result(timeout=60) for future in futures]
        assert together == alone
        assert loaded.engine.scheduler.outstanding == 0 and len(loaded.engine.scheduler.free) == 3


def test_clients_that_leave_mid_stream_leak_no_slot(backend, one_thread):
    backend.start_engine(2)
    engine = slowed(backend.engine, 0.01)
    body = {"model": "m", "prompt": "once upon", "max_tokens": CONTEXT - 8, "temperature": 0, "stream": True}
    try:
        with serving(create_app(backend, "m")) as url:
            def leave(events: int) -> None:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
                    lines = response.iter_lines()
                    for _ in range(events):
                        next(lines)

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(leave, [1, 2, 3] * 4))  # 12 streams over 2 slots, each left early
            wait_for(lambda: engine.scheduler.outstanding == 0, timeout=10)
            assert sorted(engine.scheduler.free) == [0, 1]
            assert completion(url, "once", 3, True) == completion(url, "once", 3, False)
    finally:
        engine.close()
        backend.engine = None


def test_closing_the_engine_ends_running_and_waiting_requests_and_refuses_new_ones(backend):
    engine = slowed(Engine(backend.model, set(), slots=1, context_length=CONTEXT), 0.01)
    ids = backend.encode("once upon a time")
    collectors = [Collector() for _ in range(3)]
    for collector in collectors:
        engine.submit(ids, SamplingParams(max_tokens=CONTEXT - len(ids), temperature=0.0), collector)
    wait_for(lambda: collectors[0].tokens)  # one decodes, two wait for its slot
    engine.close()
    for collector in collectors:
        assert collector.done.wait(10), "a request was left waiting on a closed engine"
        assert isinstance(collector.finish, EngineStopped) and "shutting down" in str(collector.finish)
    with pytest.raises(EngineStopped, match="shutting down"):
        engine.submit(ids, SamplingParams(max_tokens=2, temperature=0.0), Collector())


def test_an_error_escaping_a_step_stops_the_engine_and_ends_its_requests(backend, monkeypatch):
    hooked = []
    monkeypatch.setattr(threading, "excepthook", hooked.append)  # the engine's thread re-raises: it is logged
    engine = Engine(backend.model, set(), slots=1, context_length=CONTEXT)
    engine.run_step = lambda plan: (_ for _ in ()).throw(RuntimeError("a broken step"))
    ids = backend.encode("once upon a time")
    collectors = [Collector(), Collector()]
    for collector in collectors:
        engine.submit(ids, SamplingParams(max_tokens=4, temperature=0.0), collector)
    for collector in collectors:
        assert collector.done.wait(10), "a request was left waiting on a dead engine thread"
        assert isinstance(collector.finish, EngineStopped) and "a broken step" in str(collector.finish)
        assert "restart the server" in str(collector.finish)
    engine.thread.join(10)
    assert not engine.thread.is_alive() and [h.exc_type for h in hooked] == [RuntimeError]
    with pytest.raises(EngineStopped, match="a broken step"):
        engine.submit(ids, SamplingParams(max_tokens=2, temperature=0.0), Collector())


@pytest.mark.parametrize("with_engine", [True, False], ids=["engine", "simple-loop"])
def test_shutdown_ends_running_and_queued_requests_with_a_503_and_the_server_exits(backend, with_engine):
    """What SIGTERM or Ctrl-C does (uvicorn's handler sets should_exit): the server stops the backend first, so
    every open response ends at once with the reason, instead of decoding to its max_tokens."""
    if with_engine:
        backend.start_engine(1)
        slowed(backend.engine, 0.02)
    else:
        tokens = backend.tokens
        backend.tokens = lambda *args: (time.sleep(0.02) or token for token in tokens(*args))
    port = free_port()
    server = stopping_server(uvicorn.Config(create_app(backend, "m"), host="127.0.0.1", port=port,
                                            log_level="warning"), backend)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    body = {"model": "m", "prompt": "once upon", "max_tokens": CONTEXT - 8, "temperature": 0}
    answers: dict[int, list] = {}

    def ask(index: int) -> None:
        if index == 2:  # not streamed
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
            answers[index] = [response.status_code, response.json()]
            return
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as response:
            answers[index] = [line.removeprefix("data: ") for line in response.iter_lines() if line]

    try:
        wait_for_server(url)
        clients = [threading.Thread(target=ask, args=(index,)) for index in range(3)]
        for client in clients:  # one runs, two queue (engine: one slot; simple loop: one worker)
            client.start()
        wait_for(lambda: len(server.server_state.tasks) == 3)  # uvicorn has read the three requests
        if with_engine:
            wait_for(lambda: backend.engine.scheduler.outstanding == 3)
        time.sleep(0.3)  # the first one streams
        started = time.monotonic()
        server.should_exit = True
        thread.join(10)
        for client in clients:
            client.join(10)
        assert not thread.is_alive() and time.monotonic() - started < 5
    finally:
        backend.close()
        backend.stopping.clear()
        backend.engine = None
        if not with_engine:
            backend.tokens = tokens
    assert sorted(answers) == [0, 1, 2]
    status, error = answers.pop(2)
    assert status == 503 and error["error"]["code"] == "service_unavailable"
    assert "shutting down" in error["error"]["message"]
    for events in answers.values():
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["error"]["code"] == "service_unavailable" and "shutting down" in last["error"]["message"]
        assert len(events) < CONTEXT - 8  # stopped long before max_tokens


def submitted_together(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[Collector]:
    """Submit every request before the engine plans again: they are prefilled in one step, and decode together."""
    collectors = [Collector() for _ in prompts]
    with engine.scheduler.wake:  # the engine's thread waits for this lock to plan
        for ids, p, collector in zip(prompts, params, collectors):
            engine.submit(ids, p, collector)
    for collector in collectors:
        assert collector.done.wait(30), "a request did not finish"
    return collectors


def test_a_prompt_the_model_cannot_embed_fails_alone_and_its_neighbours_finish(backend):
    engine = Engine(backend.model, set(), slots=4, context_length=CONTEXT)
    try:
        prompts = [backend.encode("once upon a time"), [backend.vocab_size + 5], backend.encode("there was")]
        params = [SamplingParams(max_tokens=6, temperature=0.0)] * 3
        expected = [list(backend.tokens(prompts[i], params[i])) for i in (0, 2)]
        good, bad, other = submitted_together(engine, prompts, params)
        assert isinstance(bad.finish, IndexError) and not bad.tokens
        assert [good.tokens, other.tokens] == expected and good.finish == other.finish == "length"
        assert engine.scheduler.outstanding == 0
    finally:
        engine.close()


def test_a_row_whose_logits_are_not_numbers_fails_alone_and_the_batch_decodes_on(backend):
    """One sequence's numbers overflow (its cache holds a NaN): sampling its row raises; the rows decoded in the
    same steps go on, with the tokens they get alone."""
    engine = Engine(backend.model, set(), slots=4, context_length=CONTEXT)
    prefilled = engine.scheduler.prefilled

    def poison_the_sampled_one(request, stop):
        prefilled(request, stop)
        if request.params.temperature != 0 and stop == len(request.prompt_ids):
            for keys in engine.cache.keys:
                keys[request.slot, :, 0] = float("nan")

    engine.scheduler.prefilled = poison_the_sampled_one
    try:
        prompts = [backend.encode(p) for p in ("once upon a time", "a tiny model", "there was")]
        params = [SamplingParams(max_tokens=8, temperature=0.0), SamplingParams(max_tokens=8, temperature=1.0, seed=1),
                  SamplingParams(max_tokens=8, temperature=0.0)]
        expected = [list(backend.tokens(prompts[i], params[i])) for i in (0, 2)]
        good, bad, other = submitted_together(engine, prompts, params)
        assert isinstance(bad.finish, RuntimeError) and len(bad.tokens) == 1  # its first token came from the prefill
        assert [good.tokens, other.tokens] == expected and good.finish == other.finish == "length"
        assert engine.scheduler.outstanding == 0
    finally:
        engine.close()


def test_sigterm_ends_the_servers_open_streams_and_the_process_exits(tmp_path, tokenizer):  # noqa: F811
    """`forgather inf server --engine on`, one slot, two streams of 4,000 tokens (one runs, one waits): SIGTERM
    ends both at once with the shutdown error, and the process exits, long before the streams would have ended."""
    directory = tmp_path / "tiny"
    tree = tiny_tree(len(tokenizer))
    torch.manual_seed(0)  # weights whose greedy completion of the prompt meets no end-of-sequence token
    save_model(build_model(tree).eval(), tree, directory, "tiny")
    tokenizer.save_pretrained(directory)
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "forgather.cli.inf", "server", "-m", str(directory), "--port", str(port),
             "--engine", "on", "--max-num-seqs", "1", "--max-model-len", "4096", "--log-level", "warning"],
            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=output, stderr=subprocess.STDOUT)
    url, events, opened, streaming = f"http://127.0.0.1:{port}", {}, [], threading.Event()

    def stream(index: int) -> None:
        body = {"model": "tiny", "prompt": "once upon", "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            opened.append(index)  # its response has begun: the engine holds the request
            lines = []
            for line in response.iter_lines():
                if line:
                    lines.append(line.removeprefix("data: "))
                    streaming.set()
            events[index] = lines

    try:
        wait_for_server(url, lambda: process.poll() is None, log.read_text)
        clients = [threading.Thread(target=stream, args=(index,)) for index in range(2)]
        for client in clients:
            client.start()
        # Both requests in the server (one runs, one waits) and the running one streaming: not a fixed sleep,
        # which a loaded machine can outlast before the requests arrive (a SIGTERM before them is no test).
        wait_for(lambda: len(opened) == 2 and streaming.is_set(), timeout=120)
        assert not events, "a stream ended before the signal"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) in (0, -signal.SIGTERM), log.read_text()
        assert time.monotonic() - started < 5, "the server waited for its streams to run to max_tokens"
        for client in clients:
            client.join(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert sorted(events) == [0, 1]
    for lines in events.values():
        assert lines[-1] == "[DONE]" and json.loads(lines[-2])["error"]["code"] == "service_unavailable"


def test_a_stream_that_fails_says_so_in_the_stream_and_in_the_servers_log(backend, caplog):
    backend.start_engine(2)
    backend.engine._decode_tokens = lambda requests: (_ for _ in ()).throw(ValueError("a broken decode step"))
    body = {"model": "m", "prompt": "once upon", "max_tokens": 5, "temperature": 0, "stream": True}
    try:
        with serving(create_app(backend, "m")) as url:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
                events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    finally:
        backend.engine.close()
        backend.engine = None
    error = json.loads(events[-2])["error"]
    assert events[-1] == "[DONE]" and error["type"] == "server_error"
    assert "ValueError: a broken decode step" in error["message"] and "server's log" in error["message"]
    logged = [record for record in caplog.records if record.exc_info and record.exc_info[0] is ValueError]
    assert logged and "a broken decode step" in str(logged[0].exc_info[1])


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_to_a_stopped_engine_is_a_503_saying_why(backend, stream):
    backend.start_engine(1)
    backend.engine.close()
    try:
        with serving(create_app(backend, "m")) as url:
            response = httpx.post(f"{url}/v1/completions", timeout=30,
                                  json={"model": "m", "prompt": "once", "max_tokens": 2, "stream": stream})
    finally:
        backend.engine = None
    error = response.json()["error"]
    assert response.status_code == 503 and error["code"] == "service_unavailable"
    assert "shutting down" in error["message"] and "send it again" in error["message"]


def test_a_tokenizer_larger_than_the_models_vocabulary_is_warned_about_and_its_extra_tokens_refused(tmp_path,
                                                                                                 tokenizer):
    """A text prompt could reach the model with an id past its embedding (a device-side assert on a GPU, which
    breaks every later request); only ids given as a list were checked."""
    from forgather.serve.backend import Backend, RequestError

    tree = tiny_tree(len(tokenizer) - 40)
    save_model(build_model(tree).eval(), tree, tmp_path, "tiny")
    tokenizer.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=rf"tokenizer has {len(tokenizer)} tokens, its model only {len(tokenizer) - 40}"):
        loaded = Backend.load(tmp_path, context_length=CONTEXT)
    beyond = loaded.decode([len(tokenizer) - 1])
    assert loaded.encode_prompt("a") == loaded.encode("a")  # tokens the model has still pass
    with pytest.raises(RequestError, match=rf"has no embedding in this model, whose vocabulary has {len(tokenizer) - 40} "
                                           rf"tokens \(its tokenizer has {len(tokenizer)}\)"):
        loaded.encode_prompt(beyond)
