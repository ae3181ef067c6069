"""`forgather inf server|client`: serve a model directory over an OpenAI-compatible API, and talk to it.

`server -m MODEL_DIR` loads a Forgather or Hugging Face Llama-family directory and serves it (FastAPI +
uvicorn, the `serve` extra) on 127.0.0.1:8000 unless told otherwise, through the batching engine on a GPU
(`--engine`); another host needs --api-key (or
--insecure). A Forgather directory's model code runs in the server, as transformers' trust_remote_code does.
`client --completion TEXT` streams a completion, `client --message TEXT` one chat reply; `client --chat` (or
none of these) is an interactive, streaming chat, and text piped in is completed; without a server each says
so in one line. Nothing heavy is imported until `run`.

The reference Forgather's command lines run too: a YAML file of option values before the options (`server
server_config.yaml --port 8001`: its keys are the options' long names, `stop-sequences: [...]`; the command
line wins), its short names (`-p` port, `-d` device, `-t` chat template, `-s` stop sequences, `-l` log level),
`client --message/--interactive/--list-models/--health`, and a --url that ends in /v1. Not its `-c`: here it
compiles (the reference's loads a checkpoint); `-m RUN_DIR` serves a run's newest checkpoint (exported first,
once: `forgather export`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from forgather.serve.server import SWITCH_INTERVAL  # standard library only: --help stays light


def _sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, help="0 = greedy")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", nargs="+", action="extend", help="stop strings (repeatable)")


def server_arguments(server: argparse.ArgumentParser) -> None:
    server.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                        help="YAML file of option values (keys: the long names, e.g. model, port, stop-sequences)")
    server.add_argument("-m", "--model", help="model directory (Forgather or Hugging Face), or a run directory (its newest checkpoint)")
    server.add_argument("-c", "--compile", action="store_true",
                        help="torch.compile the model (the engine compiles its decode step on a GPU anyway; with it, -c "
                             "compiles the model's own step where the engine's fused one does not apply)")
    server.add_argument("--engine", choices=("auto", "on", "off"), default="auto",
                        help="batch requests in the serving engine (auto: on when the model is on one GPU)")
    server.add_argument("--max-num-seqs", type=int, default=16, help="requests the engine decodes at once")
    server.add_argument("--switch-interval", type=float, default=SWITCH_INTERVAL, metavar="SECONDS",
                        help="with the engine: longest wait of its thread for Python's GIL while the event loop "
                             "streams (sys.setswitchinterval; Python's default is 0.005)")
    server.add_argument("--http", choices=("auto", "httptools", "h11"), default="auto",
                        help="uvicorn's HTTP implementation (auto: httptools where installed, else h11)")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    server.add_argument("-p", "--port", type=int, default=8000)
    server.add_argument("-d", "--device-map", "--device", metavar="DEVICE",
                        help="cpu, cuda:N, or 'auto' (shards the model over the visible GPUs)")
    server.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    server.add_argument("-t", "--chat-template", metavar="PATH", help="a Jinja chat template file (default: the tokenizer's)")
    server.add_argument("-s", "--stop-sequences", nargs="+", action="extend", default=[], metavar="TEXT",
                        help="stop strings for every request, beside each request's own")
    server.add_argument("--api-key", default=os.environ.get("FORGATHER_API_KEY"),
                        help="require this bearer key (default: $FORGATHER_API_KEY; none: no key)")
    server.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without --api-key (a trusted network only)")
    server.add_argument("--served-model-name", help="model id in the API (default: the directory's name)")
    server.add_argument("--max-model-len", type=int, help="context length (default: the model config's)")
    server.add_argument("-l", "--log-level", default="info", type=str.lower,
                        choices=("critical", "error", "warning", "info", "debug", "trace"))


def client_arguments(client: argparse.ArgumentParser) -> None:
    client.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                        help="YAML file of option values (keys: the long names, e.g. url, max-tokens)")
    client.add_argument("--url", default="http://127.0.0.1:8000", help="server address (a trailing /v1 is taken too)")
    client.add_argument("--api-key", default=os.environ.get("FORGATHER_API_KEY"))
    client.add_argument("--model", help="model id (default: the server's first)")
    mode = client.add_mutually_exclusive_group()
    mode.add_argument("--completion", metavar="PROMPT", help="stream a completion of PROMPT")
    mode.add_argument("--message", metavar="TEXT", help="stream one chat reply to TEXT")
    mode.add_argument("--chat", "--interactive", action="store_true",
                      help="interactive chat (/reset, /exit); the default, unless text is piped in (completed)")
    mode.add_argument("--list-models", action="store_true", help="print the ids of the models the server serves")
    mode.add_argument("--health", action="store_true", help="say whether the server answers (exit status 0 or 1)")
    client.add_argument("--system", help="system message for --chat and --message")
    client.add_argument("--echo", action=argparse.BooleanOptionalAction, default=False,
                        help="print a completion's prompt before it")
    _sampling_arguments(client)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    roles = parser.add_subparsers(dest="role", metavar="server|client", required=True)
    server_arguments(roles.add_parser("server", help="serve a model directory (OpenAI-compatible API)"))
    client_arguments(roles.add_parser("client", help="talk to a running server"))


def apply_config_file(args: argparse.Namespace, add: Callable[[argparse.ArgumentParser], None]) -> None:
    """Values from `args.config` (a YAML mapping) for the options the command line did not give, as the
    reference Forgather's inference tools take them. `add` adds the options to a parser (their names,
    types and choices). A key that names no option, or a wrong value, is an error naming the file,
    its line and the key."""
    if not args.config:
        return
    from forgather.errors import did_you_mean
    from forgather.yaml_file import read_mapping

    path = Path(args.config).expanduser()
    if path.is_dir() or (not path.exists() and path.suffix.lower() not in (".yaml", ".yml")):
        # `inf client hello` or `inf server MODEL_DIR`: the positional is the reference's options file
        if args.role == "client":
            instead = "to send text, give --completion TEXT or --message TEXT"
        else:
            instead = f"to serve a model directory, give -m {path}" if path.is_dir() else "give the model directory with -m MODEL_DIR"
        what = "a directory" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"{path}: {what}; the positional argument is a YAML file of option values (the "
                                f"options' long names as keys); {instead}")
    values, lines = read_mapping(path, "a YAML file of option values (the options' long names as keys)")
    options = argparse.ArgumentParser(add_help=False)
    add(options)
    given = _given(options, args)
    by_name = {}
    for action in options._actions:  # each long name, with - or _, and the destination
        if action.dest == "config":
            continue
        for name in [action.dest, *(o.lstrip("-") for o in action.option_strings if o.startswith("--"))]:
            by_name[name] = by_name[name.replace("-", "_")] = action
    for key, value in values.items():
        where = f"{path}:{lines[key]}" if key in lines else str(path)
        action = by_name.get(str(key))
        if action is None:
            hint = did_you_mean(str(key), sorted(n for n in by_name if "_" not in n or "-" not in n))
            raise ValueError(f"{where}: unknown key {key!r}; " + (hint or "use the options' long names"))
        if action.dest in given:
            continue  # the command line wins
        setattr(args, action.dest, _config_value(action, value, f"{where}: {key}"))


def _given(options: argparse.ArgumentParser, args: argparse.Namespace) -> set[str]:
    """The destinations the command line gave (`args.argv`, the words after the role, as `forgather` keeps
    them): parsed again by `options` (a parser of this use alone) with no defaults, so that a value given equal
    to its default still counts."""
    words = list(getattr(args, "argv", []))
    start = words.index("inf") + 1 if "inf" in words else 0  # `forgather ... inf ROLE ...`
    words = words[words.index(args.role, start) + 1:] if args.role in words[start:] else []
    for action in options._actions:
        action.default = argparse.SUPPRESS
    return set(vars(options.parse_known_args(words)[0]))


def _config_value(action: argparse.Action, value, where: str):
    """A config file's `value` for `action`, converted and checked as the command line's would be."""
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [_config_value(argparse.Action([], action.dest, type=action.type, choices=action.choices), item, where)
                for item in items]
    if action.nargs == 0:  # a flag (store_true, --echo/--no-echo): true or false
        if not isinstance(value, bool):
            raise ValueError(f"{where}: true or false expected, got {value!r}")
        return value
    if action.type is not None and value is not None:
        try:
            value = action.type(value if isinstance(value, str) else str(value))
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {value!r} is not a {getattr(action.type, '__name__', 'value')}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{where}: {value!r}; use one of {', '.join(map(str, action.choices))}")
    return value


def _sampling(args: argparse.Namespace) -> dict:
    values = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "seed": args.seed, "stop": args.stop}
    return {key: value for key, value in values.items() if value is not None}


def _run_client(args: argparse.Namespace, stdin=None) -> int:
    from forgather.serve.client import Client, ClientError, chat_loop, print_stream

    stdin = sys.stdin if stdin is None else stdin
    # An empty --completion or --message is still that mode (the server says what it makes of it).
    modes = (args.completion is not None, args.message is not None, args.chat, args.list_models, args.health)
    if not any(modes) and not stdin.isatty():  # `echo "Once upon a time" | forgather inf client`
        args.completion = stdin.read().strip() or None
    url = args.url.rstrip("/").removesuffix("/v1")  # the reference's addresses end in /v1
    try:
        client = Client(url, args.api_key, args.model)
        if args.health or args.list_models:
            models = client.models()
            print(f"the server at {url} is up" if args.health else "\n".join(models))
        elif args.completion is not None:
            if args.echo:
                sys.stdout.write(args.completion)
            print_stream(client.stream_completion(args.completion, **_sampling(args)), sys.stdout)
        elif args.message is not None:
            system = [{"role": "system", "content": args.system}] if args.system else []
            print_stream(client.stream_chat([*system, {"role": "user", "content": args.message}], **_sampling(args)),
                         sys.stdout)
        else:
            client.models()  # no server: say so once, before the first prompt, not after every turn
            chat_loop(client, stdin, sys.stdout, args.system, **_sampling(args))
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    if args.role == "client":
        apply_config_file(args, client_arguments)
        return _run_client(args)
    apply_config_file(args, server_arguments)
    if not args.model:
        raise ValueError("inf server: give the model directory: -m MODEL_DIR (or `model:` in the config file)")
    run_dir = Path(args.model).expanduser()
    if (run_dir / "snapshot" / "config.yaml").is_file() and not (run_dir / "config.json").is_file():
        # a run directory (also of a run still training): its newest checkpoint, exported once (forgather export)
        from forgather.run import export_checkpoint

        args.model = str(export_checkpoint(run_dir, reuse=True))
        print(f"serving {run_dir}'s newest checkpoint, exported to {args.model}", file=sys.stderr)
    chat_template = _read_chat_template(args.chat_template) if args.chat_template else None
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
    from forgather.serve.backend import ChatTemplateError

    try:
        serve(args.model, args.host, args.port, args.device_map, args.dtype, args.compile, args.api_key,
              args.served_model_name, args.max_model_len, args.log_level, args.insecure,
              _use_engine(args.engine, args.device_map), args.max_num_seqs, args.switch_interval, args.http,
              chat_template, tuple(args.stop_sequences))
    except ChatTemplateError as error:  # checked once the tokenizer is loaded, before the model
        from forgather.errors import UserError

        raise UserError(f"--chat-template {args.chat_template}: {error}; fix the template, or leave -t out to use "
                        f"the tokenizer's") from None
    return 0


def _read_chat_template(path: str) -> str:
    """The text of the --chat-template file; a one-line UserError when it cannot be read as text."""
    from forgather.errors import UserError

    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--chat-template {path}: no such file; give a Jinja chat template file") from None
    except IsADirectoryError:
        raise UserError(f"--chat-template {path}: is a directory; give a Jinja chat template file") from None
    except UnicodeDecodeError as error:
        raise UserError(f"--chat-template {path}: not UTF-8 text (byte {error.start}); give a Jinja chat template "
                        f"file saved as UTF-8") from None
    except OSError as error:
        raise UserError(f"--chat-template {path}: cannot be read ({error.strerror or error}); give a readable "
                        f"Jinja chat template file") from None


DEVICE_MAPS = "auto, cpu, cuda or cuda:N"  # what --device-map takes


def _check_device_map(device_map: str | None) -> None:
    """A --device-map other than DEVICE_MAPS, or one that names a CUDA device this machine lacks, is a one-line
    error here, not a failure of every request or an assertion deep inside torch when the weights move
    (argparse also takes `--device cuda` for --device-map)."""
    if device_map is None or device_map in ("auto", "cpu"):
        return
    from forgather.errors import MachineError, UserError

    kind, _, index = device_map.partition(":")
    if kind != "cuda" or (":" in device_map and not index.isdigit()):
        raise UserError(f"--device-map {device_map}: give {DEVICE_MAPS}")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise MachineError(f"--device-map {device_map}: this machine has no CUDA GPU that torch {torch.__version__} "
                           f"can use; leave --device-map out (the CPU, or the first GPU where there is one)")
    if index and int(index) >= count:
        raise MachineError(f"--device-map {device_map}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")


def _use_engine(choice: str, device_map: str | None) -> bool:
    """--engine auto: on when the model sits whole on one GPU (no --device-map, or one CUDA device)."""
    if choice != "auto":
        return choice == "on"
    import torch

    one_gpu = device_map is None or device_map == "cuda" or device_map.startswith("cuda:")
    return one_gpu and torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    """`forgather inf ...`, errors reported as the `forgather` command reports them."""
    from forgather.cli.main import main as forgather_main

    return forgather_main(["inf", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
