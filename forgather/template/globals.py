"""Globals every template can call: time stamps, path helpers, and the user's directories."""

from __future__ import annotations

import datetime
import os

import platformdirs

_APP = "forgather"


def isotime() -> str:
    """Local time, ISO format, 1-second resolution."""
    return datetime.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")


def utcisotime() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def filetime() -> str:
    """Local time in a form that can be part of a file name."""
    return datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")


def utcfiletime() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%S")


GLOBALS = {
    "isotime": isotime,
    "utcisotime": utcisotime,
    "filetime": filetime,
    "utcfiletime": utcfiletime,
    "now": datetime.datetime.now,
    "utcnow": lambda: datetime.datetime.now(datetime.timezone.utc),
    "joinpath": os.path.join,
    "normpath": os.path.normpath,
    "abspath": os.path.abspath,
    "relpath": os.path.relpath,
    "getcwd": os.getcwd,
    "repr": repr,
    "user_home_dir": lambda: os.path.expanduser("~"),
    "user_cache_dir": lambda: platformdirs.user_cache_dir(_APP),
    "user_config_dir": lambda: platformdirs.user_config_dir(_APP),
    "user_data_dir": lambda: platformdirs.user_data_dir(_APP),
}
