"""`forgather tb`: TensorBoard over a project's runs (outputs/ and multirun/), on localhost; the words after
`--` go to TensorBoard (`forgather tb -- --bind_all`, as the reference Forgather's).

TensorBoard runs as a child process that never outlives the command: SIGINT, SIGTERM and SIGHUP sent to
`forgather tb` are passed on to TensorBoard, and the command exits when TensorBoard has (with its status,
128 + N for a signal N, as a shell reports it).
"""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import signal
import socket
import subprocess
import sys

from forgather.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logdir", nargs="?", help="directory of runs (default: the project's outputs and multirun)")
    parser.add_argument("--port", type=_port, default=6006, help="port to serve on (default 6006)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--dry-run", action="store_true", help="print the TensorBoard command, and exit")
    parser.add_argument("--all", action="store_true", help="every run of the project (the default; the reference's flag)")
    parser.add_argument("--output-dir", metavar="DIR",
                        help="a model's output directory, as the reference's `forgather tb --output-dir DIR`: the same as "
                             "giving DIR as the directory of runs")
    parser.epilog = "Words after -- go to TensorBoard as they are: forgather tb -- --samples_per_plugin images=100"


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 0 to 65535")
    return int(text)


def command(args: argparse.Namespace) -> list[str]:
    if args.logdir and args.output_dir:
        raise UserError(f"forgather tb: {args.logdir} and --output-dir {args.output_dir}: give one directory of runs")
    given = args.logdir or args.output_dir
    if given:
        logdir = os.path.abspath(given)
        if not os.path.isdir(logdir):  # TensorBoard would serve the missing directory, empty, without a word
            raise FileNotFoundError(f"forgather tb: {given} is not a directory; give a directory of runs (an "
                                    "outputs/ or multirun/ folder, or one run's), or none for the project's")
    else:
        roots = [os.path.join(os.path.abspath(args.project), name) for name in ("outputs", "multirun")]
        logdir = ",".join(f"{os.path.basename(r)}:{r}" for r in roots if os.path.isdir(r)) or roots[0]
    flag = "--logdir_spec" if ":" in logdir and not given else "--logdir"
    if not _has_logs(logdir if given else [r for r in roots if os.path.isdir(r)]):
        # TensorBoard would show an empty page without a word; a run started later still appears in it
        where = given or " or ".join(roots)
        print(f"warning: no TensorBoard logs under {where} yet (a run writes them to <run directory>/tb/); "
              "pass the directory of your runs, or -p PROJECT", file=sys.stderr)
    extra = list(getattr(args, "passthrough", []))
    # TensorBoard refuses --host beside --bind_all (every interface), which the user asked for explicitly
    host = [] if any(word.split("=")[0] in ("--bind_all", "--host") for word in extra) else ["--host", args.host]
    return [sys.executable, "-m", "tensorboard.main", flag, logdir, *host, "--port", str(args.port), *extra]


def _has_logs(directories: str | list[str]) -> bool:
    from pathlib import Path

    directories = [directories] if isinstance(directories, str) else directories
    return any(next(Path(d).rglob("events.out.tfevents*"), None) is not None for d in directories)


def run(args: argparse.Namespace) -> int:
    argv = command(args)
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    _check_port_free("" if any(w.split("=")[0] == "--bind_all" for w in argv) else args.host, args.port)
    return run_forwarding_signals(argv)


def _check_port_free(host: str, port: int) -> None:
    """TensorBoard would say a busy port, or an address it cannot serve on, among lines of its own logging;
    say it first, in one line."""
    try:
        socket.create_server((host, port)).close()
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise UserError(f"forgather tb: port {port} is in use (another TensorBoard?); "
                            "pass another --port, or stop what holds it") from error
        # a name that does not resolve: getaddrinfo's EAI_* codes (negative), which create_server re-raises as is
        if error.errno == errno.EADDRNOTAVAIL or (error.errno or 0) < 0:
            raise UserError(f"forgather tb: --host {host}: {error.strerror}; give a name or address of this machine "
                            "(default 127.0.0.1), or serve on every interface with: forgather tb -- --bind_all") from error


_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_forwarding_signals(argv: list[str]) -> int:
    """Run `argv` as a child, pass it the signals that would end this process, and wait for it to end."""
    child: subprocess.Popen | None = None
    pending: list[int] = []  # a signal that came before the child existed

    def forward(signum: int, frame) -> None:
        if child is None:
            pending.append(signum)
        else:
            child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED}
    try:
        child = subprocess.Popen(argv)
        for signum in pending:
            child.send_signal(signum)
        status = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - status if status < 0 else status
