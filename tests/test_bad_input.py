"""Bad input reaches the user as one ``mlgen: error:`` line, never a traceback, and writes nothing outside the run.

Every case runs the real ``mlgen`` command in a subprocess. Each process spends ~4 s importing
torch and friends, so independent cases run two at a time (see :func:`run_all`) and their
results are checked by parametrised tests.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import FAST_GENERATE, mlgen

RUN = "R"  # the run directory, relative to each case's working folder
CLASSES = "zebra\nsurfboard\n\nKite\n"  # three labels: a generate run of a few seconds
ERROR_PREFIX = "mlgen: error:"

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# a bar on a terminal, "raw shards:  50%|█████     | 1/2 [00:00<...]", or its line in a log, "raw shards: 50% 1/2 [...]"
PROGRESS_BAR = re.compile(r"\d+%(\|.*\|)?\s*\d+/\d+")
TINY_WARNING = "has random weights"  # the tests' built-in model, loaded before the error was found


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag``'s value replaced (or the flag added)."""
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def message_lines(stderr: str) -> list[str]:
    """Stderr's non-empty lines, without progress lines and the tiny model's warning (split on carriage returns)."""
    lines = (ANSI.sub("", line).strip() for line in re.split(r"[\r\n]", stderr))
    return [line for line in lines if line and not PROGRESS_BAR.search(line) and TINY_WARNING not in line]


def files_outside_run(folder: Path, run: Path) -> set[str]:
    """Every path under ``folder`` except the run directory, what is in it, and the folders it is in."""
    return {
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path != run and run not in path.parents and path not in run.parents
    }


def run_state(run: Path) -> dict[str, str]:
    """The content hash of every file in the run directory (rewriting a file unchanged is fine)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}


def assert_one_error_line(proc: subprocess.CompletedProcess, *mentions: str) -> str:
    """Non-zero exit, no traceback, and exactly one ``mlgen: error:`` line that names each of ``mentions``."""
    report = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode != 0, report
    assert "Traceback" not in proc.stderr, report
    lines = message_lines(proc.stderr)
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, report
    assert lines == errors, f"stderr has lines besides the one error line\n{report}"
    message = errors[0]
    for mention in mentions:  # a setting may be spelled as its flag (--shard-size) or its name (shard_size)
        assert mention.replace("-", "_").lower() in message.replace("-", "_").lower(), f"no {mention!r}\n{report}"
    return message


@dataclass
class Case:
    """One bad command, run in its own folder holding ``files``; ``RUN`` is the run directory."""

    args: list[str]
    mentions: tuple[str, ...]
    files: dict[str, str | bytes] = field(default_factory=dict)
    no_prompts: bool = False  # the command must fail before the prompt stage creates RUN/prompts
    timeout: int = 300


CLASSES_FILE = {"c.txt": CLASSES}

CASES: dict[str, Case] = {
    # 1. a classes file that is not there
    "missing-classes-file": Case(
        ["prompts", "--run", RUN, "--classes", "nope.txt", "--llm", "template"], ("nope.txt",)
    ),
    # 2. a classes file without labels
    "empty-classes-file": Case(
        ["prompts", "--run", RUN, "--classes", "empty.txt", "--llm", "template"],
        ("empty.txt", "no labels"),
        {"empty.txt": ""},
    ),
    "comments-only-classes-file": Case(
        ["prompts", "--run", RUN, "--classes", "comments.txt", "--llm", "template"],
        ("comments.txt", "no labels"),
        {"comments.txt": "# only comments\n\n   \n  # and blank lines\n\n"},
    ),
    # 3. the same label twice, differing only by case and whitespace (line 3 repeats line 1)
    "duplicate-label": Case(
        ["prompts", "--run", RUN, "--classes", "dup.txt", "--llm", "template"],
        ("dup.txt", "duplicate", "'zebra'", "3"),
        {"dup.txt": "Zebra\nkite\n  zebra \n"},
    ),
    # 4. not UTF-8
    "non-utf8-classes-file": Case(
        ["prompts", "--run", RUN, "--classes", "latin.txt", "--llm", "template"],
        ("latin.txt", "UTF-8"),
        {"latin.txt": b"\xff\xfe\xfa zebra\nkite\n"},
    ),
    # 5. a diffusion model that does not exist: fails at once, before the prompt stage
    "unknown-diffusion-model": Case(
        ["generate", "--run", RUN, "--classes", "c.txt", "--model", "no-such-org/no-such-model", *FAST_GENERATE],
        ("no-such-org/no-such-model",),
        CLASSES_FILE,
        no_prompts=True,
        timeout=60,
    ),
    # 6. a stage before the one it needs (the run directory exists but is empty)
    "filter-before-generate": Case(["filter", "--run", RUN], ("raw", "mlgen generate"), {f"{RUN}/.keep": ""}),
    "train-before-filter": Case(["train-classifier", "--run", RUN], ("filtered", "mlgen filter"), {f"{RUN}/.keep": ""}),
    # 7. zero or negative counts: refused before any work, naming the setting
    "images-per-prompt-0": Case(
        ["generate", "--run", RUN, "--classes", "c.txt", *FAST_GENERATE, "--images-per-prompt", "0"],
        ("images-per-prompt",),
        CLASSES_FILE,
        no_prompts=True,
    ),
    "steps-negative": Case(
        ["generate", "--run", RUN, "--classes", "c.txt", *with_flag(FAST_GENERATE, "--denoising-steps", "-1")],
        ("steps", "-1"),
        CLASSES_FILE,
        no_prompts=True,
    ),
    "shard-size-0": Case(
        ["generate", "--run", RUN, "--classes", "c.txt", *with_flag(FAST_GENERATE, "--shard-size", "0")],
        ("shard-size",),
        CLASSES_FILE,
        no_prompts=True,
    ),
    "prompts-per-set-0": Case(
        ["prompts", "--run", RUN, "--classes", "c.txt", "--llm", "template", "--prompts-per-set", "0"],
        ("prompts-per-set",),
        CLASSES_FILE,
        no_prompts=True,
    ),
    "epochs-0": Case(["train-classifier", "--run", RUN, "--epochs", "0"], ("epochs",)),
    # 8. an image size the tiny model cannot take (it needs a multiple of 16), on a fresh run
    "size-not-multiple-of-16": Case(
        ["generate", "--run", RUN, "--classes", "c.txt", *with_flag(FAST_GENERATE, "--size", "100")],
        ("100", "16"),
        CLASSES_FILE,
    ),
    # 12. config files: an unknown key, and text that is not YAML
    "config-unknown-key": Case(
        ["generate", "--run", RUN, "--classes", "c.txt", "--config", "bad.yaml"],
        ("stepz",),
        {**CLASSES_FILE, "bad.yaml": "generate:\n  stepz: 3\n"},
        no_prompts=True,
    ),
    "config-invalid-yaml": Case(
        ["generate", "--run", RUN, "--classes", "c.txt", "--config", "broken.yaml"],
        ("broken.yaml",),
        {**CLASSES_FILE, "broken.yaml": "generate: [steps: 3\n  size: {64\n"},
        no_prompts=True,
    ),
}


@dataclass
class Outcome:
    """One finished command, and the files outside its run directory before and after it."""

    proc: subprocess.CompletedProcess
    seconds: float
    files_before: set[str]
    files_after: set[str]
    run_before: dict[str, str]
    run_after: dict[str, str]


@dataclass
class Job:
    """Commands run one after the other in ``folder`` (``RUN`` is the run directory)."""

    folder: Path
    commands: list[list[str]]
    timeout: int = 300
    run: str = RUN


def run_all(jobs: dict[str, Job]) -> dict[str, list[Outcome]]:
    """Run every job, two jobs at a time (each process spends most of its ~4 s importing)."""

    def one(job: Job) -> list[Outcome]:
        outcomes = []
        for args in job.commands:
            run = job.folder / job.run
            before, run_before = files_outside_run(job.folder, run), run_state(run)
            started = time.monotonic()
            proc = mlgen(*args, cwd=job.folder, timeout=job.timeout)
            seconds = time.monotonic() - started
            outcomes.append(
                Outcome(proc, seconds, before, files_outside_run(job.folder, run), run_before, run_state(run))
            )
        return outcomes

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(one, job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def make_folder(root: Path, files: dict[str, str | bytes]) -> Path:
    root.mkdir(parents=True)
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


# 10. labels that look like paths are just text. The run sits two folders down, so that
# "../../evil" would land inside the watched folder if a label were ever used as a path.
PATHLIKE_LABELS = ["../../evil", "a/b", "./dot", "/abs/label"]
PATHLIKE_RUN = f"deep/work/{RUN}"


@pytest.fixture(scope="module")
def first_batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Outcome]]]:
    """Every case that needs no finished run, plus the generate runs: the finished run and case 10."""
    root = tmp_path_factory.mktemp("bad-input")
    finished = make_folder(root / "finished-run", CLASSES_FILE)
    pathlike = make_folder(root / "pathlike", {"labels.txt": "".join(f"{label}\n" for label in PATHLIKE_LABELS)})
    jobs = {  # the longest first
        "finished-run": Job(finished, [["generate", "--run", RUN, "--classes", "c.txt", *FAST_GENERATE]]),
        "pathlike-labels": Job(
            pathlike,
            [["generate", "--run", PATHLIKE_RUN, "--classes", "labels.txt", *FAST_GENERATE]],
            run=PATHLIKE_RUN,
        ),
    }
    for name, case in CASES.items():
        jobs[name] = Job(make_folder(root / name, case.files), [case.args], case.timeout)
    outcomes = run_all(jobs)
    return {name: (job.folder, outcomes[name]) for name, job in jobs.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line(name: str, first_batch: dict[str, tuple[Path, list[Outcome]]]) -> None:
    case = CASES[name]
    folder, [outcome] = first_batch[name]
    assert_one_error_line(outcome.proc, *case.mentions)
    assert outcome.files_after == outcome.files_before, "files written outside the run directory"
    if case.no_prompts:
        assert not (folder / RUN / "prompts").exists(), "the prompt stage ran before the bad input was refused"
    if case.timeout < 300:
        assert outcome.seconds < case.timeout


def test_pathlike_labels_are_text(first_batch: dict[str, tuple[Path, list[Outcome]]]) -> None:
    folder, [outcome] = first_batch["pathlike-labels"]
    proc = outcome.proc
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    run = folder / PATHLIKE_RUN
    assert (run / "classes.txt").read_text(encoding="utf-8").splitlines() == PATHLIKE_LABELS
    assert (run / "raw" / "_SUCCESS.json").is_file()
    assert outcome.files_after == outcome.files_before, "files written outside the run directory"
    assert not Path("/abs/label").exists()


# --- cases on a run whose generate stage finished -------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(first_batch: dict[str, tuple[Path, list[Outcome]]]) -> Path:
    """A folder holding ``c.txt`` and ``R``, a run whose prompts and generate stages finished."""
    folder, [outcome] = first_batch["finished-run"]
    assert outcome.proc.returncode == 0, outcome.proc.stderr
    assert (folder / RUN / "raw" / "_SUCCESS.json").is_file()
    return folder


def copy_of(finished: Path, target: Path) -> Path:
    shutil.copytree(finished, target)
    return target


STEPS_3 = ["generate", "--run", RUN, "--classes", "c.txt", *with_flag(FAST_GENERATE, "--denoising-steps", "3")]


@pytest.fixture(scope="module")
def finished_outcomes(
    finished_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, list[Outcome]]]:
    """The bad commands on the finished run: each on its own copy, but the read-only CLIP check."""
    root = tmp_path_factory.mktemp("on-finished")
    other_classes = copy_of(finished_run, root / "classes")
    (other_classes / "other.txt").write_text("dog\ncat\numbrella\n", encoding="utf-8")
    corrupt = copy_of(finished_run, root / "corrupt")
    tar = corrupt / RUN / "raw" / "00000.tar"
    with tar.open("r+b") as handle:
        handle.truncate(tar.stat().st_size // 2)
    jobs = {
        # 9. refused, then redone with --overwrite (the plan is read between the two in the test)
        "steps-changed": Job(copy_of(finished_run, root / "steps"), [STEPS_3, [*STEPS_3, "--overwrite"]]),
        "unknown-clip": Job(finished_run, [["filter", "--run", RUN, "--clip", "NoSuchArch/openai"]]),
        "classes-changed": Job(
            other_classes, [["prompts", "--run", RUN, "--classes", "other.txt", "--llm", "template"]]
        ),
        "corrupt-shard": Job(corrupt, [["filter", "--run", RUN, "--gate", "0"]]),
    }
    outcomes = run_all(jobs)
    return {name: (job.folder, outcomes[name]) for name, job in jobs.items()}


def test_unknown_clip_model(finished_outcomes: dict[str, tuple[Path, list[Outcome]]]) -> None:
    _, [outcome] = finished_outcomes["unknown-clip"]
    assert_one_error_line(outcome.proc, "NoSuchArch/openai")
    assert outcome.files_after == outcome.files_before
    assert outcome.run_after == outcome.run_before, "a refused command changed the run"


def test_settings_change_is_refused_then_overwritten(finished_outcomes: dict[str, tuple[Path, list[Outcome]]]) -> None:
    folder, [refused, overwritten] = finished_outcomes["steps-changed"]
    message = assert_one_error_line(refused.proc, "steps", "--overwrite")
    assert "raw" in message or "generate" in message
    assert refused.files_after == refused.files_before
    assert refused.run_after == refused.run_before, "a refused command changed the run"

    proc = overwritten.proc
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads((folder / RUN / "raw" / "plan.json").read_text())["settings"]["steps"] == 3
    assert (folder / RUN / "raw" / "_SUCCESS.json").is_file()
    assert overwritten.files_after == overwritten.files_before


def test_changed_classes_are_refused(finished_outcomes: dict[str, tuple[Path, list[Outcome]]]) -> None:
    folder, [outcome] = finished_outcomes["classes-changed"]
    assert_one_error_line(outcome.proc, "classes", "--overwrite")
    assert outcome.files_after == outcome.files_before
    assert outcome.run_after == outcome.run_before, "a refused command changed the run"
    assert (folder / RUN / "classes.txt").read_text(encoding="utf-8").split() == ["zebra", "surfboard", "kite"]


def test_corrupt_shard(finished_outcomes: dict[str, tuple[Path, list[Outcome]]]) -> None:
    folder, [outcome] = finished_outcomes["corrupt-shard"]
    assert_one_error_line(outcome.proc, "00000.tar", "not complete")
    assert outcome.files_after == outcome.files_before
    filtered = folder / RUN / "filtered"
    others = json.loads((folder / RUN / "raw" / "plan.json").read_text())["shards"][1:]
    assert others, "the finished run needs more than one raw shard"
    for shard in others:  # the other shards were still filtered
        assert (filtered / f"{shard['shard']:05d}_stats.json").is_file()
    assert not (filtered / "00000_stats.json").exists()
    assert not (filtered / "_SUCCESS.json").exists(), "a stage with a corrupt shard was marked complete"


# --- the commands added last: evaluate, predict, export, world render, report, train-classifier options,
# prompts against a dead server or a bad template, and command-line usage errors -----------------------
#
# Every case fails before a model is loaded. RUN holds only classes.txt and an empty raw/ folder
# (a run whose prompt stage was never finished); x.png is a file that is not an image.

BARE_RUN = {f"{RUN}/classes.txt": "zebra\nkite\n", f"{RUN}/raw/.keep": "", "x.png": "not an image\n"}
EVAL_DATA = {**BARE_RUN, "d.csv": "image,labels\nx.png,zebra\n", "broken.json": "{\n"}
ZERO_SHOT = ["evaluate", "--run", RUN, "--zero-shot", "clip", "--clip", "tiny"]
DEAD_SERVER = "http://127.0.0.1:9/v1"  # the discard port: nothing listens, the connection is refused at once
PROMPTS = ["prompts", "--run", RUN, "--classes", "c.txt", "--llm", "template"]

LATEST_CASES: dict[str, Case] = {
    # predict
    "predict-missing-image": Case(["predict", "nope.png", "--run", RUN], ("nope.png", "not found"), BARE_RUN),
    "predict-no-images": Case(["predict", "--run", RUN], ("missing argument", "images"), BARE_RUN),
    "predict-bad-format": Case(["predict", "x.png", "--run", RUN, "--format", "xml"], ("--format", "xml"), BARE_RUN),
    "predict-untrained-run": Case(
        ["predict", "x.png", "--run", RUN], ("classifier", "mlgen train-classifier"), BARE_RUN
    ),
    "predict-no-run": Case(["predict", "x.png", "--run", "nosuch"], ("no run directory", "nosuch"), BARE_RUN),
    # evaluate
    "evaluate-no-run": Case(["evaluate", "--run", "nosuch"], ("no run directory", "nosuch")),
    "evaluate-untrained-run": Case(["evaluate", "--run", RUN], ("classifier", "mlgen train-classifier"), BARE_RUN),
    "evaluate-zero-shot-without-data": Case(ZERO_SHOT, ("--zero-shot", "--data"), BARE_RUN),
    "evaluate-unknown-zero-shot": Case(
        ["evaluate", "--run", RUN, "--zero-shot", "nosuch", "--data", "d.csv"], ("--zero-shot", "nosuch"), EVAL_DATA
    ),
    "evaluate-missing-data": Case([*ZERO_SHOT, "--data", "missing.csv"], ("missing.csv", "not found"), EVAL_DATA),
    "evaluate-data-not-json": Case([*ZERO_SHOT, "--data", "broken.json"], ("broken.json", "COCO"), EVAL_DATA),
    "evaluate-s3-without-synonyms": Case(
        ["evaluate", "--run", RUN, "--zero-shot", "s3", "--data", "d.csv"], ("s3", "synonyms"), EVAL_DATA
    ),
    # export
    "export-no-folder": Case(["export", "nofolder", "out.json"], ("nofolder",)),
    "export-bad-format": Case(["export", f"{RUN}/raw", "o.json", "--format", "xml"], ("--format", "xml"), BARE_RUN),
    "export-without-output": Case(["export", f"{RUN}/raw"], ("output file",), BARE_RUN),
    "export-no-shards": Case(["export", f"{RUN}/raw", "o.json"], ("raw", "no finished shards"), BARE_RUN),
    "export-sizes-no-shards": Case(["export", f"{RUN}/raw", "--format", "sizes"], ("no finished shards",), BARE_RUN),
    "export-not-a-run": Case(["export", "loose", "o.json"], ("classes.txt",), {"loose/.keep": ""}),
    # world render
    "render-zero-scenes": Case(["world", "render", "--out", "W", "--n", "0"], ("--n", "greater than or equal to 1")),
    "render-unknown-shape": Case(["world", "render", "--out", "W", "--n", "2", "--labels", "blob"], ("blob",)),
    "render-unknown-world": Case(["world", "render", "--out", "W", "--n", "2", "--world", "mars"], ("mars",)),
    "render-unknown-stream": Case(["world", "render", "--out", "W", "--n", "2", "--stream", "x"], ("--stream",)),
    "render-out-is-a-file": Case(["world", "render", "--out", "x.png", "--n", "2"], ("x.png", "file"), BARE_RUN),
    "render-without-out": Case(["world", "render", "--n", "2"], ("missing option", "--out")),
    # world train clip: caption settings of the headroom world
    "train-clip-name-rate-classic": Case(["world", "train", "clip", "--name-rate", "0.1"], ("--name-rate", "headroom")),
    "train-clip-name-rate-above-1": Case(
        ["world", "train", "clip", "--world", "headroom", "--name-rate", "1.5"],
        ("--name-rate", "less than or equal to 1"),
    ),
    # report
    "report-no-run": Case(["report", "--run", "nosuch"], ("no run directory", "nosuch")),
    "report-before-filter": Case(["report", "--run", RUN], ("filtered", "mlgen filter"), BARE_RUN),
    # train-classifier options (refused before the stage looks for its input)
    "train-unknown-head": Case(["train-classifier", "--run", RUN, "--head", "mlp"], ("head", "mlp"), BARE_RUN),
    "train-unknown-loss": Case(["train-classifier", "--run", RUN, "--loss", "hinge"], ("loss", "hinge"), BARE_RUN),
    "train-steps-0": Case(["train-classifier", "--run", RUN, "--train-steps", "0"], ("--train-steps",), BARE_RUN),
    "train-holdout-1.5": Case(["train-classifier", "--run", RUN, "--holdout", "1.5"], ("holdout", "1.5"), BARE_RUN),
    "train-epochs-not-a-number": Case(["train-classifier", "--run", RUN, "--epochs", "ten"], ("--epochs",), BARE_RUN),
    "train-prompt-context-0": Case(
        ["train-classifier", "--run", RUN, "--prompt-context", "0"], ("prompt_context",), BARE_RUN
    ),
    "train-soft-targets-1.5": Case(
        ["train-classifier", "--run", RUN, "--soft-targets", "1.5"], ("soft_targets", "1.5"), BARE_RUN
    ),
    "train-soft-targets-raw": Case(  # raw images have no teacher scores
        ["train-classifier", "--run", RUN, "--source", "raw", "--soft-targets", "0.5"],
        ("--soft-targets", "--source raw"),
        BARE_RUN,
    ),
    "train-soft-targets-mlcd": Case(
        ["train-classifier", "--run", RUN, "--loss", "mlcd", "--soft-targets", "0.5"],
        ("--soft-targets", "mlcd"),
        BARE_RUN,
    ),
    # prompts: a dead server, a template that is missing or not a template, a negative timeout
    "prompts-dead-server": Case(
        [
            "prompts",
            "--run",
            RUN,
            "--classes",
            "c.txt",
            "--llm",
            "openai:m",
            "--llm-base-url",
            DEAD_SERVER,
            "--request-retries",
            "0",
            "--request-timeout",
            "5",
        ],
        ("cannot reach", DEAD_SERVER),
        CLASSES_FILE,
        timeout=60,
    ),
    "prompts-missing-template": Case(
        [*PROMPTS, "--prompt-template", "nope.yaml"], ("nope.yaml", "not found"), CLASSES_FILE
    ),
    "prompts-template-not-a-template": Case(
        [*PROMPTS, "--prompt-template", "c.txt"], ("c.txt", "messages"), CLASSES_FILE
    ),
    "prompts-negative-timeout": Case(
        [*PROMPTS, "--request-timeout", "-1"], ("request_timeout", "-1"), CLASSES_FILE, no_prompts=True
    ),
    # a command that does not exist
    "no-such-command": Case(["evalute", "--run", RUN], ("evalute",)),
}


@pytest.fixture(scope="module")
def latest_outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """The selected LATEST_CASES (all, or those ``-k`` picked), two processes at a time."""
    wanted = [
        item.callspec.params["name"]
        for item in request.session.items
        if item.originalname == "test_latest_commands_bad_input" and hasattr(item, "callspec")
    ]
    root = tmp_path_factory.mktemp("latest")
    jobs = {
        name: Job(
            make_folder(root / name, LATEST_CASES[name].files), [LATEST_CASES[name].args], LATEST_CASES[name].timeout
        )
        for name in wanted
    }
    return {name: outcomes[0] for name, outcomes in run_all(jobs).items()}


@pytest.mark.parametrize("name", list(LATEST_CASES))
def test_latest_commands_bad_input(name: str, latest_outcomes: dict[str, Outcome], tmp_path: Path) -> None:
    case, outcome = LATEST_CASES[name], latest_outcomes[name]
    assert_one_error_line(outcome.proc, *case.mentions)
    assert outcome.files_after == outcome.files_before, "files written outside the run directory"
    if case.no_prompts:
        assert outcome.run_after == outcome.run_before, "the run changed before the bad input was refused"
    if case.timeout < 300:
        assert outcome.seconds < case.timeout
