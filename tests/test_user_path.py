"""The new user's path: the paper's models by default, one line when they cannot be had, built-in models only
when named, per-stage environment variables, renamed flags, grouped help, and progress that reads in a log."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from conftest import BUILTIN_MODELS, FAST_GENERATE, mlgen
from mlgen.config import STAGE_CONFIGS, build_config, env_name, env_settings

SRC = Path(__file__).resolve().parents[1] / "src"
NO_BUILTINS: dict[str, str | None] = dict.fromkeys(BUILTIN_MODELS)  # the conftest's variables unset


def offline_empty_cache(tmp_path: Path) -> dict[str, str | None]:
    """No built-in model named, an empty model cache, no hub: what a new user without the weights has."""
    return {**NO_BUILTINS, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip() and "random weights" not in line]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("mlgen: error:") and "Traceback" not in result.stderr, lines
    return lines[0]


def tiny_raw_run(run: Path, classes_file: Path) -> None:
    done = mlgen("generate", "--run", run, "--classes", classes_file, "--model", "tiny", *FAST_GENERATE)
    assert done.returncode == 0, done.stderr[-2000:]


def test_generate_without_a_model_names_sd2_before_any_prompt(tmp_path: Path, classes_file: Path) -> None:
    env = offline_empty_cache(tmp_path)
    result = mlgen("generate", "--run", tmp_path / "run", "--classes", classes_file, env=env, fresh=True, timeout=120)
    line = error_line(result)
    assert "diffusion model 'stabilityai/stable-diffusion-2' cannot be loaded" in line
    assert "--model PATH" in line and "HF_HOME" in line and "mlgen demo" in line, line
    assert not (tmp_path / "run" / "prompts").exists()  # failed before the prompt stage


def test_filter_and_classifier_without_clip_name_the_papers_clips(tmp_path: Path, classes_file: Path) -> None:
    run = tmp_path / "run"
    tiny_raw_run(run, classes_file)
    env = offline_empty_cache(tmp_path)
    line = error_line(mlgen("filter", "--run", run, env=env, fresh=True, timeout=120))
    assert "CLIP model 'ViT-B-32/openai' cannot be loaded" in line and "--clip PATH" in line, line
    assert not (run / "filtered").exists()
    done = mlgen("filter", "--run", run, "--clip", "tiny")
    assert done.returncode == 0, done.stderr[-2000:]
    line = error_line(mlgen("train-classifier", "--run", run, env=env, fresh=True, timeout=120))
    assert "CLIP model 'RN50/openai' cannot be loaded" in line, line
    assert not (run / "classifier").exists()


def test_finetune_and_run_check_every_model_before_any_work(tmp_path: Path, classes_file: Path) -> None:
    env = offline_empty_cache(tmp_path)
    (tmp_path / "mlgen.yaml").write_text(
        f"run: {tmp_path / 'run'}\nclasses: {classes_file}\nprompts: {{llm: template}}\ngenerate: {{model: tiny}}\n"
        "filter: {clip: tiny}\n",
        encoding="utf-8",
    )
    line = error_line(mlgen("run", "--config", tmp_path / "mlgen.yaml", env=env, fresh=True, timeout=120))
    assert "CLIP model 'RN50/openai' cannot be loaded" in line, line  # the classifier's, before any stage ran
    assert not (tmp_path / "run" / "prompts").exists()
    assert mlgen("prompts", "--run", tmp_path / "p", "--classes", classes_file, "--llm", "template").returncode == 0
    line = error_line(mlgen("finetune", "--run", tmp_path / "p", env=env, fresh=True, timeout=120))
    assert "'stabilityai/stable-diffusion-2' cannot be loaded" in line, line
    assert not (tmp_path / "p" / "finetune").exists()


def test_naming_tiny_warns_once(tmp_path: Path, classes_file: Path) -> None:
    args = ["generate", "--run", tmp_path / "run", "--classes", classes_file, "--model", "tiny", *FAST_GENERATE]
    result = mlgen(*args, env=NO_BUILTINS)
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if "random weights" in line]
    assert warnings == [
        "mlgen: warning: model 'tiny' has random weights: its images carry no meaning (a smoke test; the trained "
        "offline toy world is 'toy')"
    ]


def test_a_stage_variable_sets_that_stage_only() -> None:
    """Every setting's variable changes its own stage's settings and no other stage's."""
    samples = {int: 7, float: 0.25, bool: True, str: "tiny"}
    for section, cls in STAGE_CONFIGS.items():
        for f in dataclasses.fields(cls):
            kind = {"int": int, "int | None": int, "float": float, "float | None": float, "bool": bool}.get(
                str(f.type), str if str(f.type) in ("str", "str | None") else None
            )
            if kind is None:
                continue
            value = samples[kind]
            environ = {env_name(section, f.name): str(value).lower() if kind is bool else str(value)}
            assert env_settings(section, environ) == {f.name: value}, (section, f.name)
            for other in STAGE_CONFIGS:
                if other != section:
                    assert env_settings(other, environ) == {}, (section, f.name, other)


def test_flags_win_over_the_environment_which_wins_over_the_file(tmp_path: Path, classes_file: Path) -> None:
    (tmp_path / "mlgen.yaml").write_text(
        "generate: {seed: 1, images_per_prompt: 3, jpeg_quality: 90}\n", encoding="utf-8"
    )
    run = tmp_path / "run"
    env = {"MLGEN_GENERATE_SEED": "2", "MLGEN_GENERATE_IMAGES_PER_PROMPT": "2", "MLGEN_FILTER_SEED": "9"}
    args = ["generate", "--run", run, "--classes", classes_file, "--config", tmp_path / "mlgen.yaml", *FAST_GENERATE]
    result = mlgen(*args, "--seed", "3", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    settings = json.loads((run / "raw" / "plan.json").read_text())["settings"]
    assert settings["seed"] == 3 and settings["images_per_prompt"] == 2 and settings["jpeg_quality"] == 90
    assert settings["model"] == "tiny"  # the conftest's variable
    assert "MLGEN_FILTER_SEED is not read" in result.stderr  # filter has no seed: one warning line, no effect


def test_old_variables_and_flags_still_work_with_one_warning(tmp_path: Path, classes_file: Path) -> None:
    fast = [a if a != "--denoising-steps" else "--steps" for a in FAST_GENERATE]
    result = mlgen("generate", "--run", tmp_path / "run", "--classes", classes_file, *fast, env={"MLGEN_CLIP": "x"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mlgen: warning: --steps is deprecated: use --denoising-steps" in result.stderr
    assert "MLGEN_CLIP is not read; settings are per stage: MLGEN_FILTER_CLIP, MLGEN_CLASSIFIER_CLIP" in result.stderr
    assert json.loads((tmp_path / "run" / "raw" / "plan.json").read_text())["settings"]["steps"] == 2


def test_help_groups_commands_shows_defaults_and_hides_ablation_flags() -> None:
    top = mlgen("--help", env={"COLUMNS": "200"}).stdout
    panels = [line.strip("╭─ ").split(" ")[0] for line in top.splitlines() if line.startswith("╭─")]
    assert panels == ["Options", "Pipeline", "Inspect", "Scale", "Research"], panels
    assert top.index("prompts") < top.index("generate") < top.index("filter") < top.index("train-classifier")
    generate = mlgen("generate", "--help", env={"COLUMNS": "200"}).stdout
    assert "stabilityai/stable-diffusion-2" in generate and "--denoising-steps" in generate
    train = mlgen("train-classifier", "--help", env={"COLUMNS": "200"}).stdout
    assert "RN50/openai" in train and "--train-steps" in train
    for hidden in ("--pass-steps", "--source", "--select-every", "--schedule", "--steps "):
        assert hidden not in train, hidden
    assert "ViT-B-32/openai" in mlgen("filter", "--help", env={"COLUMNS": "200"}).stdout


def test_progress_in_a_log_is_whole_lines(tmp_path: Path, classes_file: Path) -> None:
    """stderr is a pipe here, as in a CI or Slurm log: no carriage returns, one line per step of progress."""
    args = ["generate", "--run", tmp_path / "run", "--classes", classes_file, *FAST_GENERATE, "--shard-size", "2"]
    result = mlgen(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("raw shards:")]
    assert lines and lines[-1].startswith("raw shards: 100%"), result.stderr


def test_each_package_imports_only_downward() -> None:
    """No import circle between mlgen's modules, counting imports inside functions too."""
    modules = {".".join(p.relative_to(SRC).with_suffix("").parts): p for p in SRC.rglob("*.py")}
    modules = {name.removesuffix(".__init__"): path for name, path in modules.items()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlgen"):
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        return False

    circles = sorted((a, b) for a in graph for b in graph[a] if a < b and reaches(b, a))
    assert circles == [], circles


@pytest.mark.parametrize("section", sorted(STAGE_CONFIGS))
def test_stage_defaults_name_no_builtin_model(section: str) -> None:
    config = build_config(STAGE_CONFIGS[section])
    for key in ("model", "clip"):
        assert getattr(config, key, None) not in ("tiny", "toy"), (section, key)


def test_a_list_setting_from_one_environment_value_is_one_item() -> None:
    """`MLGEN_CLASSIFIER_IMAGES=/data/pictures` is one folder, not a tuple of its letters; YAML lists still work."""
    from mlgen.config import ClassifierConfig, build_config, env_settings

    one = env_settings("classifier", {"MLGEN_CLASSIFIER_IMAGES": "/data/pictures"})
    assert build_config(ClassifierConfig, None, one, {}).images == ["/data/pictures"]
    two = env_settings("classifier", {"MLGEN_CLASSIFIER_VAL_LABELS": "[circle, star]"})
    assert list(build_config(ClassifierConfig, None, two, {}).val_labels) == ["circle", "star"]
