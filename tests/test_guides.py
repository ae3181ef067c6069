"""The guides (docs/guides/) and the example READMEs do what they show: every code block runs or matches.

A ```bash block runs under `bash -eo pipefail` and a ```python block as a script, each in a fresh
workspace (copies of examples/ and tests/helpers/, standing for the repository root) with the venv first
on PATH. An ```output block right after one lists lines that must occur in what it printed. A comment line before a block changes this:
    <!-- slow -->              run it only with -m slow
    <!-- not run: REASON -->   shown, not run (needs a GPU, takes minutes ...)
    <!-- file: PATH -->        the block is the repository file PATH, verbatim
    <!-- excerpt: PATH -->     the block is a verbatim part of the repository file PATH
Blocks of other languages (yaml, text) are shown only, unless a file/excerpt note ties them to a file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Each document, and the workspace directory its commands start in.
DOCUMENTS = {
    "docs/guides/coming_from_forgather.md": ".",
    "docs/guides/composition.md": ".",
    "docs/guides/gpu_training.md": ".",
    "docs/guides/overrides_and_sweeps.md": ".",
    "docs/guides/plain_lightning.md": ".",
    "examples/projects_overview/README.md": ".",
    "examples/template_project/README.md": "examples/template_project",
}
RUNNABLE = ("bash", "python")
_BLOCK = re.compile(
    r"(?:^<!--\s*(?P<note>[^\n]*?)\s*-->\n)?^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```\n(?:\n*^```output\n(?P<output>.*?)^```\n)?",
    re.S | re.M,
)


@dataclass(frozen=True)
class Block:
    document: str
    line: int
    lang: str
    body: str
    note: str
    output: str | None

    @property
    def id(self) -> str:
        return f"{Path(self.document).parent.name}/{Path(self.document).name}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for document in DOCUMENTS:
        text = (REPO / document).read_text(encoding="utf-8")
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("lang")) + 1
            found.append(Block(document, line, match["lang"], match["body"], match["note"] or "", match["output"]))
    return found


def _param(block: Block):
    marks = [pytest.mark.slow] if block.note == "slow" else []
    return pytest.param(block, id=block.id, marks=marks)


BLOCKS = blocks()
RUN = [_param(b) for b in BLOCKS if b.lang in RUNNABLE and not b.note.startswith(("not run:", "file:", "excerpt:"))]
TIED = [_param(b) for b in BLOCKS if b.note.startswith(("file:", "excerpt:"))]


def test_every_document_has_blocks_that_run():
    documents = {b.values[0].document for b in RUN}
    assert documents == set(DOCUMENTS)


def test_blocks_left_unrun_say_why():
    for block in BLOCKS:
        if block.note.startswith("not run"):
            assert len(block.note.removeprefix("not run:").strip()) > 10, f"{block.id}: say why it is not run"
        else:
            assert block.note in ("", "slow") or block.note.startswith(("file:", "excerpt:")), f"{block.id}: unknown note {block.note!r}"


UNRUN = [_param(b) for b in BLOCKS if b.lang in RUNNABLE and b.note.startswith("not run:")]


@pytest.mark.parametrize("block", UNRUN)
def test_blocks_left_unrun_still_parse(block: Block):
    if block.lang == "python":
        compile(block.body, block.id, "exec")
    else:
        result = subprocess.run(["bash", "-n", "-c", block.body], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "outputs", "multirun", "output_models")
    for directory in ("examples", "tests/helpers"):
        shutil.copytree(REPO / directory, tmp_path / directory, ignore=ignore)
    return tmp_path


def run_block(block: Block, root: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    if block.lang == "bash":
        command = ["bash", "-eo", "pipefail", "-c", block.body]
    else:
        (root / "guide_block.py").write_text(block.body)
        command = [sys.executable, str(root / "guide_block.py")]
    cwd = root / DOCUMENTS[block.document]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    printed = result.stdout + result.stderr
    assert result.returncode == 0, f"{block.id} failed:\n{block.body}\n---\n{printed[-4000:]}"
    return printed


@pytest.mark.parametrize("block", RUN)
def test_block_runs_and_prints_what_the_guide_shows(block: Block, workspace: Path):
    printed = run_block(block, workspace)
    normalized = re.sub(r"[ \t]+", " ", printed)
    for line in (block.output or "").splitlines():
        wanted = re.sub(r"[ \t]+", " ", line.strip())
        assert wanted in normalized, f"{block.id}: {wanted!r} not in the output:\n{printed[-4000:]}"


@pytest.mark.parametrize("block", TIED)
def test_block_is_the_file_it_names(block: Block):
    kind, _, path = block.note.partition(":")
    text = (REPO / path.strip()).read_text(encoding="utf-8")
    assert block.body == text if kind == "file" else block.body in text
