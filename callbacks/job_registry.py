"""Job registry and control protocol shared by the `JobControl` callback and `forgather control`.

Torch-free on purpose: the CLI imports it. A running job is one JSON file `<cache>/jobs/<job_id>.json`
(cache: `$FORGATHER_CACHE_DIR`, else `platformdirs.user_cache_dir("forgather")`), written atomically, and a
Unix socket only its owner can open. One id, one running job: `register` publishes a record only where no
live job holds its id (of two jobs registering one id at once, the second is refused: a lock file beside the
records). A record names its host: on a cache shared between machines, only that host can reach the socket.
A message on that socket is one line of JSON: the client sends `{"command": ..., "timeout": ...}` and reads one
reply `{"ok": bool, ...}`; an action its job has not begun when the client stops waiting (the timeout passed,
or it closed the connection) is withdrawn.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_type_hints

from forgather.errors import UserError

CACHE_ENV = "FORGATHER_CACHE_DIR"
COMMANDS = ("status", "save", "stop", "abort")
# Commands the training loop acts on (every rank, same step); `status` is answered by the server thread.
ACTIONS = ("save", "stop", "abort")
_MAX_MESSAGE = 1 << 20


class JobNotFound(UserError, LookupError):
    """No registered job matches the given id, PID or prefix, or the prefix matches several."""


class JobIdTaken(UserError, ValueError):
    """A running job already holds the id a new job registers under."""


class RegistryUnavailable(RuntimeError):
    """The registry directory cannot be created or read; the message names it and what to do."""


@dataclass
class JobRecord:
    """What a running job publishes about itself in the registry."""

    job_id: str
    pid: int
    host: str
    run_dir: str
    start_time: float
    step: int
    socket: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "JobRecord":
        """The record `text` holds; ValueError/TypeError for any other JSON (a damaged or foreign file)."""
        record = cls(**json.loads(text))
        for name, kind in get_type_hints(cls).items():
            value = getattr(record, name)
            if not isinstance(value, (int, float) if kind is float else kind) or isinstance(value, bool):
                raise TypeError(f"job record field {name!r} is not a {kind.__name__}")
        return record


def cache_dir() -> Path:
    """Forgather's per-user cache directory (`$FORGATHER_CACHE_DIR` overrides it)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_cache_dir("forgather"))


def jobs_dir() -> Path:
    """The registry directory, created private (0700) on first use."""
    path = cache_dir() / "jobs"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as error:
        raise _unavailable(path, error) from error
    return path


def _unavailable(path: Path, error: OSError) -> RegistryUnavailable:
    return RegistryUnavailable(
        f"cannot use the job registry {path}: {error.strerror or error} "
        f"(fix its permissions, or point ${CACHE_ENV} at a directory of your own)"
    )


def write_record(record: JobRecord) -> Path:
    """Publish (or refresh) a record; readers never see a half-written file."""
    directory = jobs_dir()
    target = directory / f"{record.job_id}.json"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{record.job_id}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(record.to_json())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def register(record: JobRecord) -> Path:
    """Publish a new job's record, unless a live job holds its id (JobIdTaken); a dead job's record is replaced."""
    directory = jobs_dir()
    # The check and the write under one lock: of two jobs registering one id at once, the second sees the first.
    with open(directory / ".register.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        holder = _read(directory / f"{record.job_id}.json")
        if holder is not None and is_alive(holder):
            raise JobIdTaken(
                f"job id '{record.job_id}' is taken by the running job of pid {holder.pid} ({holder.run_dir}): "
                f"give this run another job_id, or leave it unset for a random one"
            )
        return write_record(record)


def remove_record(job_id: str) -> None:
    (jobs_dir() / f"{job_id}.json").unlink(missing_ok=True)


def _entries() -> list[Path]:
    directory = jobs_dir()
    try:
        # Not Path.glob: it reads an unreadable directory as an empty one.
        return [directory / name for name in os.listdir(directory)]
    except OSError as error:
        raise _unavailable(directory, error) from error


def _read(path: Path) -> JobRecord | None:
    try:
        return JobRecord.from_json(path.read_text())
    except (OSError, ValueError, TypeError):
        return None


def read_records() -> list[JobRecord]:
    """Every readable record, oldest first; damaged files (written whole by `write_record`, so damaged on disk)
    are skipped: `remove_damaged` removes them."""
    records = [record for path in _entries() if path.suffix == ".json" and (record := _read(path)) is not None]
    return sorted(records, key=lambda r: r.start_time)


# A writer's temporary file older than this is left by a writer that was killed.
_STALE_TMP_S = 60.0


def remove_damaged() -> int:
    """Remove records that do not read as one, and temporary files of writers killed mid-write; their number."""
    removed = 0
    for path in _entries():
        try:
            stale = path.suffix == ".tmp" and time.time() - path.stat().st_mtime > _STALE_TMP_S
        except OSError:
            continue
        if stale or (path.suffix == ".json" and path.is_file() and _read(path) is None):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def is_alive(record: JobRecord) -> bool:
    """Whether the job's process still runs; a job on another host is assumed alive (we cannot tell)."""
    if record.host != socket.gethostname():
        return True
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # A PID is reused once its process ends: a process started after the job registered is another one.
    started = _process_start(record.pid)
    return started is None or started <= record.start_time + _CLOCK_SLACK_S


# Seconds of disagreement allowed between the kernel's process start time and the wall clock the job read.
_CLOCK_SLACK_S = 2.0


def _process_start(pid: int) -> float | None:
    """When process `pid` started, in seconds since the epoch (Linux's /proc); None where that is unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
        ticks = int(stat.rpartition(")")[2].split()[19])  # field 22, counted after the command name, which may hold spaces
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def list_jobs() -> list[JobRecord]:
    """Live jobs; records of dead processes (killed before they could deregister) are removed."""
    live = []
    for record in read_records():
        if is_alive(record):
            live.append(record)
        else:
            _remove_socket(Path(record.socket))
            remove_record(record.job_id)
    return live


def _remove_socket(path: Path) -> None:
    """Remove a dead job's socket and its private directory (only if nothing else is in it)."""
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass


def resolve_job(ref: str) -> JobRecord:
    """The live job whose id is `ref`, else the one whose PID on this host is `ref` (what `list` shows beside
    the id) or whose id starts with `ref`; raises JobNotFound when none or several match (a PID that is also
    the start of another job's id is ambiguous: hex ids often start with digits)."""
    jobs = list_jobs()
    for record in jobs:
        if record.job_id == ref:
            return record
    host = socket.gethostname()
    matches = [r for r in jobs if r.job_id.startswith(ref) or (ref.isdigit() and r.pid == int(ref) and r.host == host)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise JobNotFound(f"no running job has the id, PID or id prefix '{ref}' (see `forgather control list`)")
    ids = ", ".join(r.job_id for r in matches)
    raise JobNotFound(f"'{ref}' is ambiguous: it matches {ids}; give more characters")


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def receive_message(sock: socket.socket) -> dict[str, Any]:
    """Read one newline-terminated JSON message; raises ConnectionError if the peer closes first."""
    buffer = bytearray()
    while not buffer.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed before a complete message arrived")
        buffer += chunk
        if len(buffer) > _MAX_MESSAGE:
            raise ConnectionError("message too long")
    return json.loads(buffer)


def send_command(record: JobRecord, command: str, timeout: float = 120.0) -> dict[str, Any]:
    """Send one command to a job and wait (at most `timeout` seconds) for its reply."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command '{command}'; expected one of {', '.join(COMMANDS)}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(record.socket)
        send_message(sock, {"command": command, "timeout": timeout})
        return receive_message(sock)


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (Linux SO_PEERCRED); None if unknown."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def peer_allowed(sock: socket.socket, owner_uid: int) -> bool:
    """Only the job's owner may command it. Where the kernel cannot name the peer (non-Linux), the private
    (0700) socket directory is what keeps other users out."""
    uid = peer_uid(sock)
    return uid is None or uid == owner_uid
