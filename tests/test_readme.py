"""The README's two set-up commands are exactly what CI runs."""

from __future__ import annotations

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts: str) -> str:
    with open(os.path.join(REPO, *parts), encoding="utf-8") as file:
        return file.read()


def test_ci_runs_the_readme_commands_verbatim():
    setup = read("README.md").split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert len(commands) == 2
    ci_lines = read(".ci", "run").splitlines()
    for command in commands:
        assert command in ci_lines
