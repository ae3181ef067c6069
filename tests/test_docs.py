"""docs/syntax.md: every example renders (or constructs) to exactly the output printed beside it."""

from __future__ import annotations

import os
import re

import pytest

from forgather.graph import construct, load_graph, to_config
from forgather.template import TemplateEnvironment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PAIR = re.compile(r"```(forgather(?:-construct)?)\n(.*?)```\s*```(yaml|python)\n(.*?)```", re.S)


def examples() -> list[tuple[str, str, str]]:
    with open(os.path.join(REPO, "docs", "syntax.md"), encoding="utf-8") as file:
        text = file.read()
    return [(kind, source, expected) for kind, source, _, expected in _PAIR.findall(text)]


def test_the_reference_has_examples_of_both_kinds():
    kinds = [kind for kind, _, _ in examples()]
    assert kinds.count("forgather") >= 4 and kinds.count("forgather-construct") >= 1


@pytest.mark.parametrize("kind,source,expected", examples())
def test_example_output_is_exact(tmp_path, kind, source, expected):
    (tmp_path / "example.yaml").write_text(source)
    rendered = TemplateEnvironment([str(tmp_path)]).render("example.yaml")
    if kind == "forgather":
        # A code block ends in a newline even where the rendered text does not (Jinja drops the final one).
        assert rendered == expected or rendered + "\n" == expected
    else:
        assert repr(construct(to_config(load_graph(rendered)).config)) == expected.strip()
