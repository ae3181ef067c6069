"""`forgather control`: list running training jobs and send them status/save/stop/abort.

Subcommand contract of `forgather.cli.main`: `add_arguments(parser)` and `run(args) -> int` (0 on success).
Torch-free: it reads the job registry and speaks the socket protocol of `forgather.callbacks.job_registry`.
Also runnable as `python -m forgather.cli.control`.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import time
from dataclasses import asdict
from typing import Any

from rich.table import Table

from forgather.callbacks import job_registry
from forgather.cli.common import console as piped_console

_HELP = {
    "list": "list running jobs (removes entries of dead processes)",
    "cleanup": "remove the registry's entries of jobs that ended without removing them, and damaged ones",
    "status": "show step, loss, tokens/s and ETA",
    "save": "checkpoint now and keep training",
    "stop": "checkpoint, then end training cleanly",
    "abort": "end training now without saving (asks first at a terminal, unless --force)",
}
# Why a job did not answer in time: a status is answered at once, an action at the end of a training step.
_WHY_LATE = {
    False: "(its process may be suspended or overloaded)",
    True: "(a job acts at the end of a training step; a long step, validation or checkpoint delays it): withdrawn, "
          "unless the job had begun it; retry with a longer --timeout",
}
# The reference Forgather's names: `save-stop` is our `stop`.
_ALIASES = {"stop": ["save-stop"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="control_command", metavar="COMMAND", required=True)
    listing = commands.add_parser("list", help=_HELP["list"], description=_HELP["list"])
    listing.add_argument("--json", action="store_true", help="print the jobs as a JSON list of their records")
    listing.add_argument("--remote", metavar="HOST:PORT", help=argparse.SUPPRESS)  # the reference's; refused in _run
    cleanup = commands.add_parser("cleanup", help=_HELP["cleanup"], description=_HELP["cleanup"])
    cleanup.add_argument("-f", "--force", action="store_true", help="(the reference's; nothing is asked here)")
    for name in job_registry.COMMANDS:
        sub = commands.add_parser(name, help=_HELP[name], description=_HELP[name], aliases=_ALIASES.get(name, []))
        sub.set_defaults(control_command=name)
        sub.add_argument("job", metavar="JOB", help="job id, a unique prefix of it, or the job's PID (as `list` shows them)")
        # A status is answered at once (a job that does not is suspended); an action waits for the step's end.
        timeout = 15.0 if name == "status" else 120.0
        sub.add_argument("--timeout", type=_seconds, default=timeout, help=f"seconds to wait for the reply (default {timeout:g})")
        sub.add_argument("--json", action="store_true", help="print the raw JSON reply")
        if name == "abort":
            sub.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")


def _seconds(text: str) -> float:
    """A positive number of seconds (0 would make the socket non-blocking: a connection error, not a wait)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got '{text}'")
    return value


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except job_registry.RegistryUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    console = piped_console()
    if args.control_command == "list" and args.remote:
        host = args.remote.rsplit(":", 1)[0]
        print(f"error: --remote {args.remote}: jobs here answer on Unix sockets of their own machine, not over the "
              f"network; list them there: ssh {host} forgather control list", file=sys.stderr)
        return 2
    if args.control_command == "list":
        jobs = job_registry.list_jobs()
        if args.json:
            print(json.dumps([asdict(job) for job in jobs], indent=1))
        else:
            console.print(_jobs_table(jobs))
        return 0
    if args.control_command == "cleanup":
        damaged = job_registry.remove_damaged()
        before = len(job_registry.read_records())
        left = len(job_registry.list_jobs())  # removes the entries of dead processes
        also = f" and {damaged} damaged ones" if damaged else ""
        print(f"removed {before - left} entries of ended jobs{also}; {left} running")
        return 0
    record = job_registry.resolve_job(args.job)  # JobNotFound: one line through forgather.errors.report
    here = socket.gethostname()
    if record.host != here:  # a cache shared between machines: the socket is on the job's host
        print(f"error: job {record.job_id} runs on host {record.host}, not {here}: "
              f"run `forgather control {args.control_command} {record.job_id}` there", file=sys.stderr)
        return 1
    if args.control_command == "abort" and not args.force and not _confirmed(record):
        print(f"job {record.job_id} not aborted", file=sys.stderr)
        return 1
    try:
        reply = job_registry.send_command(record, args.control_command, timeout=args.timeout)
    except TimeoutError:  # the job is there but busy (or suspended); it withdraws an action it has not begun
        print(f"error: job {record.job_id} did not answer '{args.control_command}' within {args.timeout:g} s "
              f"{_WHY_LATE[args.control_command in job_registry.ACTIONS]}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: could not reach job {record.job_id}: {error}; it may have just ended (see `forgather control list`)",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=1))
    elif not reply.get("ok"):
        print(f"error: job {record.job_id}: {reply.get('error')}", file=sys.stderr)
    else:
        console.print(_describe(record.job_id, args.control_command, reply), soft_wrap=True)
    return 0 if reply.get("ok") else 1


def _confirmed(record: job_registry.JobRecord) -> bool:
    """At a terminal, whether the user says yes to losing the training since the last checkpoint (as the
    reference Forgather asks); without one (a script), yes: scripts that abort meant it."""
    if not sys.stdin.isatty():
        return True
    sys.stderr.write(f"abort job {record.job_id} (pid {record.pid}, {record.run_dir}) without saving? Training "
                     f"since its last checkpoint is lost (`forgather control stop` saves first). [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _jobs_table(jobs: list[job_registry.JobRecord]) -> Table:
    table = Table(title="forgather jobs")
    table.add_column("job", no_wrap=True)
    for column in ("pid", "host", "started", "step", "run dir"):
        table.add_column(column)
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time))
        table.add_row(job.job_id, str(job.pid), job.host, started, str(job.step), job.run_dir)
    return table


def _describe(job_id: str, command: str, reply: dict[str, Any]) -> str:
    if command == "status":
        total = reply.get("max_steps")
        step = f"{reply['step']}" + (f"/{int(total)}" if total else "")
        return (
            f"job {job_id}  step {step}  epoch {reply.get('epoch')}  loss {_number(reply.get('loss'))}  "
            f"tokens/s {_number(reply.get('tokens_per_s'), '.0f')}  ETA {_duration(reply.get('eta_s'))}"
        )
    saved = f", checkpoint {reply['checkpoint']}" if "checkpoint" in reply else ""
    note = f"; {reply['note']}" if reply.get("note") else ""
    return f"job {job_id}: {command} done at step {reply.get('step')}{saved}{note}"


def _number(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def main(argv: list[str] | None = None) -> int:
    """`forgather control ...`, errors reported as the `forgather` command reports them."""
    from forgather.cli.main import main as forgather_main

    return forgather_main(["control", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
