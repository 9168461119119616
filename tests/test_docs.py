"""The documentation runs as written.

- Every ``mlgen ...`` command in the fenced code blocks of README.md and docs/**/*.md, and in the Slurm
  scripts of examples/slurm/, names a command that exists and only flags that command takes. The check reads
  the click command tree that typer builds (hidden ablation flags included), not the --help text.
- Every examples/*.yaml passes ``mlgen run --config F --dry-run`` offline, with an empty model cache, and prints
  a plan line per stage.
"""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import BUILTIN_MODELS, mlgen

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "sbatch"}
FENCE = re.compile(r"^\s*```\s*([\w+-]*)")
WHICH_MLGEN = re.compile(r"\"?\$\(\s*which\s+mlgen\s*\)\"?")  # $(which mlgen) under torchrun / accelerate
SEPARATORS = {"|", "||", "&&", ";", "&", "then", "do", "else", "(", ")"}


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "examples").rglob("*.sbatch"))]
    return [path for path in files if path.is_file()]


def shell_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, text) of each shell code block; a script file is one block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".md":
        return [(1, "\n".join(lines))]
    blocks, start, language = [], None, ""
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if fence is None:
            continue
        if start is None:
            start, language = number, fence.group(1).lower()
        else:
            if language in SHELL_LANGUAGES:
                blocks.append((start + 1, "\n".join(lines[start : number - 1])))
            start = None
    return blocks


def shell_lines(first: int, block: str) -> list[tuple[int, str]]:
    """Logical lines of a block (a trailing backslash continues a line), with their first line number."""
    out, pending, pending_start = [], "", first
    for number, line in enumerate(block.splitlines(), first):
        if not pending:
            pending_start = number
        stripped = line.rstrip()
        if stripped.lstrip().startswith("$ "):  # a console prompt
            stripped = stripped.lstrip()[2:]
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        out.append((pending_start, pending + stripped))
        pending = ""
    if pending:
        out.append((pending_start, pending))
    return out


def mlgen_invocations(line: str) -> list[list[str]]:
    """The argument lists after each ``mlgen`` (or ``python -m mlgen``, ``$(which mlgen)``) of a shell line.

    Raises ValueError when a line that names mlgen cannot be split as the shell would."""
    tokens = shlex.split(WHICH_MLGEN.sub(" mlgen ", line), comments=True)
    found: list[list[str]] = []
    segment: list[str] = []
    for token in [*tokens, ";"]:
        if token in SEPARATORS or token.endswith(";"):
            if token.endswith(";") and token != ";":
                segment.append(token[:-1])
            found += _from_segment(segment)
            segment = []
        else:
            segment.append(token)
    return found


def _from_segment(tokens: list[str]) -> list[list[str]]:
    for i, token in enumerate(tokens):
        if " " in token and re.search(r"(^|\s)mlgen(\s|$)|which mlgen", token):  # bash -c '... mlgen ...'
            return mlgen_invocations(token)
        if token == "mlgen" or token.endswith("/mlgen"):
            before = tokens[i - 1] if i else ""
            if before.startswith("-") and before != "-m":  # the value of an option (torchrun --rdzv_id mlgen)
                continue
            return [tokens[i + 1 :]]
    return []


@cache
def command_tree() -> Any:
    import typer

    from mlgen.cli.app import app

    return typer.main.get_command(app)


def options(command: Any) -> set[str]:
    """Every flag a click command takes, hidden ones and the negative forms of switches included."""
    names = {"--help"}
    for param in command.params:
        names.update(opt for opt in [*param.opts, *param.secondary_opts] if opt.startswith("-"))
    return names


def check(args: list[str]) -> list[str]:
    """Why ``mlgen ARGS`` would not run as written (empty when it would)."""
    args = [arg.strip("[]") for arg in args]  # [--optional flags] in a usage line
    command, path, i = command_tree(), ["mlgen"], 0
    while hasattr(command, "commands") and i < len(args) and not args[i].startswith("-"):
        name = args[i]
        if name not in command.commands:
            return [f"`{' '.join(path)}` has no command '{name}'"]
        command, path, i = command.commands[name], [*path, name], i + 1
    known = options(command)
    errors = []
    for arg in args[i:]:
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-" or re.match(r"-\d", arg):
            continue
        flag = arg.split("=", 1)[0]
        if flag not in known:
            errors.append(f"`{' '.join(path)}` has no option {flag}")
    return errors


def check_line(line: str) -> list[str]:
    try:
        invocations = mlgen_invocations(line)
    except ValueError as err:
        return [f"cannot split as a shell line: {err}"] if "mlgen" in line else []
    return [error for args in invocations for error in check(args)]


def documented_commands() -> list[tuple[str, str]]:
    """(where, line) of every shell line that runs mlgen in the README, docs/ and examples/slurm/."""
    out = []
    for path in doc_files():
        for first, block in shell_blocks(path):
            for number, line in shell_lines(first, block):
                if not line.lstrip().startswith("#") and re.search(r"(^|[\s/\"'])mlgen(\s|$|\)|\")", line):
                    out.append((f"{path.relative_to(ROOT)}:{number}", line))
    return out


COMMANDS = documented_commands()


@pytest.mark.parametrize(("where", "line"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_every_documented_command_names_real_commands_and_flags(where: str, line: str) -> None:
    assert check_line(line) == [], f"{where}: {line}"


def test_the_commands_are_found() -> None:
    """The extraction itself: the README, the stage pages and both Slurm scripts hold mlgen commands."""
    places = {where.split(":")[0] for where, _ in COMMANDS}
    for expected in ["README.md", "docs/scaling.md", "docs/prompts-and-labels.md", "docs/benchmarks.md",
                     "examples/slurm/one-node-8gpu.sbatch", "examples/slurm/multi-node.sbatch"]:  # fmt: skip
        assert expected in places
    assert len(COMMANDS) >= 40
    readme = [line for where, line in COMMANDS if where.startswith("README.md:")]
    assert any(" generate " in line and "stabilityai/stable-diffusion-2" in line for line in readme)


def test_the_check_fails_on_a_broken_flag_or_command() -> None:
    """A copy of a documented line with one flag misspelt fails; so do an unknown command and forms of lines."""
    where, line = next((w, x) for w, x in COMMANDS if w.startswith("README.md:") and " --clip " in x)
    assert check_line(line) == [], where
    broken = line.replace(" --clip ", " --clipp ", 1)
    assert check_line(broken) == ["`mlgen " + broken.split("mlgen ", 1)[1].split()[0] + "` has no option --clipp"]

    launcher = (
        "HF_HUB_OFFLINE=1 MLGEN_CLASSIFIER_EPOCHS=3 torchrun --nnodes 2 --rdzv_id mlgen \\\n"
        '  "$(which mlgen)" train-classifier --run-dir RUN --clip RN50/openai [--pass-steps 5]  # hidden flag'
    )
    (_, joined), *_ = shell_lines(1, launcher)
    assert check_line(joined) == []
    assert check_line(joined.replace("--clip", "--clipp")) == ["`mlgen train-classifier` has no option --clipp"]
    assert check_line("python -m mlgen world train vae --decoder-only --steps 2") == []
    assert check_line("python -m mlgen world train vea --steps 2") == ["`mlgen world train` has no command 'vea'"]
    assert check_line("mlgen filter --run RUN && mlgen nosuch") == ["`mlgen` has no command 'nosuch'"]
    assert check_line("srun bash -c 'torchrun $(which mlgen) generate --run-dir /x --modle tiny'") == [
        "`mlgen generate` has no option --modle"
    ]


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
WRITTEN_ELSEWHERE = {"docs/reproduce.md", "docs/research/evidence.md"}  # pages of other issues (reproduction, evidence)


def test_links_stay_in_the_repository_except_paper_citations() -> None:
    """Every link of the README, CHANGELOG, CONTRIBUTING and docs/ points at a file of the repository, or at a
    paper (arXiv)."""
    pages = [
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
        ROOT / "CONTRIBUTING.md",
        *sorted((ROOT / "docs").rglob("*.md")),
    ]
    for page in pages:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://")):
                assert target.startswith("https://arxiv.org/abs/"), f"{page.name}: {target}"
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            where = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
            assert path.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
            assert path.exists() or where in WRITTEN_ELSEWHERE, f"{page.name}: {target} does not exist"


def test_config_examples_in_the_docs_are_valid() -> None:
    """Every YAML block of the README and docs/ that is a config file builds each of its sections."""
    from mlgen.config import STAGE_CONFIGS, build_config

    blocks = 0
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for block in re.findall(r"```ya?ml\n(.*?)```", text, flags=re.S):
            data = yaml.safe_load(block)
            if not isinstance(data, dict) or not set(data) & set(STAGE_CONFIGS):
                continue
            assert set(data) <= {*STAGE_CONFIGS, "run", "classes"}, page.name
            for name, section in data.items():
                if name in STAGE_CONFIGS:
                    build_config(STAGE_CONFIGS[name], section)
            blocks += 1
    assert blocks >= 1


EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
PLAN_LINES = {"prompts": "prompts ", "generate": "generate ", "filter": "filter ", "classifier": "classifier ",
              "finetune": "finetune "}  # fmt: skip


@pytest.mark.parametrize("config", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_each_example_config_plans_offline_without_loading_a_model(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a user runs it: the config's own models (the tests' built-in model variables dropped), offline, with an
    empty model cache, so a dry run that loaded a model would fail."""
    for name in BUILTIN_MODELS:
        monkeypatch.delenv(name, raising=False)
    empty_cache = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "MLGEN_CACHE": str(tmp_path / "mlgen")}
    benchmark = {"paper-coco.yaml": "coco-zsl", "paper-nus.yaml": "nus-zsl"}.get(config.name)
    data = ["--data", f"{benchmark}:{tmp_path / 'not-here'}"] if benchmark else []  # a plan reads no benchmark file
    result = mlgen("run", "--config", config, *data, "--dry-run", cwd=ROOT, env=empty_cache, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dry run"), result.stdout
    sections = yaml.safe_load(config.read_text(encoding="utf-8"))
    stages = {"prompts", "generate", "filter", "classifier"} | ({"finetune"} & set(sections))
    for stage in stages:
        assert any(line.startswith(PLAN_LINES[stage]) for line in lines), f"no {stage} plan in:\n{result.stdout}"
    for section, key, stage in [("generate", "model", "generate"), ("filter", "clip", "filter"),
                                ("classifier", "clip", "classifier")]:  # fmt: skip
        named = (sections.get(section) or {}).get(key)
        if named:
            assert named in next(line for line in lines if line.startswith(PLAN_LINES[stage])), result.stdout
    images = next(line for line in lines if line.startswith("images "))
    assert int(re.search(r"\d+", images.split(":")[-1] if "round" in images else images).group()) > 0


def test_quickstart_makes_the_images_its_comment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/quickstart.yaml says how many images it makes; the dry run computes the same."""
    for name in BUILTIN_MODELS:
        monkeypatch.delenv(name, raising=False)
    config = ROOT / "examples" / "quickstart.yaml"
    said = re.search(r"= (\d+) generated images", config.read_text(encoding="utf-8"))
    assert said is not None
    result = mlgen("run", "--config", config, "--dry-run", cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"images      {said.group(1)} " in result.stdout
