"""The example projects work as their READMEs say."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from forgather.project import Project, find_projects
from forgather.run import main

REPO = Path(__file__).resolve().parents[1]


def test_every_example_project_renders_every_config():
    projects = find_projects(str(REPO / "examples"), recursive=True)
    assert {p.name for p in projects} >= {"Project composition", "Tiny Llama tutorial", "Dynamic LM"}
    for project in projects:
        for config in project.configs():
            assert project.load_config(config).config is not None, f"{project.name}: {config}"


def test_dynamic_lm_swaps_in_the_project_local_layer_and_exports_it(tmp_path):
    project = str(REPO / "examples" / "dynamic_lm")
    layers = Project.load(project).load_config("sandwich.yaml").construct("model")(vocab_size=64).layers
    assert type(layers[0]).__name__ == "SandwichLayer"
    assert main(["-p", project, "--outputs", str(tmp_path), "+experiment=sandwich", "max_steps=2", "limit_val_batches=1"]) == 0
    exported = tmp_path / "output_models" / "sandwich"
    modeling = (exported / "modeling_sandwich.py").read_text()
    assert "class SandwichLayer" in modeling and not re.search(r"^\s*(from|import) forgather", modeling, re.M)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
    generated = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
