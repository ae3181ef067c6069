"""`forgather inf server|client`: serve a model directory over an OpenAI-compatible API, and talk to it.

`server -m MODEL_DIR` loads a Forgather or Hugging Face Llama-family directory and serves it (FastAPI +
uvicorn, the `serve` extra) on 127.0.0.1:8000 unless told otherwise, through the batching engine on a GPU
(`--engine`); another host needs --api-key (or
--insecure). A Forgather directory's model code runs in the server, as transformers' trust_remote_code does.
`client --completion TEXT` streams a completion; `client --chat` is an interactive, streaming chat; without a
server either says so in one line. Nothing heavy is imported until `run`.
"""

from __future__ import annotations

import argparse
import os
import sys

from forgather.serve.server import SWITCH_INTERVAL  # standard library only: --help stays light


def _sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, help="0 = greedy")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    roles = parser.add_subparsers(dest="role", metavar="server|client", required=True)
    server = roles.add_parser("server", help="serve a model directory (OpenAI-compatible API)")
    server.add_argument("-m", "--model", required=True, help="model directory (Forgather or Hugging Face)")
    server.add_argument("-c", "--compile", action="store_true",
                        help="torch.compile the model (the engine compiles its decode step on a GPU anyway; with it, -c "
                             "compiles the model's own step where the engine's fused one does not apply)")
    server.add_argument("--engine", choices=("auto", "on", "off"), default="auto",
                        help="batch requests in the serving engine (auto: on a GPU without --device-map)")
    server.add_argument("--max-num-seqs", type=int, default=16, help="requests the engine decodes at once")
    server.add_argument("--switch-interval", type=float, default=SWITCH_INTERVAL, metavar="SECONDS",
                        help="with the engine: longest wait of its thread for Python's GIL while the event loop "
                             "streams (sys.setswitchinterval; Python's default is 0.005)")
    server.add_argument("--http", choices=("auto", "httptools", "h11"), default="auto",
                        help="uvicorn's HTTP implementation (auto: httptools where installed, else h11)")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--device-map", help="'auto' shards the model over the visible GPUs (or the CPU)")
    server.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    server.add_argument("--api-key", default=os.environ.get("FORGATHER_API_KEY"),
                        help="require this bearer key (default: $FORGATHER_API_KEY; none: no key)")
    server.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without --api-key (a trusted network only)")
    server.add_argument("--served-model-name", help="model id in the API (default: the directory's name)")
    server.add_argument("--max-model-len", type=int, help="context length (default: the model config's)")
    server.add_argument("--log-level", default="info")
    client = roles.add_parser("client", help="talk to a running server")
    client.add_argument("--url", default="http://127.0.0.1:8000", help="server address")
    client.add_argument("--api-key", default=os.environ.get("FORGATHER_API_KEY"))
    client.add_argument("--model", help="model id (default: the server's first)")
    mode = client.add_mutually_exclusive_group(required=True)
    mode.add_argument("--completion", metavar="PROMPT", help="stream a completion of PROMPT")
    mode.add_argument("--chat", action="store_true", help="interactive chat (/reset, /exit)")
    client.add_argument("--system", help="system message for --chat")
    _sampling_arguments(client)


def _sampling(args: argparse.Namespace) -> dict:
    values = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "seed": args.seed, "stop": args.stop}
    return {key: value for key, value in values.items() if value is not None}


def _run_client(args: argparse.Namespace) -> int:
    from forgather.serve.client import Client, ClientError, chat_loop, print_stream

    try:
        client = Client(args.url, args.api_key, args.model)
        if args.chat:
            client.models()  # no server: say so once, before the first prompt, not after every turn
            chat_loop(client, sys.stdin, sys.stdout, args.system, **_sampling(args))
        else:
            print_stream(client.stream_completion(args.completion, **_sampling(args)), sys.stdout)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    if args.role == "client":
        return _run_client(args)
    from forgather.serve.server import serve

    if args.max_num_seqs < 1:
        raise ValueError(f"--max-num-seqs {args.max_num_seqs}; give 1 or more")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}; give a port from 0 to 65535 (0: any free one)")
    if args.max_model_len is not None and args.max_model_len < 1:
        raise ValueError(f"--max-model-len {args.max_model_len}; give 1 or more tokens")
    _check_device_map(args.device_map)
    if not args.switch_interval > 0:
        raise ValueError(f"--switch-interval {args.switch_interval}; give seconds above 0 "
                         f"(default {SWITCH_INTERVAL})")
    serve(args.model, args.host, args.port, args.device_map, args.dtype, args.compile, args.api_key,
          args.served_model_name, args.max_model_len, args.log_level, args.insecure,
          _use_engine(args.engine, args.device_map), args.max_num_seqs, args.switch_interval, args.http)
    return 0


def _check_device_map(device_map: str | None) -> None:
    """A --device-map that names a CUDA device this machine lacks is a one-line error here, not an assertion
    deep inside torch when the weights move (argparse also takes `--device cuda` for --device-map)."""
    if device_map is None or not device_map.startswith("cuda"):
        return
    import torch

    from forgather.errors import MachineError

    index = device_map.partition(":")[2]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise MachineError(f"--device-map {device_map}: this machine has no CUDA GPU that torch {torch.__version__} "
                           f"can use; leave --device-map out (the CPU, or the first GPU where there is one)")
    if index and (not index.isdigit() or int(index) >= count):
        raise MachineError(f"--device-map {device_map}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")


def _use_engine(choice: str, device_map: str | None) -> bool:
    if choice != "auto":
        return choice == "on"
    import torch

    return device_map is None and torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    """`forgather inf ...`, errors reported as the `forgather` command reports them."""
    from forgather.cli.main import main as forgather_main

    return forgather_main(["inf", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
