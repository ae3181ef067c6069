"""`forgather -i`: the interactive shell runs the CLI's commands and completes what a user types."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from forgather.cli.main import main
from forgather.cli.shell import ForgatherShell

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
COMPOSITION = os.path.join(EXAMPLES, "project_composition")
RUNNER_PROJECT = os.path.join(REPO, "tests", "fixtures", "runner_project")


def session(commands: str, directory: str = EXAMPLES) -> tuple[ForgatherShell, str]:
    """Feed commands to a shell as its input; returns the shell and everything it printed."""
    out = io.StringIO()
    shell = ForgatherShell(directory, stdin=io.StringIO(commands), stdout=out)
    shell.cmdloop()
    return shell, out.getvalue()


def cli(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_ls_lists_every_example_project_with_its_configs():
    _, out = session("ls\n")
    assert "Project composition (project_composition)" in out and "Tiny Llama tutorial (tutorials/tiny_llama)" in out
    assert "SGD with momentum" in out


def test_cd_into_a_project_makes_it_current_and_configs_lists_it():
    shell, out = session("cd project_composition\nconfigs\n")
    assert shell.directory == COMPOSITION and shell.prompt == "forgather (Project composition)> "
    assert "sgd.yaml" in out and "Dynamic LM" not in out


def test_cd_without_a_directory_returns_to_the_start():
    shell, _ = session("cd tutorials/tiny_llama\ncd\n")
    assert shell.directory == EXAMPLES and shell.project is None


def test_cd_to_a_missing_directory_stays_put():
    shell, out = session("cd nowhere\n")
    assert shell.directory == EXAMPLES and "no directory" in out


def test_each_stage_prints_what_the_cli_prints(capsys):
    for command in ("pp", "graph", "config", "targets"):
        _, out = session(f"{command} sgd.yaml\n", COMPOSITION)
        assert out.split("> ", 1)[1].rsplit("forgather (", 1)[0] == cli(capsys, "-p", COMPOSITION, "-t", "sgd.yaml", command)


def test_a_config_command_without_a_config_uses_the_projects_default():
    _, out = session("targets\npp --jinja\n", COMPOSITION)
    assert "model\noptimizer\n" in out and "{% extends 'project.yaml' %}" in out


def test_code_and_construct_take_a_target_as_second_word():
    _, out = session("code base model\nconstruct wide model\n", COMPOSITION)
    assert "def construct():" in out and "model = Sequential(" in out and "optimizer" not in out
    assert "Linear(in_features=128, out_features=128" in out


def test_a_failing_command_reports_and_the_shell_goes_on(capsys):
    _, out = session("pp missing.yaml\ntargets base\n", COMPOSITION)
    assert "template 'configs/missing.yaml' not found" in capsys.readouterr().err
    assert out.rstrip().endswith("model\noptimizer\nforgather (Project composition)>")


def test_bad_options_print_usage_and_the_shell_goes_on(capsys):
    _, out = session("graph base --format toml\nconfigs\n", COMPOSITION)
    assert "invalid choice: 'toml'" in capsys.readouterr().err and "wide.yaml" in out


def test_config_commands_outside_a_project_say_so():
    _, out = session("configs\n")
    assert "is not a Forgather project" in out


def test_a_broken_meta_yaml_is_reported_not_fatal(tmp_path):
    (tmp_path / "meta.yaml").write_text("name: [unclosed\n")
    shell, out = session("index\nls\n", str(tmp_path))
    assert shell.project is None and f"error: {tmp_path / 'meta.yaml'}:1: meta.yaml is not valid YAML: while parsing" in out


def test_unknown_commands_are_named():
    _, out = session("frobnicate now\n")
    assert "unknown command: frobnicate" in out


def test_train_is_the_runner_of_the_project():
    _, out = session("train micro --dry-run lr=1e-3\ntrain micro --cfg max_steps=3\n", RUNNER_PROJECT)
    assert "-m forgather.run -p . --outputs . +experiment=micro lr=1e-3" in out
    assert "max_steps: 3" in out


def test_help_for_a_command_shows_its_options():
    _, out = session("help construct\n")
    assert "construct [CONFIG] [TARGET]" in out and "--call" in out


def test_quit_ends_the_loop_before_later_commands():
    _, out = session("quit\nls\n")
    assert "Project composition" not in out


def test_commands_complete_by_prefix():
    shell = ForgatherShell(EXAMPLES)
    assert shell.completenames("con") == ["config", "configs", "construct"]


def test_cd_completes_directories_at_any_depth():
    shell = ForgatherShell(EXAMPLES)
    assert shell.complete_cd("pro", "cd pro", 3, 6) == ["project_composition/", "projects_overview/"]
    assert shell.complete_cd("tutorials/t", "cd tutorials/t", 3, 14) == ["tutorials/tiny_llama/"]


def test_config_names_complete_after_a_config_command():
    shell = ForgatherShell(COMPOSITION)
    assert shell.complete_pp("", "pp ", 3, 3) == ["base.yaml", "sgd.yaml", "wide.yaml"]
    assert shell.complete_construct("w", "construct w", 10, 11) == ["wide.yaml"]


def test_targets_complete_after_the_config_of_code_and_construct():
    shell = ForgatherShell(COMPOSITION)
    assert shell.complete_code("o", "code sgd.yaml o", 14, 15) == ["optimizer"]
    assert shell.complete_pp("o", "pp sgd.yaml o", 12, 13) == []


def test_train_completes_group_options_and_config_keys():
    shell = ForgatherShell(RUNNER_PROJECT)
    options = shell.complete_train("optimizer=adaf", "train micro optimizer=adaf", 12, 26)
    assert "optimizer=adafactor" in options and all(o.startswith("optimizer=adaf") for o in options)
    assert "trainer.max_steps=" in shell.complete_train("tr", "train micro tr", 12, 14)
    assert shell.complete_train("~trainer.gradient", "train micro ~trainer.gradient", 12, 29) == ["~trainer.gradient_clip_val"]
    assert "++lr=" in shell.complete_train("++l", "train micro ++l", 12, 15)


def test_browsing_does_not_import_torch():
    probe = (
        "import io, sys\n"
        "from forgather.cli.shell import ForgatherShell\n"
        f"shell = ForgatherShell({COMPOSITION!r}, stdin=io.StringIO('ls\\nconfigs\\npp sgd\\ngraph base\\nconfig wide\\ntargets\\n'), stdout=io.StringIO())\n"
        "shell.cmdloop()\n"
        "shell.complete_code('', 'code base ', 10, 10)\n"
        "print(sorted(m for m in ('torch', 'pytorch_lightning', 'lightning') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ctrl_c_at_the_prompt_keeps_the_shell(monkeypatch):
    lines = iter([KeyboardInterrupt, "targets base\n", ""])

    def readline() -> str:
        line = next(lines)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    out = io.StringIO()
    stdin = io.StringIO()
    monkeypatch.setattr(stdin, "readline", readline)
    ForgatherShell(COMPOSITION, stdin=stdin, stdout=out).cmdloop()
    assert "^C\n" in out.getvalue() and "model\noptimizer\n" in out.getvalue()


def test_history_is_kept_between_sessions(tmp_path, monkeypatch):
    import readline

    monkeypatch.setenv("FORGATHER_CACHE_DIR", str(tmp_path))
    shell = ForgatherShell(COMPOSITION)
    readline.clear_history()
    readline.add_history("pp sgd.yaml")
    shell.postloop()
    readline.clear_history()
    shell.preloop()
    try:
        assert readline.get_current_history_length() == 1 and readline.get_history_item(1) == "pp sgd.yaml"
        assert (tmp_path / "shell_history").is_file()
    finally:
        readline.clear_history()
