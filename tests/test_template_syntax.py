"""The template stage: every element of the line syntax, split files, globals and filters, exactly."""

from __future__ import annotations

import os
import textwrap

import pytest

from forgather.template import TemplateEnvironment, TemplateError
from forgather.template.preprocess import preprocess


def render(tmp_path, files: dict[str, str], name: str, **context) -> str:
    for file_name, text in files.items():
        path = tmp_path / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return TemplateEnvironment([str(tmp_path)]).render(name, **context)


def test_comment_lines_and_trailing_comments_vanish(tmp_path):
    out = render(tmp_path, {"t.yaml": "## a comment\na: 1  ## trailing\n  ## indented\nb: 2\n"}, "t.yaml")
    assert out == "a: 1\nb: 2\n"


def test_statement_lines_leave_no_trace(tmp_path):
    source = """\
    -- set items = [1, 2, 3]
    list:
    -- for i in items
      - {{ i }}
    -- endfor
    """
    assert render(tmp_path, {"t.yaml": source}, "t.yaml") == "list:\n  - 1\n  - 2\n  - 3\n"


def test_left_trim_statement_joins_with_the_previous_line(tmp_path):
    source = "a: [\n-- for i in range(3)\n{{ i }},\n<< endfor\n]\n"
    assert render(tmp_path, {"t.yaml": source}, "t.yaml") == "a: [\n0,1,2,]\n"


def test_right_trim_statement_strips_whitespace_after(tmp_path):
    source = "a:\n>> if true\n\n     b\n-- endif\n"
    assert render(tmp_path, {"t.yaml": source}, "t.yaml") == "a:\nb\n"


def test_print_line_keeps_indentation_and_newline(tmp_path):
    source = "model:\n    == 'hidden: ' ~ (size * 2)\nnext: 1\n"
    assert render(tmp_path, {"t.yaml": source}, "t.yaml", size=16) == "model:\n    hidden: 32\nnext: 1\n"


def test_trimmed_print_line_joins_the_next_line(tmp_path):
    source = "key: \n=> 'value'\n  # end\n"
    assert render(tmp_path, {"t.yaml": source}, "t.yaml") == "key: \nvalue# end\n"


def test_blocks_are_overridden_and_super_keeps_the_parent(tmp_path):
    files = {
        "base.yaml": "[head]\na: 1\n[body]\nb: 2\n",
        "child.yaml": "-- extends 'base.yaml'\n[body]\n== super()\nc: 3\n",
    }
    assert render(tmp_path, files, "child.yaml") == "a: 1\nb: 2\n\nc: 3\n"


def test_blocks_nest_by_indentation_and_close_on_dedent(tmp_path):
    files = {
        "base.yaml": """\
        [model]
        model:
            [model_args]
            hidden: 32
            layers: 2
        optimizer: sgd
        """,
        "child.yaml": "-- extends 'base.yaml'\n[model_args]\n    hidden: 64\n",
    }
    assert render(tmp_path, files, "base.yaml") == "model:\n    hidden: 32\n    layers: 2\noptimizer: sgd\n"
    assert render(tmp_path, files, "child.yaml") == "model:\n    hidden: 64\noptimizer: sgd\n"


def test_trimmed_block_drops_blank_lines_around_its_content(tmp_path):
    source = "a: 1\n[loose]\n\nb: 2\n\n[tight!]\n\nc: 3\n\n\n"
    assert render(tmp_path, {"t.yaml": source}, "t.yaml") == "a: 1\n\nb: 2\n\nc: 3\n"


def test_preprocessor_keeps_the_line_count():
    source = "## c\n-- if x\n[a]\n  [b!]\n\n  v: 1\n\nw: 2\n== y\n=> z\n<< endif\n"
    assert preprocess(source).count("\n") == source.count("\n")


def test_split_file_sub_template_extends_another_base(tmp_path):
    files = {
        "base.yaml": "[opt]\noptimizer: {{ kind }}\n",
        "other.yaml": "[args]\nlr: 1\n",
        "main.yaml": """\
        -- set kind = 'sgd'
        -- extends 'base.yaml'
        [opt]
        optimizer: adam
        -- include 'main.args'
        #------------- main.args -------------
        -- extends 'other.yaml'
        [args]
        lr: 3
        """,
    }
    assert render(tmp_path, files, "main.yaml") == "optimizer: adam\nlr: 3\n"


def test_sub_template_is_loadable_after_its_file(tmp_path):
    files = {"multi.yaml": "first: 1\n#--- second ---\nsecond: 2\n"}
    env = TemplateEnvironment([str(tmp_path)])
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert env.render("multi.yaml") == "first: 1\n"
    assert env.render("second") == "second: 2\n"


def test_search_path_order_lets_a_project_shadow_the_library(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "proj").mkdir()
    (tmp_path / "lib" / "x.yaml").write_text("from: lib\n")
    (tmp_path / "lib" / "y.yaml").write_text("from: lib\n")
    (tmp_path / "proj" / "x.yaml").write_text("from: project\n")
    env = TemplateEnvironment([str(tmp_path / "proj"), str(tmp_path / "lib")])
    assert env.render("x.yaml") == "from: project\n"
    assert env.render("y.yaml") == "from: lib\n"


def test_path_globals(tmp_path):
    source = "{{ joinpath('a', 'b') }} {{ normpath('a/../b') }} {{ relpath(abspath('c'), getcwd()) }} {{ user_home_dir() == home }}\n"
    out = render(tmp_path, {"t.yaml": source}, "t.yaml", home=os.path.expanduser("~"))
    assert out == "a/b b c True\n"


def test_time_globals_have_their_formats(tmp_path):
    import re

    out = render(tmp_path, {"t.yaml": "{{ isotime() }}|{{ utcisotime() }}|{{ filetime() }}|{{ now().year > 2000 }}\n"}, "t.yaml")
    iso, utc, file_time, year_ok = out.strip().split("|")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", iso) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", utc)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d", file_time) and year_ok == "True"


def test_user_directory_globals_name_forgather_dirs(tmp_path):
    out = render(tmp_path, {"t.yaml": "{{ user_cache_dir() }}\n{{ user_config_dir() }}\n"}, "t.yaml")
    assert all("forgather" in line for line in out.splitlines())


def test_toyaml_renders_inline_yaml_and_takes_a_default(tmp_path):
    source = "a: {{ value | toyaml }}\nb: {{ absent | toyaml(0.5) }}\nc: {{ text | toyaml }}\n"
    out = render(tmp_path, {"t.yaml": source}, "t.yaml", value={"x": [1, 2]}, text="yes")
    assert out == "a: {x: [1, 2]}\nb: 0.5\nc: 'yes'\n"


def test_toyaml_without_default_on_undefined_is_an_error(tmp_path):
    with pytest.raises(TemplateError, match="absent"):
        render(tmp_path, {"t.yaml": "a: {{ absent | toyaml }}\n"}, "t.yaml")


def test_explicit_close_ends_a_block_before_sibling_lines(tmp_path):
    files = {
        "base.yaml": "trainer:\n    [strategy]\n    [/strategy]\n    max_steps: 5\n",
        "child.yaml": "-- extends 'base.yaml'\n[strategy]\n    strategy: ddp\n",
    }
    assert render(tmp_path, files, "base.yaml") == "trainer:\n    max_steps: 5\n"
    assert render(tmp_path, files, "child.yaml") == "trainer:\n    strategy: ddp\n    max_steps: 5\n"


def test_closing_a_block_that_is_not_open_is_a_located_error(tmp_path):
    with pytest.raises(TemplateError, match=r"t.yaml:2: template syntax error: \[/nope\] closes no open block"):
        render(tmp_path, {"t.yaml": "a: 1\n[/nope]\n"}, "t.yaml")
