"""The inference server over real HTTP: a `forgather inf server` process on a free loopback port (a Forgather
model directory, API key set), and an in-process uvicorn server over a Hugging Face Llama directory
(`device_map="auto"` on the CPU). Completions match the models' own greedy generation; streaming, the
official `openai` client, seeds, stop strings, concurrency and the error cases are checked against them."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
import torch
import transformers
import uvicorn

from forgather.cli import inf
from forgather.data.tokenizer import build_bpe_tokenizer
from forgather.models.export import build_model, load_model, save_model
from forgather.serve.app import create_app
from forgather.serve.backend import DEFAULT_CHAT_STOP, Backend
from forgather.ports import free_port
from forgather.serve.client import wait_for_server
from helpers.tiny_lm import tiny_tree

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
CONTEXT = 256
PROMPTS = ["once upon a time", "there was", "a tiny model", "upon a"]


def test_waiting_for_a_server_that_exited_or_never_answers_is_a_client_error():
    from forgather.serve.client import ClientError

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ClientError, match="exited: its log"):
        wait_for_server(url, alive=lambda: False, output=lambda: "its log")
    with pytest.raises(ClientError, match=r"no server answers at .* after 0.3 s"):
        wait_for_server(url, timeout=0.3)


def test_a_free_port_is_drawn_below_the_ephemeral_range_and_binds(monkeypatch):
    """Below 32768, where outgoing connections never take it between the probe and the server's bind; where
    every draw is taken, whatever port the OS gives."""
    import socket

    from forgather import ports

    port = free_port()
    assert 20000 <= port < 32768
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        monkeypatch.setattr(ports.random.Random, "randrange", lambda self, a, b: port)
        other = free_port()
        assert other != port
    with socket.socket() as server:
        server.bind(("127.0.0.1", other))


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer(["once upon a time there was a tiny model"] * 4, vocab_size=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("models") / "tiny"
    torch.manual_seed(0)
    tree = tiny_tree(len(tokenizer))
    save_model(build_model(tree).eval(), tree, directory, "tiny")
    tokenizer.save_pretrained(directory)
    return directory


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """`app` served by uvicorn on a thread at a free loopback port: its URL, once it answers."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(model_dir) -> str:
    """`forgather inf server` in its own process; its URL. Its output goes to a file (a pipe nobody reads
    could fill and stall it)."""
    port = free_port()
    command = [sys.executable, "-m", "forgather.cli.inf", "server", "-m", str(model_dir), "--port", str(port),
               "--api-key", API_KEY, "--max-model-len", str(CONTEXT), "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = model_dir.parent / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, lambda: process.poll() is None, log.read_text)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def post(url: str, path: str, body: dict | str, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, str) else json.dumps(body)
    headers["Content-Type"] = "application/json"
    return httpx.post(f"{url}/v1{path}", content=content, headers=headers, timeout=60)


def complete(url: str, prompt: str, **fields) -> dict:
    response = post(url, "/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0,
                                          **fields})
    assert response.status_code == 200, response.text
    return response.json()


def text_until_eos(tokenizer, generated: list[int]) -> str:
    if tokenizer.eos_token_id in generated:
        generated = generated[: generated.index(tokenizer.eos_token_id)]
    return tokenizer.decode(generated, skip_special_tokens=False)


def greedy_text(model_dir: Path, tokenizer, prompt: str, max_tokens: int = 12) -> str:
    """What the model's own generate() continues the prompt with, up to the end-of-sequence token."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    generated = load_model(model_dir).generate(ids, max_new_tokens=max_tokens)[0, ids.shape[1]:].tolist()
    return text_until_eos(tokenizer, generated)


def sse_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


# --- the Forgather model directory, through the CLI server process ------------------------------------------


def test_models_lists_the_served_model(server):
    response = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert [card["id"] for card in response.json()["data"]] == ["tiny"]


def test_greedy_completion_equals_the_models_own_generation(server, model_dir, tokenizer):
    body = complete(server, PROMPTS[0])
    assert body["choices"][0]["text"] == greedy_text(model_dir, tokenizer, PROMPTS[0])
    assert body["usage"]["prompt_tokens"] == len(tokenizer(PROMPTS[0])["input_ids"])


def test_streamed_completion_joins_to_the_whole_completion(server):
    whole = complete(server, PROMPTS[1])["choices"][0]["text"]
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len(chunks) > 2
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_client_chat_streamed_and_whole_agree(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    messages = [{"role": "user", "content": "once upon a time"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream]
    assert whole.choices[0].message.role == "assistant"
    assert "".join(pieces) == whole.choices[0].message.content
    assert whole.usage.completion_tokens >= 1


def test_openai_client_completion_with_seed_is_reproducible(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    texts = [client.completions.create(model="tiny", prompt="there was", max_tokens=16, temperature=1.0, seed=seed)
             .choices[0].text for seed in (5, 5, 6)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_top_p_near_zero_samples_the_greedy_token(server):
    greedy = complete(server, PROMPTS[2])["choices"][0]["text"]
    nucleus = complete(server, PROMPTS[2], temperature=1.0, top_p=1e-6, seed=1)["choices"][0]["text"]
    assert nucleus == greedy


def test_stop_string_ends_the_completion_before_it(server):
    whole = complete(server, PROMPTS[0], max_tokens=16)["choices"][0]
    stop = whole["text"][3:5]
    stopped = complete(server, PROMPTS[0], max_tokens=16, stop=[stop])["choices"][0]
    assert stopped["text"] == whole["text"][: whole["text"].index(stop)]
    assert stopped["finish_reason"] == "stop"


def test_max_tokens_bounds_the_completion(server):
    body = complete(server, PROMPTS[3], max_tokens=3)
    assert body["usage"]["completion_tokens"] <= 3


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


def test_malformed_json_is_a_400_with_an_openai_error(server):
    error = error_of(post(server, "/completions", '{"model": "tiny", "prompt": '), 400)
    assert "JSON" in error["message"]


def test_unknown_model_is_a_404(server):
    error = error_of(post(server, "/completions", {"model": "gpt-9", "prompt": "a"}), 404)
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize("max_tokens", [-5, 0])
def test_non_positive_max_tokens_is_a_400(server, max_tokens):
    error = error_of(post(server, "/completions", {"model": "tiny", "prompt": "a", "max_tokens": max_tokens}), 400)
    assert error["param"] == "max_tokens"


@pytest.mark.parametrize("path, field, value, message", [
    ("/completions", "n", 2, "one per request"), ("/chat/completions", "n", 3, "one per request"),
    ("/completions", "logprobs", 5, "log probabilities"), ("/chat/completions", "logprobs", True, "log probabilities"),
    ("/chat/completions", "top_logprobs", 2, "log probabilities"), ("/completions", "echo", True, "prepend the prompt"),
    ("/completions", "best_of", 3, "several requests"), ("/completions", "suffix", "x", "suffix"),
    ("/completions", "logit_bias", {"5": 100}, "biased"), ("/chat/completions", "presence_penalty", 0.5, "penalty"),
    ("/completions", "frequency_penalty", -1, "penalty"), ("/chat/completions", "tool_choice", "required", "tool"),
    ("/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}], "tool calls"),
    ("/chat/completions", "response_format", {"type": "json_object"}, "other than text")])
def test_an_openai_option_this_server_does_not_implement_is_a_400_naming_it(server, path, field, value, message):
    """Not ignored: the client would take an answer lacking what it asked for (no logprobs, no echo ...)."""
    prompt = {"prompt": "a"} if path == "/completions" else {"messages": [{"role": "user", "content": "a"}]}
    error = error_of(post(server, path, {"model": "tiny", **prompt, "max_tokens": 2, field: value}), 400)
    assert error["param"] == field and message in error["message"]
    assert "leave the field out" in error["message"] or "send one request per completion" in error["message"]


@pytest.mark.parametrize("field, value", [("n", 1), ("n", None), ("logprobs", None), ("logprobs", False),
                                          ("echo", False), ("best_of", 1), ("logit_bias", {}), ("suffix", ""),
                                          ("presence_penalty", 0), ("frequency_penalty", 0.0), ("user", "u1")])
def test_openai_options_at_their_defaults_are_accepted(server, field, value):
    response = post(server, "/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2, field: value})
    assert response.status_code == 200, response.text


def test_max_tokens_beyond_the_context_is_a_400(server):
    error = error_of(post(server, "/completions", {"model": "tiny", "prompt": "a", "max_tokens": 10**9}), 400)
    assert error["code"] == "context_length_exceeded"


def test_prompt_longer_than_the_context_is_a_400(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "once upon a time " * CONTEXT}]}
    assert error_of(post(server, "/chat/completions", body), 400)["code"] == "context_length_exceeded"


def test_a_completion_prompt_longer_than_the_context_names_the_prompt(server):
    error = error_of(post(server, "/completions", {"model": "tiny", "prompt": "once upon a time " * CONTEXT}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"


@pytest.fixture
def counted_encoding(model_dir):
    """An in-process server whose backend counts (and, when told, slows) its tokenizer's encoding; (url,
    backend, calls, delay), delay a one-item list of seconds."""
    backend = Backend.load(model_dir, context_length=CONTEXT)
    calls, delay, encode = [], [0.0], backend.encode

    def counting(text, add_special_tokens=True):
        calls.append(len(text))
        time.sleep(delay[0])
        return encode(text, add_special_tokens)

    backend.encode = counting
    with serving(create_app(backend, "tiny")) as url:
        yield url, backend, calls, delay


@pytest.mark.parametrize("path, field", [("/completions", "prompt"), ("/chat/completions", "messages")])
def test_a_text_too_long_for_any_tokenization_is_refused_without_encoding_it(counted_encoding, path, field):
    url, backend, calls, _ = counted_encoding
    text = "a" * (CONTEXT * backend.longest_token + 1)
    body = {"prompt": text} if field == "prompt" else {"messages": [{"role": "user", "content": text}]}
    error = error_of(post(url, path, {"model": "tiny", **body}, key=None), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == field
    assert f"characters of {field} are more tokens than that" in error["message"] and calls == []


def test_the_server_answers_others_while_a_prompt_is_encoded(counted_encoding):
    url, _, calls, delay = counted_encoding
    delay[0] = 1.5
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, url, "/completions", {"model": "tiny", "prompt": "once upon", "max_tokens": 2}, None)
        while not calls:
            time.sleep(0.01)
        start = time.monotonic()
        assert httpx.get(f"{url}/v1/models").status_code == 200
        assert time.monotonic() - start < 1.0 and not slow.done()
        assert slow.result().status_code == 200


def test_unknown_route_and_wrong_method_get_openai_errors(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    error_of(httpx.get(f"{server}/v1/engines", headers=headers), 404)
    error_of(httpx.get(f"{server}/v1/completions", headers=headers), 405)


def test_missing_or_wrong_api_key_is_a_401(server):
    for key in (None, "wrong"):
        assert error_of(post(server, "/completions", {"model": "tiny", "prompt": "a"}, key=key), 401)["type"] == (
            "authentication_error")


def test_server_keeps_serving_after_bad_requests(server):
    for bad in ("{", {"model": "tiny"}, {"model": "tiny", "prompt": [10**6]}):
        assert 400 <= post(server, "/completions", bad).status_code < 500
    assert complete(server, PROMPTS[0])["choices"][0]["finish_reason"] in ("stop", "length")


def test_concurrent_requests_get_their_own_completions(server):
    alone = {prompt: complete(server, prompt)["choices"][0]["text"] for prompt in PROMPTS}
    with ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
        together = list(pool.map(lambda p: complete(server, p)["choices"][0]["text"], PROMPTS * 2))
    assert together == [alone[prompt] for prompt in PROMPTS * 2]


def test_cli_client_streams_a_completion(server, model_dir, tokenizer, capsys):
    argv = ["client", "--url", server, "--api-key", API_KEY, "--completion", PROMPTS[0], "--max-tokens", "12",
            "--temperature", "0"]
    assert inf.main(argv) == 0
    assert capsys.readouterr().out == greedy_text(model_dir, tokenizer, PROMPTS[0]) + "\n"


def test_cli_client_chat_keeps_the_conversation(server, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("once upon a time\nthere was\n/exit\n"))
    assert inf.main(["client", "--url", server, "--api-key", API_KEY, "--chat", "--max-tokens", "4",
                     "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("> ") == 3 and "error" not in out  # two turns answered, then the prompt that read /exit


def test_cli_chat_reports_a_refused_turn_and_goes_on(server, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("once upon a time " * CONTEXT + "\nthere was\n"))
    assert inf.main(["client", "--url", server, "--api-key", API_KEY, "--chat", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("context length") == 1 and out.count("> ") == 3


def test_cli_client_reports_server_errors(server, capsys):
    assert inf.main(["client", "--url", server, "--api-key", "wrong", "--completion", "a"]) == 1
    assert "API key" in capsys.readouterr().err


# --- a Hugging Face Llama directory, in-process uvicorn, device_map="auto" ----------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=CONTEXT, eos_token_id=tokenizer.eos_token_id,
                                      bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(1.0 if parameter.dim() == 1 else 0.0, 0.3)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_server(llama_dir) -> str:
    with serving(create_app(Backend.load(llama_dir, device_map="auto"), "llama")) as url:
        yield url


def test_hf_llama_directory_completion_equals_transformers_generate(llama_server, llama_dir, tokenizer):
    response = httpx.post(f"{llama_server}/v1/completions", timeout=60,
                          json={"model": "llama", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0})
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    generated = model.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    assert response.json()["choices"][0]["text"] == text_until_eos(tokenizer, generated)


def test_no_api_key_configured_means_none_is_needed(llama_server):
    assert httpx.get(f"{llama_server}/v1/models").status_code == 200


def test_default_chat_template_is_chatml_with_its_end_marker_as_stop(llama_dir):
    backend = Backend.load(llama_dir)
    text = backend.tokenizer.decode(backend.chat_prompt([{"role": "user", "content": "hi"}]))
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert backend.chat_stop == (DEFAULT_CHAT_STOP,)


def test_inf_arguments_import_neither_torch_nor_the_web_stack():
    code = ("import argparse, sys; from forgather.cli import inf; inf.add_arguments(argparse.ArgumentParser()); "
            "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_cancelled_stream_stops_generating(llama_dir):
    from forgather.serve.backend import SamplingParams

    backend = Backend.load(llama_dir)
    backend.stop_token_ids = set()  # only the cancellation may end it early
    cancelled = threading.Event()
    params = SamplingParams(max_tokens=40, temperature=0.0)
    generated = 0
    for delta in backend.stream(backend.encode(PROMPTS[0]), params, cancelled):
        generated += 1
        cancelled.set()
    assert generated == 1 and delta.finish_reason is None


def test_loopback_hosts_are_told_from_others_for_the_key_warning():
    from forgather.serve.server import is_loopback

    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "example.org")] == [
        True, True, True, False, False]


def test_streamed_usage_is_sent_last_when_asked_for(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    whole = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_attention_mask_is_rebuilt_once_on_each_other_device():
    from types import SimpleNamespace

    from forgather.models.attention import AttentionMask
    from forgather.serve.placement import _mask_mover

    move = _mask_mover()
    mask = AttentionMask(1, 5, torch.zeros(1, 5, dtype=torch.long), torch.device("cpu"))
    elsewhere = [torch.nn.Linear(2, 2) for _ in range(2)]
    for layer in elsewhere:
        layer._hf_hook = SimpleNamespace(execution_device="meta")
    first, second = (move(layer, ("x", "rope", mask, None))[2] for layer in elsewhere)
    assert first is second and first.device == torch.device("meta")
    assert first.document_ids.device.type == "meta" and first.dense.shape == mask.dense.shape
    same_device = torch.nn.Linear(2, 2)
    assert move(same_device, ("x", "rope", mask, None))[2] is mask


def test_an_offloaded_forgather_model_keeps_its_embedding_where_it_runs_and_computes_the_same_logits(model_dir,
                                                                                                    tmp_path):
    from forgather.serve.placement import align_forgather_devices, forgather_device_map

    plain = transformers.AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    cap = {"cpu": 0, "disk": "1GiB"}  # every part to the disk: accelerate maps the model as {"": "disk"}
    device_map = forgather_device_map(str(model_dir), cap, torch.float32)
    assert device_map["model.embed"] == device_map.get("model.lm_head", "cpu") == "cpu"  # a tied model has no head
    assert device_map["model.layers"] == "disk"
    offloaded = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=True, device_map=device_map, max_memory=cap, offload_folder=str(tmp_path)).eval()
    align_forgather_devices(offloaded)
    assert offloaded.model.layers[0].feedforward_norm.weight.device.type == "meta"
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, plain(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("directory", ["model_dir", "llama_dir"])
def test_a_backend_with_its_weights_offloaded_to_disk_decodes_like_the_model_in_memory(directory, request):
    from forgather.serve.backend import SamplingParams

    directory = request.getfixturevalue(directory)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    plain = Backend.load(directory)
    with pytest.warns(UserWarning, match=r"the batching engine cannot run this model \(.*\(device_map\)"):
        offloaded = Backend.load(directory, device_map="auto", max_memory={"cpu": "10KiB"}, engine=True)
    assert any(parameter.is_meta for parameter in offloaded.model.parameters())  # weights loaded per forward
    prompt = plain.encode(PROMPTS[0])
    assert list(offloaded.tokens(prompt, params)) == list(plain.tokens(prompt, params))


@pytest.mark.slow
def test_compiled_backend_decodes_like_the_eager_one_on_cpu(model_dir):
    from forgather.serve.backend import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0.0)
    eager = Backend.load(model_dir)
    compiled = Backend.load(model_dir, compile=True)
    prompt = eager.encode(PROMPTS[0])
    assert list(compiled.tokens(prompt, params)) == list(eager.tokens(prompt, params))


# --- locking the server down: the key guards every path, exposure needs a key -------------------------------


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/v1/models", "/nowhere"])
def test_every_path_needs_the_key(server, path):
    assert error_of(httpx.get(f"{server}{path}"), 401)["code"] == "invalid_api_key"
    assert httpx.get(f"{server}{path}", headers={"Authorization": f"Bearer {API_KEY}"}).status_code in (200, 404)


@pytest.mark.parametrize("header", [API_KEY, f"Basic {API_KEY}", f"Bearer {API_KEY}x", f"Bearer{API_KEY}", "Bearer"])
def test_a_key_without_the_bearer_scheme_is_refused(server, header):
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": header}).status_code == 401


def test_the_bearer_scheme_is_case_insensitive(server):
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200


def test_openapi_schema_is_served_with_the_key(server):
    response = httpx.get(f"{server}/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"})
    assert "/v1/completions" in response.json()["paths"]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Backend.load replaced by a failure that names itself: a refused command never reaches it."""
    def load(*args, **kwargs):
        raise FileNotFoundError("Backend.load was reached")

    monkeypatch.setattr(Backend, "load", load)
    monkeypatch.delenv("FORGATHER_API_KEY", raising=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.org"])
def test_a_non_loopback_host_without_a_key_is_refused_before_loading(no_model_loading, model_dir, capsys, host):
    assert inf.main(["server", "-m", str(model_dir), "--host", host]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--host {host}" in err and "--api-key" in err and "--insecure" in err


@pytest.mark.parametrize("flags", [["--insecure"], ["--api-key", "k"]])
def test_insecure_or_a_key_lets_a_non_loopback_host_through(no_model_loading, model_dir, capsys, flags):
    assert inf.main(["server", "-m", str(model_dir), "--host", "0.0.0.0", "--port", "0", *flags]) == 2
    assert "Backend.load was reached" in capsys.readouterr().err


def test_an_empty_key_is_refused(no_model_loading, model_dir, capsys):
    assert inf.main(["server", "-m", str(model_dir), "--port", "0", "--api-key", ""]) == 2
    assert "API key is empty" in capsys.readouterr().err


# --- requests that used to crash the server or were coerced -------------------------------------------------


@pytest.mark.parametrize("body, param", [
    ('{"model": "tiny", "prompt": "once \\ud800 upon"}', "prompt"),
    ('{"model": "tiny", "prompt": ["\\udfff"]}', "prompt.0"),
    ('{"model": "tiny", "prompt": "a", "stop": ["\\ud800"]}', "stop.0"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(server, body, param):
    error = error_of(post(server, "/completions", body), 400)
    assert error["param"] == param and "lone surrogate" in error["message"]


def test_a_lone_surrogate_in_a_chat_message_is_a_400(server):
    body = '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}'
    error = error_of(post(server, "/chat/completions", body), 400)
    assert error["param"] == "messages.0.content.0.text" and "U+D83D" in error["message"]


@pytest.mark.parametrize("seed", [2**70, -(2**63) - 1])
def test_a_seed_beyond_64_bits_is_a_400(server, seed):
    error = error_of(post(server, "/completions", {"model": "tiny", "prompt": "a", "seed": seed}), 400)
    assert error["param"] == "seed"


def test_the_widest_seeds_still_generate(server):
    for seed in (2**64 - 1, -(2**63)):
        assert complete(server, PROMPTS[0], temperature=1.0, seed=seed)["choices"][0]["text"] is not None


@pytest.mark.parametrize("field, value", [("stream", "yes"), ("stream", 1), ("max_tokens", "5"), ("temperature", "0"),
                                          ("stream_options", {"include_usage": "yes"})])
def test_values_of_the_wrong_type_are_refused_not_coerced(server, field, value):
    error = error_of(post(server, "/completions", {"model": "tiny", "prompt": "a", field: value}), 400)
    assert error["param"].startswith(field) and "valid" in error["message"]


@pytest.mark.parametrize("stop, message", [([f"s{i}" for i in range(17)], "17 stop sequences; send at most 16"),
                                           ("x" * 257, "a stop sequence of 257 characters; each may have at most 256")])
def test_too_many_or_too_long_stop_sequences_are_a_400_naming_stop(server, stop, message):
    error = error_of(post(server, "/completions", {"model": "tiny", "prompt": "a", "stop": stop}), 400)
    assert error["param"] == "stop" and error["message"] == f"stop: {message}"


def test_the_most_stop_sequences_allowed_still_generate(server):
    stop = [f"{i:02d}" + "q" * 254 for i in range(16)]
    assert complete(server, PROMPTS[0], stop=stop)["choices"][0]["finish_reason"] == "length"


def test_an_integer_temperature_is_a_number(server):
    assert complete(server, PROMPTS[0], temperature=0)["choices"][0]["finish_reason"] in ("stop", "length")


# --- a client that goes away stops its generation, streaming or not -----------------------------------------


@pytest.fixture
def slow_server(llama_dir):
    """An in-process server whose backend samples one token per 20 ms and never stops early; (url, samples),
    where samples lists the max_tokens of each token sampled so far (which request sampled it)."""
    backend = Backend.load(llama_dir)
    backend.stop_token_ids = set()
    samples = []
    sample = backend._sample

    def slow_sample(logits, params, generator):
        time.sleep(0.02)
        samples.append(params.max_tokens)
        return sample(logits, params, generator)

    backend._sample = slow_sample
    with serving(create_app(backend, "llama")) as url:
        yield url, samples


def settled(samples: list, quiet: float = 0.4, deadline: float = 15.0) -> int:
    """How many tokens were sampled once sampling has paused for `quiet` seconds."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        seen = len(samples)
        time.sleep(quiet)
        if len(samples) == seen:
            return seen
    raise TimeoutError("the server kept sampling")


def test_a_non_streaming_request_whose_client_left_stops_generating(slow_server):
    url, samples = slow_server
    body = {"model": "llama", "prompt": PROMPTS[0], "max_tokens": CONTEXT - 16, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.5 s of a >5 s generation
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
    assert settled(samples) < CONTEXT // 4
    quick = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 2}, timeout=10)  # the worker is free
    assert quick.json()["usage"]["completion_tokens"] == 2


def test_a_stream_whose_client_left_stops_generating(slow_server):
    url, samples = slow_server
    body = {"model": "llama", "prompt": PROMPTS[0], "max_tokens": CONTEXT - 16, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as response:
        next(response.iter_lines())  # the first chunk arrived; then the client hangs up
    assert settled(samples) < CONTEXT // 4


def test_a_queued_request_whose_client_left_never_starts(slow_server):
    url, samples = slow_server
    body = {"model": "llama", "prompt": PROMPTS[0], "temperature": 0}

    def give_up(max_tokens: int, after: float) -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": max_tokens}, timeout=after)

    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(give_up, CONTEXT - 16, 3.0)  # of a >5 s generation
        # The first one generates before the second is sent (a fixed sleep let a loaded machine send the second
        # first), and still generates when the second leaves.
        end = time.monotonic() + 2.0  # a second before the first one gives up
        while not samples:
            assert time.monotonic() < end and not running.done(), "the first request did not start generating"
            time.sleep(0.01)
        queued = pool.submit(give_up, CONTEXT - 17, 0.3)  # leaves while the first one still generates
        running.result(), queued.result()
    settled(samples)
    assert CONTEXT - 16 in samples and CONTEXT - 17 not in samples


# --- the client without a server ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [["--completion", "a"], ["--chat"]])
def test_client_without_a_server_says_so_in_one_line(monkeypatch, capsys, mode):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\n"))
    url = f"http://127.0.0.1:{free_port()}"
    assert inf.main(["client", "--url", url, *mode]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and f"no server answers at {url}" in captured.err
    assert "forgather inf server -m" in captured.err and "> " not in captured.out


def test_a_port_in_use_is_refused_before_loading(no_model_loading, model_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert inf.main(["server", "-m", str(model_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


@pytest.mark.parametrize("field, value, shapes", [("prompt", [[1, 2]], "a list of token ids"),
                                                  ("stop", 7, "a string or a list of strings")])
def test_a_value_of_no_accepted_shape_names_the_shapes(server, field, value, shapes):
    error = error_of(post(server, "/completions", {"model": "tiny", "prompt": "a", field: value}), 400)
    assert error["param"] == field and shapes in error["message"]


def test_a_body_that_is_not_an_object_is_a_400(server):
    assert "JSON object" in error_of(post(server, "/completions", "[]"), 400)["message"]


@pytest.mark.parametrize("url", ["localhost:8000", "http://[::1", "ftp://example.org"])
def test_client_with_a_url_that_is_no_server_address_says_so(capsys, url):
    assert inf.main(["client", "--url", url, "--completion", "a"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a server address" in err and "http://127.0.0.1:8000" in err


def test_a_malformed_model_config_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("[1, 2]")
    assert inf.main(["server", "-m", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'config.json'}: holds a JSON list" in err


@pytest.mark.parametrize("damage", ["weights_missing", "weights_cut_short"])
def test_an_incomplete_model_directory_is_one_line(llama_dir, tmp_path, capsys, damage):
    """A model directory whose weights are missing or truncated was transformers' OSError or safetensors'
    header error, under a traceback."""
    import shutil

    directory = tmp_path / "model"
    shutil.copytree(llama_dir, directory)
    weights = directory / "model.safetensors"
    if damage == "weights_missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:500])
    assert inf.main(["server", "-m", str(directory), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {directory}: the model does not load (")
    assert err.endswith("); give a complete model directory, as a run's export or `forgather convert` writes it\n")


# --- the reference Forgather's inf command lines ----------------------------------------------------------


def test_client_message_is_one_chat_reply_and_a_v1_url_is_taken(server, capsys):
    body = {"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "once upon"}],
            "max_tokens": 6, "temperature": 0}
    whole = post(server, "/chat/completions", body).json()["choices"][0]["message"]["content"]
    assert inf.main(["client", "--url", server + "/v1", "--api-key", API_KEY, "--message", "once upon",
                     "--system", "be brief", "--max-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == whole + "\n"


def test_client_completes_text_piped_in_and_echoes_on_request(server, model_dir, tokenizer, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPTS[0] + "\n"))
    assert inf.main(["client", "--url", server, "--api-key", API_KEY, "--max-tokens", "12", "--temperature", "0",
                     "--echo"]) == 0
    assert capsys.readouterr().out == PROMPTS[0] + greedy_text(model_dir, tokenizer, PROMPTS[0]) + "\n"


def test_client_lists_models_and_checks_health(server, capsys):
    assert inf.main(["client", "--url", server, "--api-key", API_KEY, "--list-models"]) == 0
    assert capsys.readouterr().out == "tiny\n"
    assert inf.main(["client", "--url", server, "--api-key", API_KEY, "--health"]) == 0
    assert "is up" in capsys.readouterr().out
    url = f"http://127.0.0.1:{free_port()}"
    assert inf.main(["client", "--url", url, "--health"]) == 1
    assert f"no server answers at {url}" in capsys.readouterr().err


def test_client_takes_a_config_file_and_the_command_line_wins(server, model_dir, tokenizer, tmp_path, capsys):
    config = tmp_path / "client_config.yaml"
    config.write_text(f"url: \"{server}/v1\"\napi-key: {API_KEY}\nmax-tokens: 12\ntemperature: 0.0\n"
                      "stop: [\"never appears\"]\n")
    assert inf.main(["client", str(config), "--completion", PROMPTS[0]]) == 0
    whole = greedy_text(model_dir, tokenizer, PROMPTS[0])
    assert capsys.readouterr().out == whole + "\n"
    assert inf.main(["client", str(config), "--completion", PROMPTS[0], "--max-tokens", "4"]) == 0
    shorter = capsys.readouterr().out.removesuffix("\n")
    assert whole.startswith(shorter) and len(shorter) < len(whole)


def test_server_takes_the_references_config_file(no_model_loading, model_dir, tmp_path, capsys):
    config = tmp_path / "server_config.yaml"
    config.write_text(f"model: \"{model_dir}\"\nhost: 0.0.0.0\nport: 0\nlog-level: INFO\n"
                      "stop-sequences:\n  - \"<|im_end|>\"\n")
    assert inf.main(["server", str(config)]) == 2  # the file's host: refused for want of a key, before loading
    assert "--host 0.0.0.0" in capsys.readouterr().err
    assert inf.main(["server", str(config), "--host", "127.0.0.1"]) == 2  # the command line wins: it loads
    assert "Backend.load was reached" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("model: m\nprot: 8001\n", ":2: unknown key 'prot'; did you mean 'port'?"),
    ("port: eight\n", ":1: port: 'eight' is not a int"),
    ("dtype: float8\n", ":1: dtype: 'float8'; use one of auto, float32, bfloat16, float16"),
    ("insecure: maybe\n", ":1: insecure: true or false expected"),
    ("compile: 1\n", ":1: compile: true or false expected"),
])
def test_a_wrong_server_config_file_is_one_line_naming_file_line_and_key(no_model_loading, tmp_path, capsys,
                                                                        content, message):
    config = tmp_path / "server_config.yaml"
    config.write_text(content)
    assert inf.main(["server", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{config}{message}" in err


@pytest.mark.parametrize("role, what, instead", [
    ("server", "directory", "to serve a model directory, give -m {path}"),
    ("client", "words", "to send text, give --completion TEXT or --message TEXT"),
])
def test_a_positional_that_is_no_options_file_says_what_the_positional_is_and_what_to_give(tmp_path, capsys, role,
                                                                                         what, instead):
    """`inf server MODEL_DIR` was an IsADirectoryError traceback; `inf client hello` said only 'no such file'."""
    path = tmp_path if what == "directory" else Path("hello")
    assert inf.main([role, str(path)]) == 2
    reason = "a directory" if what == "directory" else "no such file"
    assert capsys.readouterr().err == (f"error: {path}: {reason}; the positional argument is a YAML file of option "
                                       f"values (the options' long names as keys); {instead.format(path=path)}\n")


def test_server_short_names_and_a_missing_chat_template(no_model_loading, model_dir, tmp_path, capsys):
    assert inf.main(["server", "-m", str(model_dir), "-t", str(tmp_path / "chatml.jinja")]) == 2
    assert f"--chat-template {tmp_path / 'chatml.jinja'}: no such file" in capsys.readouterr().err
    assert inf.main(["server"]) == 2
    assert "give the model directory" in capsys.readouterr().err
    (tmp_path / "chatml.jinja").write_text("x")
    assert inf.main(["server", "-m", str(model_dir), "-p", "0", "-d", "cpu", "-l", "WARNING",
                     "-t", str(tmp_path / "chatml.jinja"), "-s", "a", "b"]) == 2
    assert "Backend.load was reached" in capsys.readouterr().err


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m.content }", "line 1: unexpected '}'"),
    ("{% for m in messages %}\n{{ m.content }}{{ nope() }}{% endfor %}",
     "line 2: rendering a conversation of one user message failed: UndefinedError: 'nope' is undefined"),
])
def test_a_broken_chat_template_is_refused_at_startup_in_one_line(model_dir, tmp_path, capsys, monkeypatch, template,
                                                                   message):
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    path = tmp_path / "bad.jinja"
    path.write_text(template)
    assert inf.main(["server", "-m", str(model_dir), "--port", "0", "-t", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --chat-template {path}: {message}; fix the template, or leave -t out to use the tokenizer's\n"


@pytest.mark.parametrize("kind, message", [("directory", "is a directory"), ("latin-1", "not UTF-8 text (byte 3)")])
def test_a_chat_template_that_is_no_text_file_is_one_line(no_model_loading, model_dir, tmp_path, capsys, kind, message):
    path = tmp_path / "template"
    path.mkdir() if kind == "directory" else path.write_bytes("{{ é }}".encode("latin-1"))
    assert inf.main(["server", "-m", str(model_dir), "-t", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--chat-template {path}: {message}; give a Jinja chat template file" in err


@pytest.fixture
def not_openai_server() -> Iterator[tuple[str, list]]:
    """A web server that answers GET with a 200 HTML page and POST with a 502 HTML page; (url, the POSTs'
    (path, JSON body) pairs)."""
    import http.server

    posted = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self, status: int, text: str) -> None:
            page = f"<html>\n<head><title>{text}</title></head>\n<body>\n<h1>{text}</h1>\n{'<p>x</p>' * 200}</body>"
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page.encode())

        def do_GET(self) -> None:
            self.answer(200, "Welcome")

        def do_POST(self) -> None:
            posted.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self.answer(502, "Bad Gateway")

        def log_message(self, *args) -> None:
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=web.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{web.server_address[1]}", posted
    finally:
        web.shutdown()
        web.server_close()


def test_client_says_when_the_server_is_no_openai_server(not_openai_server, capsys):
    url, _ = not_openai_server
    assert inf.main(["client", "--url", url, "--list-models"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 400
    assert err.startswith(f"error: the server at {url} did not answer as an OpenAI-compatible server (GET /v1/models "
                          f"gave 200 text/html: 'Welcome Welcome x x")


def test_client_quotes_an_html_error_page_in_one_short_line(not_openai_server, capsys):
    url, _ = not_openai_server
    assert inf.main(["client", "--url", url, "--model", "m", "--completion", "a"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: 502: Bad Gateway Bad Gateway x x") and "<" not in err
    assert len(err) < 200


def test_an_empty_completion_is_sent_not_taken_for_a_chat(not_openai_server, monkeypatch, capsys):
    url, posted = not_openai_server
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert inf.main(["client", "--url", url, "--model", "m", "--completion", ""]) == 1
    assert [(path, body["prompt"]) for path, body in posted] == [("/v1/completions", "")]
    assert "> " not in capsys.readouterr().out


def test_the_engine_runs_where_the_model_sits_on_one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [inf._use_engine("auto", d) for d in (None, "cuda", "cuda:1", "cpu", "auto")] == [True, True, True, False, False]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not inf._use_engine("auto", None) and inf._use_engine("on", "cpu")


def test_server_stop_strings_end_every_request_and_a_chat_template_replaces_the_tokenizers(model_dir):
    plain = Backend.load(model_dir)
    with serving(create_app(plain, "tiny")) as url:
        whole = complete(url, PROMPTS[0], max_tokens=16)["choices"][0]["text"]
    stop = whole[3:5]
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    backend = Backend.load(model_dir, stop_strings=(stop,), chat_template=template)
    assert backend.tokenizer.chat_template == template and backend.chat_stop == ()
    text = backend.tokenizer.decode(backend.chat_prompt([{"role": "user", "content": "hi"}]))
    assert text == "[user] hi\n[assistant]"
    with serving(create_app(backend, "tiny")) as url:
        stopped = complete(url, PROMPTS[0], max_tokens=16)["choices"][0]
    assert stopped["text"] == whole[: whole.index(stop)] and stopped["finish_reason"] == "stop"
