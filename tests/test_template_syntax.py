"""The template stage: every rule of the line syntax (the reference Forgather's), split files, globals and filters,
exactly. Expected outputs are what the reference renders for the same files (scripts/parity_reference.py runs both)."""

from __future__ import annotations

import os
import textwrap

import pytest

from forgather.template import TemplateEnvironment, TemplateError
from forgather.template.preprocess import preprocess


def write_files(tmp_path, files: dict[str, str]) -> None:
    for file_name, text in files.items():
        path = tmp_path / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def render(tmp_path, files: dict[str, str], name: str, **context) -> str:
    write_files(tmp_path, files)
    return TemplateEnvironment([str(tmp_path)]).render(name, **context)


def test_comment_line_leaves_nothing_and_a_trailing_comment_keeps_the_space_before_it(tmp_path):
    out = render(tmp_path, {"t.yaml": "## a comment\na: 1  ## trailing\n  ## indented\nb: 2\n"}, "t.yaml")
    assert out == "a: 1 \nb: 2"


def test_trailing_comment_starts_at_the_last_double_hash(tmp_path):
    out = render(tmp_path, {"t.yaml": "url: a ## b ## c\nx: '#'\n### three\n"}, "t.yaml")
    assert out == "url: a ## b\nx: '#'\n"


def test_output_has_no_trailing_newline_unless_a_block_ends_it(tmp_path):
    assert render(tmp_path, {"t.yaml": "a: 1\n"}, "t.yaml") == "a: 1"
    assert render(tmp_path, {"u.yaml": "[a]\na: 1\n"}, "u.yaml") == "a: 1\n"


def test_statement_lines_leave_no_trace(tmp_path):
    source = "list:\n-- for i in [1, 2]\n  - {{ i }}\n-- endfor\n"
    assert render(tmp_path, {"t.yaml": source}, "t.yaml") == "list:\n  - 1\n  - 2\n"


def test_a_line_statement_replaces_its_leading_whitespace_too(tmp_path):
    source = "a:\n    -- set x = 1\n    == 'b: ' ~ x\n    c: {{ x }}\n"
    assert render(tmp_path, {"t.yaml": source}, "t.yaml") == "a:\nb: 1\n    c: 1"


def test_indented_super_prints_the_parent_lines_at_their_own_indentation(tmp_path):
    files = {
        "base.yaml": "top: 0\n[body]\n    a: 1\n    b: 2\n",
        "child.yaml": "-- extends 'base.yaml'\n[body]\n    == super()\n    c: 3\n",
    }
    assert render(tmp_path, files, "child.yaml") == "top: 0\n    a: 1\n    b: 2\n\n    c: 3\n"


def test_left_trim_statement_joins_with_the_previous_line(tmp_path):
    source = "a: [\n-- for i in range(3)\n{{ i }},\n<< endfor\n]\n"
    assert render(tmp_path, {"t.yaml": source}, "t.yaml") == "a: [\n0,1,2,]"


def test_right_trim_statement_strips_whitespace_after(tmp_path):
    source = "a:\n>> if true\n\n     b\n-- endif\n"
    assert render(tmp_path, {"t.yaml": source}, "t.yaml") == "a:\nb\n"


def test_trimmed_print_trims_newlines_of_the_value_and_keeps_its_own(tmp_path):
    source = "key: \n=> 'value\\n\\n'\nnext: 1\n"
    assert render(tmp_path, {"t.yaml": source}, "t.yaml") == "key: \nvalue\nnext: 1"


def test_an_operator_must_be_followed_by_whitespace(tmp_path):
    source = "--\n---\n<<: *x\n"
    assert render(tmp_path, {"t.yaml": source}, "t.yaml") == source[:-1]


def test_a_slash_name_line_is_text_not_a_block_closer(tmp_path):
    assert render(tmp_path, {"t.yaml": "[a]\nx: 1\n[/a]\ny: 2\n"}, "t.yaml") == "x: 1\n[/a]\ny: 2\n"


def test_windows_line_ends_are_line_ends(tmp_path):
    (tmp_path / "t.yaml").write_bytes(b"a: 1\r\n-- set b = 2\r\nb: {{ b }}\r\n")
    assert TemplateEnvironment([str(tmp_path)]).render("t.yaml") == "a: 1\nb: 2"


def test_raw_tags_keep_the_whitespace_before_them(tmp_path):
    (tmp_path / "t.yaml").write_text("    {% if true %}\n    a: 1\n    {% endif %}\n")
    assert TemplateEnvironment([str(tmp_path)]).render("t.yaml") == "        a: 1\n    "


def test_blocks_are_overridden_and_consecutive_blocks_are_a_blank_line_apart(tmp_path):
    files = {
        "base.yaml": "[head]\na: 1\n[body]\nb: 2\n",
        "child.yaml": "-- extends 'base.yaml'\n[body]\n== super()\nc: 3\n",
    }
    assert render(tmp_path, files, "base.yaml") == "a: 1\n\nb: 2\n"
    assert render(tmp_path, files, "child.yaml") == "a: 1\n\nb: 2\n\nc: 3\n"


def test_a_block_does_not_close_at_a_dedented_line(tmp_path):
    files = {
        "base.yaml": "model:\n    [model_args]\n    hidden: 32\noptimizer: sgd\n",
        "child.yaml": "-- extends 'base.yaml'\n[model_args]\n    hidden: 64\n",
    }
    assert render(tmp_path, files, "base.yaml") == "model:\n    hidden: 32\noptimizer: sgd\n"
    # `optimizer: sgd` belongs to [model_args]: the override replaces it too.
    assert render(tmp_path, files, "child.yaml") == "model:\n    hidden: 64\n"


def test_blocks_nest_by_indentation_and_close_at_a_header_as_far_left(tmp_path):
    files = {
        "base.yaml": "[outer]\nouter:\n    [inner]\n    i: 1\n    [inner2]\n    j: 2\n[last]\nz: 0\n",
        "child.yaml": "-- extends 'base.yaml'\n[inner2]\n    j: 3\n",
    }
    assert render(tmp_path, files, "child.yaml") == "outer:\n    i: 1\n\n    j: 3\n\n\nz: 0\n"


def test_block_statements_end_a_block_before_the_lines_after_it(tmp_path):
    files = {
        "base.yaml": "trainer:\n    -- block strategy\n    -- endblock strategy\n    max_steps: 5\n",
        "child.yaml": "-- extends 'base.yaml'\n[strategy]\n    strategy: ddp\n",
    }
    assert render(tmp_path, files, "base.yaml") == "trainer:\n    max_steps: 5"
    assert render(tmp_path, files, "child.yaml") == "trainer:\n    strategy: ddp\n    max_steps: 5"


def test_a_block_closed_on_a_line_with_content_gets_its_newline(tmp_path):
    files = {"base.yaml": "[a]\nx: 1\n[b]\ny: 1\n", "child.yaml": "-- extends 'base.yaml'\n[a]\nx: 2"}
    assert render(tmp_path, files, "child.yaml") == "x: 2\n\ny: 1\n"


def test_trimmed_block_is_wrapped_in_the_trim_filter(tmp_path):
    source = "a: 1\n[tight!]\n\nc: 3\n\n[next]\nd: 4\n"
    # trim takes the block's surrounding whitespace, its final newline included.
    assert render(tmp_path, {"t.yaml": source}, "t.yaml") == "a: 1\nc: 3d: 4\n"


def test_preprocessor_keeps_the_line_count():
    source = "## c\n-- if x\n[a]\n  [b!]\n\n  v: 1 ## t\n\nw: 2\n== y\n=> z\n<< endif\n[c]\nlast"
    assert preprocess(source).count("\n") == source.count("\n")


def test_a_comment_holding_a_comment_end_stays_a_comment(tmp_path):
    assert render(tmp_path, {"t.yaml": "## see #} here\na: 1\n"}, "t.yaml") == "a: 1"


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
    assert render(tmp_path, files, "main.yaml") == "optimizer: adam\nlr: 3\n\n"


def test_sub_template_is_loadable_after_its_file(tmp_path):
    files = {"multi.yaml": "first: 1\n#--- second ---\nsecond: 2\n"}
    env = TemplateEnvironment([str(tmp_path)])
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert env.render("multi.yaml") == "first: 1"
    assert env.render("second") == "second: 2"


def test_search_path_order_lets_a_project_shadow_the_library(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "proj").mkdir()
    (tmp_path / "lib" / "x.yaml").write_text("from: lib\n")
    (tmp_path / "lib" / "y.yaml").write_text("from: lib\n")
    (tmp_path / "proj" / "x.yaml").write_text("from: project\n")
    env = TemplateEnvironment([str(tmp_path / "proj"), str(tmp_path / "lib")])
    assert env.render("x.yaml") == "from: project"
    assert env.render("y.yaml") == "from: lib"


def test_path_globals(tmp_path):
    source = "{{ joinpath('a', 'b') }} {{ normpath('a/../b') }} {{ relpath(abspath('c'), getcwd()) }} {{ user_home_dir() == home }}\n"
    out = render(tmp_path, {"t.yaml": source}, "t.yaml", home=os.path.expanduser("~"))
    assert out == "a/b b c True"


def test_time_globals_have_their_formats(tmp_path):
    import re

    out = render(tmp_path, {"t.yaml": "{{ isotime() }}|{{ utcisotime() }}|{{ filetime() }}|{{ now().year > 2000 }}\n"}, "t.yaml")
    iso, utc, file_time, year_ok = out.strip().split("|")
    # The reference's utcisotime() carries the UTC offset (isoformat of an aware time); isotime() does not.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", iso) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", utc)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d", file_time) and year_ok == "True"


def test_getenv_reads_the_environment_with_a_default(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("RANK", raising=False)
    out = render(tmp_path, {"t.yaml": "{{ getenv('WORLD_SIZE', '1') | int * 2 }} {{ getenv('RANK', '0') }}\n"}, "t.yaml")
    assert out == "8 0"


def test_template_raise_and_assert_stop_at_their_line(tmp_path):
    files = {
        "ok.yaml": "a: 1\n== assert(4 % 2 == 0, 'even')\nb: 2\n",
        "bad.yaml": "a: 1\n-- if 3 % 2\n    == raise('batch must divide by stages')\n-- endif\n",
        "off.yaml": "a: 1\n\n== assert(3 % 2 == 0, 'stages must divide the batch')\n",
    }
    write_files(tmp_path, files)
    env = TemplateEnvironment([str(tmp_path)])
    assert env.render("ok.yaml") == "a: 1\n\nb: 2"  # a holding assert prints nothing
    with pytest.raises(TemplateError, match=r"bad\.yaml:3: the template stopped: batch must divide by stages"):
        env.render("bad.yaml")
    with pytest.raises(TemplateError, match=r"off\.yaml:3: the template stopped: stages must divide the batch"):
        env.render("off.yaml")


def test_user_directory_globals_are_platformdirs_functions(tmp_path):
    # As in the reference: platformdirs' functions, so an app name is an argument; forgather_config_dir() is ours.
    import platformdirs

    source = "{{ user_cache_dir() }}\n{{ user_config_dir('forgather') }}\n{{ forgather_config_dir() }}\n"
    cache, config, ours = render(tmp_path, {"t.yaml": source}, "t.yaml").splitlines()
    assert cache == platformdirs.user_cache_dir() and "forgather" not in cache
    assert config == ours == platformdirs.user_config_dir("forgather")


def test_split_name_does_not_swallow_the_dashes(tmp_path):
    files = {"m.yaml": "main: 1\n#---- m.part----\npart: 2\n#--- m.last ---\nlast: 3\n"}
    env = TemplateEnvironment([str(tmp_path)])
    write_files(tmp_path, files)
    assert env.render("m.yaml") == "main: 1"
    assert env.render("m.part") == "part: 2"
    assert env.render("m.last") == "last: 3"


def test_a_separator_needs_a_line_above_it_and_is_not_one_right_below_another(tmp_path):
    write_files(tmp_path, {"m.yaml": "#---- m.first ----\nfirst: 1\n#---- m.a ----\n#---- m.b ----\nb: 2\n"})
    env = TemplateEnvironment([str(tmp_path)])
    assert env.render("m.yaml") == "#---- m.first ----\nfirst: 1"
    assert env.render("m.a") == "#---- m.b ----\nb: 2"


def test_toyaml_writes_python_booleans_sorted_keys_and_takes_a_default(tmp_path):
    source = "a: {{ flag | toyaml }}\nb: {{ none | toyaml }}\nc: {{ d | toyaml }}\ne: {{ 0.5 | toyaml }}\nf: {{ 'yes' | toyaml }}\ng: {{ absent | toyaml(False) }}\n"
    out = render(tmp_path, {"t.yaml": source}, "t.yaml", flag=True, none=None, d={"b": [1, 2], "a": "x"})
    assert out == "a: True\nb: null\nc: {a: x, b: [1, 2]}\ne: 0.5\nf: 'yes'\ng: False"


def test_toyaml_without_default_on_undefined_is_an_error(tmp_path):
    with pytest.raises(TemplateError, match="absent"):
        render(tmp_path, {"t.yaml": "a: {{ absent | toyaml }}\n"}, "t.yaml")
