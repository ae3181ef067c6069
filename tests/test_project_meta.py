"""Projects and workspaces as the reference Forgather has them: meta.yaml is a template (it may extend the
workspace's meta_defaults.yaml), its keys, the project's template globals, and meta errors with file:line.

The projects here are written for the tests. Their templates use only lines whose meaning is the same under
our line syntax and the reference's (statements at column 0), and the assertions do not depend on whether a
rendering keeps the file's final newline (the reference's rule drops it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from forgather.cli.main import main
from forgather.project import Project
from forgather.template import TemplateError

META_DEFAULTS = """\
## The workspace's defaults: every project below extends these.
-- set ns = namespace(shared=joinpath(workspace_root, 'shared'))
searchdir:
-- block searchdir_project
    - "{{ joinpath(project_dir, 'templates') }}"
-- endblock searchdir_project
    - "{{ ns.shared }}"
-- block configs
-- endblock configs
"""


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A workspace root holding forgather_workspace/ and shared/, with a project two directories below."""
    write(tmp_path, {
        "forgather_workspace/meta_defaults.yaml": META_DEFAULTS,
        "shared/base.yaml": "from_shared: {{ greeting | default('hello') }}\n-- block body\n-- endblock body\n",
        "group/proj/meta.yaml": """\
            -- extends "meta_defaults.yaml"
            -- block configs
            name: "Workspace project"
            description: "Extends the workspace's defaults"
            config_prefix: "experiments"
            default_config: "first.yaml"
            -- endblock configs
            """,
        "group/proj/templates/experiments/first.yaml": """\
            ## The first experiment.
            -- extends "base.yaml"
            -- block body
            project: "{{ project_dir }}"
            workspace: "{{ workspace_root }}"
            module: "{{ modname_from_path('/a/b/model.py') }}"
            -- endblock body
            """,
        "group/proj/templates/experiments/sub/second.yaml": "x: 2\n",
    })
    return tmp_path


def test_meta_extends_meta_defaults_from_the_workspace_two_directories_up(workspace):
    project = Project.load(str(workspace / "group" / "proj"))
    assert project.workspace_root == str(workspace)
    assert (project.name, project.description) == ("Workspace project", "Extends the workspace's defaults")
    assert project.template_dirs == [str(workspace / "group" / "proj" / "templates"), str(workspace / "shared")]


def test_config_prefix_names_the_configs_directory(workspace):
    project = Project.load(str(workspace / "group" / "proj"))
    assert project.configs() == ["first.yaml", "sub/second.yaml"]
    assert project.config_template("sub/second") == "experiments/sub/second.yaml"
    lines = project.load_config(None).text.splitlines()  # the default config
    assert lines == ["from_shared: hello", f'project: "{workspace / "group" / "proj"}"', f'workspace: "{workspace}"', 'module: "model"']


def test_ls_lists_a_workspace_projects_configs_with_the_default_marked(workspace, capsys):
    assert main(["ls", "-r", str(workspace)]) == 0
    out = capsys.readouterr().out
    assert "Workspace project" in out and "* first.yaml" in out and "The first experiment." in out and "sub/second.yaml" in out


def test_searchdir_replaces_the_templates_directory(tmp_path):
    write(tmp_path, {
        "meta.yaml": "searchdir: [mine]\n",
        "templates/configs/ignored.yaml": "a: 1\n",
        "mine/configs/used.yaml": "b: 2\n",
    })
    project = Project.load(str(tmp_path))
    assert project.configs() == ["used.yaml"] and project.template_dirs == [str(tmp_path / "mine")]
    assert project.load_config(None).text.splitlines() == ["b: 2"]  # no default_config: the first config


def test_our_plain_meta_keys_still_work(tmp_path):
    write(tmp_path, {
        "meta.yaml": "name: Plain\ndefault_config: a.yaml\ntemplate_paths: [lib]\nmodel_src: code\n",
        "templates/configs/a.yaml": '-- include "part.yaml"\n',
        "lib/part.yaml": "part: 1\n",
    })
    project = Project.load(str(tmp_path))
    assert project.workspace_root is None and project.model_src == str(tmp_path / "code")
    assert project.load_config(None).text.splitlines() == ["part: 1"]


def test_system_path_is_importable_when_constructing(tmp_path):
    write(tmp_path, {
        "meta.yaml": "system_path: lib\ndefault_config: a.yaml\n",
        "lib/only_here_for_the_test.py": "VALUE = 42\n",
        "templates/configs/a.yaml": "v: !call:only_here_for_the_test:VALUE.__int__ []\n",
    })
    project = Project.load(str(tmp_path))
    assert project.system_path == str(tmp_path / "lib")
    assert project.load_config(None).construct("v") == 42


def test_meta_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    write(tmp_path, {"meta.yaml": "name: x\ndescription: a: b\n"})
    with pytest.raises(TemplateError) as caught:
        Project.load(str(tmp_path))
    assert caught.value.location == (str(tmp_path / "meta.yaml"), 2) and "not valid YAML" in caught.value.message
    assert main(["-p", str(tmp_path), "index"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'meta.yaml'}:2: meta.yaml is not valid YAML") and "Traceback" not in err


def test_an_undecodable_meta_yaml_is_an_error_naming_the_file(tmp_path, capsys):
    (tmp_path / "meta.yaml").write_bytes(b"name: \xff\xfe\n")
    assert main(["-p", str(tmp_path), "index"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'meta.yaml'}:1: ") and "save it as UTF-8" in err and "workspace" not in err


def test_meta_key_of_the_wrong_type_names_its_line(tmp_path):
    write(tmp_path, {"meta.yaml": "name: x\n\nsearchdir: templates\n"})
    with pytest.raises(TemplateError, match="searchdir must be a list of directories") as caught:
        Project.load(str(tmp_path))
    assert caught.value.location == (str(tmp_path / "meta.yaml"), 3)


def test_missing_meta_defaults_says_where_it_is_looked_for(tmp_path):
    write(tmp_path, {"meta.yaml": '-- extends "meta_defaults.yaml"\n'})
    with pytest.raises(TemplateError, match="'meta_defaults.yaml' not found.*no forgather_workspace/ directory") as caught:
        Project.load(str(tmp_path))
    assert caught.value.location == (str(tmp_path / "meta.yaml"), 1)


def test_an_error_inside_meta_defaults_names_that_file(tmp_path):
    write(tmp_path, {
        "forgather_workspace/meta_defaults.yaml": "name: x\n-- block configs\n-- endblock configs\nsearchdir: : here\n",
        "p/meta.yaml": '-- extends "meta_defaults.yaml"\n',
    })
    with pytest.raises(TemplateError) as caught:
        Project.load(str(tmp_path / "p"))
    assert caught.value.location == (str(tmp_path / "forgather_workspace" / "meta_defaults.yaml"), 4)


def test_ls_shows_a_broken_project_and_lists_the_others(workspace, capsys):
    write(workspace, {"group/broken/meta.yaml": "name: [\n"})
    assert main(["ls", "-r", str(workspace)]) == 2
    out = capsys.readouterr().out
    assert f"{workspace / 'group' / 'broken' / 'meta.yaml'}:1" in out.replace("\n", "") and "Workspace project" in out


def test_joinpath_of_an_undefined_value_names_it(tmp_path):
    write(tmp_path, {"meta.yaml": "searchdir: [\"{{ joinpath(no_such_dir, 'x') }}\"]\n"})
    with pytest.raises(TemplateError, match="'no_such_dir' is undefined") as caught:
        Project.load(str(tmp_path))
    assert caught.value.location == (str(tmp_path / "meta.yaml"), 1)


def test_host_globals_and_versions_do_not_import_torch(tmp_path):
    write(tmp_path, {
        "meta.yaml": "default_config: a.yaml\n",
        "templates/configs/a.yaml": "host: {{ hostname }}\nsystem: {{ uname.system }}\npython: '{{ versions.python }}'\ncfg: {{ forgather_config_dir() }}\n",
    })
    code = (
        "import sys; from forgather.project import Project;"
        f"print(Project.load({str(tmp_path)!r}).load_config(None).text.rstrip());"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    import platform

    assert out.splitlines() == [
        f"host: {platform.node()}", f"system: {platform.system()}", f"python: '{platform.python_version()}'",
        f"cfg: {os.path.join(os.environ.get('XDG_CONFIG_HOME') or os.path.expanduser('~/.config'), 'forgather')}", "no torch",
    ]


def test_commands_work_from_a_directory_inside_the_project(workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace / "group" / "proj" / "templates" / "experiments")
    assert main(["-t", "sub/second.yaml", "pp"]) == 0
    assert capsys.readouterr().out.splitlines() == ["x: 2"]
    monkeypatch.chdir(workspace)
    assert main(["pp"]) == 2
    assert f"{workspace} is not a Forgather project: it has no meta.yaml" in capsys.readouterr().err


def test_targets_graph_and_code_of_a_config_in_the_reference_style(workspace, capsys):
    write(workspace, {"group/proj/templates/experiments/ref_style.yaml": """\
        .define: &defaults !dict
        model: &model !lambda:builtins:dict
            width: 2
            latent_args: !var { name: "model_constructor_args", default: { width: 3 } }
        generator: !meta:builtins:dict@generator
            obj: *model
        env: !dict
        """})
    project = ["-p", str(workspace / "group" / "proj"), "-t", "ref_style.yaml"]
    assert main([*project, "targets"]) == 0
    assert capsys.readouterr().out.splitlines() == ["model", "generator", "env"]
    assert main([*project, "graph"]) == 0
    out = capsys.readouterr().out
    assert "!partial:builtins:dict" in out and "latent_args:" in out and "!meta:builtins:dict@generator" in out
    assert main([*project, "code", "--target", "model"]) == 0
    namespace: dict = {}
    exec(capsys.readouterr().out, namespace)
    assert namespace["construct"]()() == {"width": 3}


def test_a_name_given_to_two_nodes_is_an_error_at_the_template_line(tmp_path):
    write(tmp_path, {
        "meta.yaml": "default_config: a.yaml\n",
        "templates/configs/a.yaml": "a: !call:builtins:list@n [[1]]\n-- include 'b.yaml'\n",
        "templates/b.yaml": "## the second\nb: !call:builtins:list@n [[2]]\n",
    })
    with pytest.raises(TemplateError, match="a second node is named 'n'") as caught:
        Project.load(str(tmp_path)).load_config(None).config
    assert caught.value.location == (str(tmp_path / "templates" / "b.yaml"), 2)


def test_ls_shows_a_reference_config_description_from_its_metadata_block(workspace, capsys):
    write(workspace, {"group/proj/templates/experiments/described.yaml": """\
        -- extends "base.yaml"
        -- block body
            -- set ns = namespace()
            -- set ns.config_description = "Described the reference's way"
        x: 1
        -- endblock body
        """})
    assert main(["ls", str(workspace / "group" / "proj")]) == 0
    assert "described.yaml Described the reference's way" in " ".join(capsys.readouterr().out.split())


def _two_projects(tmp_path: Path) -> Path:
    """A `models` project with a !var-taking config, and a `train` project taking its targets by from_project."""
    write(tmp_path, {
        "models/meta.yaml": "default_config: small.yaml\n",
        "models/templates/configs/small.yaml": """\
            shared: &shared !dict { width: {{ width | default(4) }} }
            model: !call:dict { spec: *shared, scale: !var { name: scale, default: 1 }, vocab: !call:len [ !var tokenizer ] }
            pretrained_tokenizer: !call:getitem [ *shared, width ]
            main: !call:dict { spec: *shared }
            """,
        "train/meta.yaml": "default_config: run.yaml\n",
        "train/templates/configs/run.yaml": """\
            tokenizer: &tokenizer !call:list [ [a, b, c] ]
            .define: &models !call:forgather:from_project
                project_dir: "{{ joinpath(project_dir, '../models') }}"
                config_template: ""
                targets: [ "pretrained_tokenizer", "model" ]
                pp_kwargs: { width: 8 }
                tokenizer: *tokenizer
                scale: 3
                preprocess_args: { unused: 1 }
            model: !call:getitem [ *models, model ]
            width: !call:getitem [ *models, pretrained_tokenizer ]
            """,
    })
    return tmp_path


def test_from_project_builds_another_projects_targets_with_its_vars_set(tmp_path):
    # The reference's `!call:forgather:from_project`, as its tutorial and tiny_experiments projects use it.
    root = _two_projects(tmp_path)
    built = Project.load(str(root / "train")).load_config(None).construct()
    assert built["model"]["spec"] == {"width": 8} and built["width"] == 8
    assert built["model"]["scale"] == 3 and built["model"]["vocab"] == 3


def test_from_project_is_recorded_and_a_changed_sibling_config_is_refused_on_replay(tmp_path):
    from forgather.errors import UserError
    from forgather.project import from_project_snapshot, tracking_from_project

    root = _two_projects(tmp_path)
    loaded = Project.load(str(root / "train")).load_config(None)
    with tracking_from_project() as records:
        loaded.construct()
    meta, files = from_project_snapshot(records)
    assert [record["config"] for record in meta] == [f"{root / 'models'}:configs/small.yaml with [('width', 8)]"]
    assert files == {"from_project/0_models/templates/configs/small.yaml": str(root / "models/templates/configs/small.yaml")}
    with tracking_from_project(meta):  # unchanged: built again
        assert Project.load(str(root / "train")).load_config(None).construct()["width"] == 8
    small = root / "models/templates/configs/small.yaml"
    small.write_text(small.read_text().replace("## nothing", "") + "## a comment changes no YAML\n")
    with tracking_from_project(meta):
        Project.load(str(root / "train")).load_config(None).construct()
    small.write_text(small.read_text().replace("default(4)", "default(5)").replace("scale, default: 1", "scale, default: 2"))
    with tracking_from_project(meta), pytest.raises(UserError, match=r"from_project \S+/models:configs/small.yaml "
                                                                      r"with .*other YAML than when the run was recorded"):
        Project.load(str(root / "train")).load_config(None).construct()
    Project.load(str(root / "train")).load_config(None).construct()  # outside a replay: no check


def test_from_project_one_target_and_shared_nodes(tmp_path):
    import forgather

    root = _two_projects(tmp_path)
    main = forgather.from_project(str(root / "models"), tokenizer=[1])
    assert main == {"spec": {"width": 4}}
    both = forgather.from_project(str(root / "models"), "small", ["model", "main"], tokenizer=[1, 2])
    assert both.model["spec"] is both["main"]["spec"]  # one construction: the shared !dict is one object
    text = forgather.from_project(str(root / "models"), targets="model", tokenizer="${scale} {x}", scale=2)
    assert text["vocab"] == len("${scale} {x}")  # a given string is text, not an interpolation


def test_from_project_errors_name_the_other_projects_line_and_close_names(tmp_path):
    import forgather

    root = _two_projects(tmp_path)
    with pytest.raises(Exception, match=r"small\.yaml:\d+: .*no such target; did you mean 'model'"):
        forgather.from_project(str(root / "models"), targets=["modle"], tokenizer=[])
    with pytest.warns(UserWarning, match=r"no !var 'tokeniser', so it is ignored; did you mean 'tokenizer'"):
        with pytest.raises(Exception, match=r"no value given for 'tokenizer'"):
            forgather.from_project(str(root / "models"), targets="model", tokeniser=[])


def test_pp_config_var_without_a_value_is_the_rendered_yaml(tmp_path):
    # The reference's loggers template records the experiment's YAML through `!var "pp_config"`.
    write(tmp_path, {
        "p/meta.yaml": "default_config: a.yaml\n",
        "p/templates/configs/a.yaml": "## a comment\ninfo: !call:dict { config: !var \"pp_config\", n: 1 }\nset: !var { name: pp_given, default: 2 }\n",
    })
    loaded = Project.load(str(tmp_path / "p")).load_config(None)
    assert loaded.construct("info")["config"] == loaded.text
    assert "info: !call:dict" in loaded.text


def test_trefs_lists_the_templates_a_config_is_made_of(tmp_path, capsys):
    # The reference's `forgather trefs`: the tree of extends/include references, and each file once.
    write(tmp_path, {
        "p/meta.yaml": "default_config: a.yaml\n",
        "p/templates/base.yaml": "-- block body\n-- endblock body\n-- include 'parts.one'\n#---- parts.one ----\none: 1\n",
        "p/templates/picked.yaml": "picked: 1\n",
        "p/templates/configs/a.yaml": (
            "-- extends 'base.yaml'\n-- block body\n-- set choice = 'picked.yaml'\n"
            "-- include choice\nbody: 1\n-- endblock body\n"
        ),
        "p/templates/unused.yaml": "unused: 1\n",
    })
    assert main(["-p", str(tmp_path / "p"), "trefs", "--format", "tree"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  (")[0] for line in lines] == [
        "configs/a.yaml", "  base.yaml", "    parts.one", "loaded through a name in a variable:", "  picked.yaml"]
    assert lines[2].endswith("base.yaml:5)")  # a split file's section: its file and its first line
    assert main(["-p", str(tmp_path / "p"), "trefs"]) == 0
    files = [os.path.basename(line) for line in capsys.readouterr().out.splitlines()]
    assert files == ["a.yaml", "base.yaml", "picked.yaml"]


def test_from_project_cycle_is_named_not_a_recursion_error(tmp_path):
    import forgather

    write(tmp_path, {
        "a/meta.yaml": "default_config: a.yaml\n",
        "a/templates/configs/a.yaml": "main: !call:forgather:from_project { project_dir: \"{{ joinpath(project_dir, '../b') }}\" }\n",
        "b/meta.yaml": "default_config: b.yaml\n",
        "b/templates/configs/b.yaml": "main: !call:forgather:from_project { project_dir: \"{{ joinpath(project_dir, '../a') }}\" }\n",
    })
    with pytest.raises(Exception, match=r"from_project cycle: \S+/a:configs/a.yaml\[main\] -> \S+/b:configs/b.yaml\[main\] -> \S+/a:configs/a.yaml\[main\]"):
        forgather.from_project(str(tmp_path / "a"))
    # Another target of the config under construction is no cycle.
    write(tmp_path, {"a/templates/configs/a.yaml": (
        "main: !call:forgather:from_project { project_dir: \"{{ project_dir }}\", targets: [size] }\nsize: 3\n")})
    assert forgather.from_project(str(tmp_path / "a")) == {"size": 3}
    assert Project.load(str(tmp_path / "a")).load_config(None).construct()["main"] == {"size": 3}


def test_meta_prints_the_values_a_templated_meta_yaml_gave(workspace, capsys):
    import yaml

    assert main(["-p", str(workspace / "group/proj"), "meta"]) == 0
    out = capsys.readouterr().out
    read, derived = out.split("# what it leads to")
    assert yaml.safe_load(read)["config_prefix"] == "experiments"  # from meta.yaml, through meta_defaults.yaml
    derived = yaml.safe_load(derived)
    assert derived["workspace_root"] == str(workspace) and derived["default_config"] == "first.yaml"
    assert derived["search_path"][0] == str(workspace / "group/proj/templates")


def test_tlist_lists_every_template_with_its_file_sections_included(tmp_path, capsys):
    write(tmp_path, {
        "p/meta.yaml": "default_config: a.yaml\n",
        "p/templates/configs/a.yaml": "a: 1\n#---- a.extra ----\nextra: 1\n",
        "p/templates/model/llama.yaml": "model: 1\n",  # shadows the library's model/llama.yaml
        "p/templates/helpers.py": "x = 1\n",
    })
    assert main(["-p", str(tmp_path / "p"), "tlist", "--format", "names"]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert rows["configs/a.yaml"].endswith("templates/configs/a.yaml") and rows["a.extra"].endswith("configs/a.yaml:3")
    assert rows["model/llama.yaml"].endswith("p/templates/model/llama.yaml")  # where it resolves: the project first
    assert "helpers.py" not in rows and "base/causal_lm.yaml" in rows  # the library's templates too
    assert main(["-p", str(tmp_path / "p"), "tlist", "--format", "md"]) == 0  # the reference's Markdown list
    md = capsys.readouterr().out.splitlines()
    assert len(md) == len(rows) and all(line.startswith("- [") for line in md)
    extra = next(line for line in md if line.startswith("- [a.extra]"))
    assert extra.endswith("configs/a.yaml) (line 3)")
    # By default a path a line, each file once, as the reference's (its guide: `forgather tlist | xargs grep PATTERN`)
    assert main(["-p", str(tmp_path / "p"), "tlist"]) == 0
    files = capsys.readouterr().out.splitlines()
    assert len(files) == len(set(files)) and all(os.path.isfile(path) for path in files)
    assert sum(path.endswith("configs/a.yaml") for path in files) == 1


def test_construct_and_code_build_main_by_default_when_the_config_has_one(tmp_path, capsys):
    # The reference's default target is `main`; a config without one still builds every target.
    write(tmp_path, {
        "p/meta.yaml": "default_config: a.yaml\n",
        "p/templates/configs/a.yaml": "main: !call:builtins:dict { x: 1 }\nbroken: !call:nowhere:Nothing []\n",
        "p/templates/configs/b.yaml": "x: !call:builtins:abs [ -2 ]\n",
    })
    assert main(["-p", str(tmp_path / "p"), "construct"]) == 0
    assert capsys.readouterr().out.strip() == "{'x': 1}"
    assert main(["-p", str(tmp_path / "p"), "code"]) == 0
    assert "return dict(x=1)" in capsys.readouterr().out
    assert main(["-p", str(tmp_path / "p"), "-t", "b.yaml", "construct"]) == 0
    assert capsys.readouterr().out.strip() == "{'x': 2}"


def test_from_project_of_the_same_config_rendered_otherwise_is_no_cycle(tmp_path):
    import forgather

    write(tmp_path, {
        "m/meta.yaml": "default_config: c.yaml\n",
        "m/templates/configs/c.yaml": """\
            -- if size | default('big') == 'small'
            main: !call:builtins:dict { size: small }
            -- else
            main: !call:builtins:dict
                size: big
                teacher: !call:forgather:from_project { project_dir: "{{ project_dir }}", targets: main, pp_kwargs: { size: small } }
            -- endif
            """,
        "n/meta.yaml": "default_config: c.yaml\n",
        "n/templates/configs/c.yaml": "main: !call:forgather:from_project { project_dir: \"{{ project_dir }}\", pp_kwargs: { x: 1 } }\n",
    })
    built = Project.load(str(tmp_path / "m")).load_config(None).construct("main")
    assert built == {"size": "big", "teacher": {"size": "small"}}
    with pytest.raises(Exception, match=r"from_project cycle: .*with \[\('x', 1\)\]\[main\] -> .*with \[\('x', 1\)\]\[main\]"):
        forgather.from_project(str(tmp_path / "n"))


def test_tlist_skips_a_stray_binary_file(tmp_path, capsys):
    write(tmp_path, {"p/meta.yaml": "default_config: a.yaml\n", "p/templates/configs/a.yaml": "a: 1\n"})
    (tmp_path / "p/templates/.DS_Store").write_bytes(b"\x00\x01Bud1\xff\xfe")
    (tmp_path / "p/templates/configs/.a.yaml.swp").write_bytes(b"b0VIM \xff\xfe\xfd")
    assert main(["-p", str(tmp_path / "p"), "tlist", "--format", "names"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "configs/a.yaml" in names and ".DS_Store" not in names and "configs/.a.yaml.swp" not in names
