"""Issue 33: the official recipe in one command (examples/paper-*.yaml with --data), the NUS-WIDE filter rule as
official (k fixed at 7, parent labels added), the published metrics (AP 0 for a label without positives) and the
official checkpoint selection (best TEST F1@3), labelled as such. Every model here is a built-in one (tiny)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from conftest import BUILTIN_MODELS, mlgen
from mlgen.classifiers.benchmarks import NUS_SELECTION_FILES, shipped
from mlgen.classifiers.metrics import evaluate_scores, mean_average_precision
from mlgen.classifiers.stage import OFFICIAL_SELECTION
from mlgen.config import FilterConfig
from mlgen.filters import stage as filter_stage
from mlgen.filters.stage import FilterStage, read_parents
from zsl_layouts import make_coco_zsl, make_nus_zsl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NUS = shipped("nus_81_unseen")


# --- the NUS-WIDE rule: k fixed at 7 whatever is gated, the parent labels added ------------------------------


class FakeText:
    """What FilterStage.decide reads of its text side: logits over the 81 labels, some gated."""

    def __init__(self, scores: torch.Tensor, requested: torch.Tensor, gated: torch.Tensor) -> None:
        self.scores, self.requested, self.gated = scores, requested, gated
        self.competitor_count = 0
        self.competitor_scores = scores.new_zeros(scores.shape[0], 0)

    def teacher_probs(self) -> torch.Tensor:
        return self.scores.softmax(-1)

    def competitor_texts(self) -> list[str]:
        return []


def decide_nus(monkeypatch, config: FilterConfig, gated_labels: list[str], asked: list[list[str]]):
    """FilterStage.decide on 81 NUS-WIDE labels (requested ones scored highest); returns (decisions, k seen)."""
    stage = FilterStage.__new__(FilterStage)
    stage.config, stage.device, stage.classes = config, torch.device("cpu"), list(NUS)
    stage.class_index = {label: i for i, label in enumerate(NUS)}
    stage.parents = read_parents(config.parents) if config.parents else {}
    requested = torch.zeros(len(asked), len(NUS), dtype=torch.bool)
    for row, labels in enumerate(asked):
        requested[row, [NUS.index(label) for label in labels]] = True
    scores = torch.linspace(0, 1, len(NUS)).repeat(len(asked), 1) + 10 * requested
    gated = torch.tensor([label in gated_labels for label in NUS])
    monkeypatch.setattr(filter_stage, "TextSide", lambda *args: FakeText(scores, requested, gated))
    seen, original = [], filter_stage.topk_keep

    def spy(probs, requested, k, extra_threshold):
        seen.append(torch.as_tensor(k).expand(probs.shape[0]).tolist())
        return original(probs, requested, k, extra_threshold)

    monkeypatch.setattr(filter_stage, "topk_keep", spy)
    keys = [f"k{i}" for i in range(len(asked))]
    return stage.decide(keys, torch.zeros(len(asked), 4), requested, write=False), seen[0]


@pytest.mark.parametrize("topk", [7, None])  # the recipe's explicit 7, and the automatic 7-of-81 share
def test_k_stays_7_on_nus_wide_when_labels_are_gated(monkeypatch, topk) -> None:
    gated = NUS[:30]  # 30 of the 81 labels not judged: what is ranked shrinks, k does not
    config = FilterConfig(clip="tiny", rule="topk", topk=topk, gate=0.75, min_keep=0)
    _, k = decide_nus(monkeypatch, config, gated, [["dog", "cars"], ["zebra"]])
    assert k == [7, 7]


def test_parent_labels_are_added_as_positives_under_topk(monkeypatch) -> None:
    config = FilterConfig(clip="tiny", rule="topk", topk=7, gate=0, min_keep=0, extra_threshold=1.0, parents="nus-wide")
    decisions, _ = decide_nus(monkeypatch, config, [], [["dog", "cars"], ["police"], ["sky"]])
    assert decisions["k0"]["kept"] and decisions["k0"]["training"] == ["cars", "dog", "vehicle", "animal"]
    assert decisions["k1"]["training"] == ["police", "person"]
    assert decisions["k2"]["training"] == ["sky"]  # no parent
    assert decisions["k0"]["labels"] == ["cars", "dog"]  # what was asked for stays what it was (label order)
    without = FilterConfig(clip="tiny", rule="topk", topk=7, gate=0, min_keep=0, extra_threshold=1.0)
    assert decide_nus(monkeypatch, without, [], [["dog", "cars"]])[0]["k0"]["training"] == ["cars", "dog"]


def test_the_shipped_parent_table_is_the_official_one() -> None:
    table = read_parents("nus-wide")
    assert list(table) == ["person", "vehicle", "sports", "plants", "cityscape", "water", "buildings", "animal"]
    assert all(parent in NUS and all(child in NUS for child in children) for parent, children in table.items())
    assert table["animal"][-1] == "whales" and len(table["buildings"]) == 6


# --- metrics as published --------------------------------------------------------------------------------------


def test_ap_zero_and_sklearn_rules_on_a_label_without_positives() -> None:
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4], [0.1, 0.3, 0.6]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0]])  # the third label has no positive image
    # per-class AP: 1.0, 1.0, absent
    assert mean_average_precision(scores, targets) == pytest.approx(1.0)  # sklearn: the label is left out
    assert mean_average_precision(scores, targets, "official") == pytest.approx(2 / 3)  # AP 0, in the mean
    assert evaluate_scores(scores, targets, 3, "official")["mAP"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        mean_average_precision(scores, targets, "papers")


# --- official selection: the epoch of the best TEST F1@3, per setting ----------------------------------------


def test_official_selection_keeps_each_settings_test_best_epoch() -> None:
    import open_clip

    from mlgen.classifiers.model import build_classifier
    from mlgen.classifiers.train import fit
    from mlgen.models.registry import open_clip_name

    torch.manual_seed(0)
    name = open_clip_name("tiny")[0]
    model = build_classifier(open_clip.create_model(name), open_clip.get_tokenizer(name), ["a", "b"], "linear")
    features = model.frozen_features(torch.randn(4, 3, 64, 64))
    targets = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]])
    test = {"zsl": [0.1, 0.5, 0.3, 0.5], "gzsl": [0.4, 0.2, 0.6, 0.1]}  # zsl: epoch 1 (a tie keeps the first)
    weights = []

    def score_of(trained) -> dict[str, float]:
        weights.append({k: v.clone() for k, v in trained.trainable_state().items()})
        epoch = len(weights) - 1
        return {setting: values[epoch] for setting, values in test.items()}

    result = fit(model, lambda epoch: [(features, targets)], epochs=4, lr=0.5, warmup=0, test_select=score_of)
    assert [epoch for epoch, _ in result.official] == [0, 1, 2, 3]
    assert {name: epoch for name, (epoch, _) in result.official_best.items()} == {"zsl": 1, "gzsl": 2}
    for setting, (epoch, state) in result.official_best.items():
        for key, value in weights[epoch].items():
            if key in state:
                assert torch.equal(state[key].cpu(), value), (setting, key)
    final = model.trainable_state()
    assert any(not torch.equal(final[k], weights[1][k]) for k in final)  # the model keeps its own weights
    assert OFFICIAL_SELECTION == "selected on the test split, as the official code does"  # the label everywhere


# --- the recipe, end to end on the miniature benchmarks (tiny models, small counts) ---------------------------


def miniature_config(benchmark: str, tmp_path: Path) -> Path:
    """examples/paper-BENCH.yaml with every model the built-in tiny one and the counts shrunk."""
    config = yaml.safe_load((EXAMPLES / f"paper-{benchmark}.yaml").read_text(encoding="utf-8"))
    config["run"] = str(tmp_path / "run")
    config["rounds"] = {"quota": 1, "max_rounds": 3}
    config["prompts"].update(llm="template", synonyms_per_label=1, synonym_source="lexicon", prompts_per_set=1)
    if benchmark == "nus":
        config["prompts"].update(set_size=2, sets_per_label=1)  # 81 labels: not all 3,321 pairs
    config["finetune"].update(model="tiny", clip="tiny", max_train_steps=1, size=64, steps=2)
    config["generate"].update(model="tiny", size=64, steps=2, shard_size=64, batch_size=16)
    # the tiny CLIP reads nothing: a k of every label keeps every image, so the quota rounds end
    labels = 81 if benchmark == "nus" else 17
    config["filter"].update(clip="tiny", rule="topk", topk=labels, extra_threshold=1.0)
    config["classifier"].update(clip="tiny", epochs=2, prompt_context=4, batch_size=8, val_holdout=0.34)
    path = tmp_path / f"mini-{benchmark}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def nus_with_small_split(root: Path) -> Path:
    """The miniature NUS-WIDE plus its fourth split (val_gzsl_*_small: here the GZSL test's files)."""
    make_nus_zsl(root)
    folder = root / "annotations" / "zsl"
    gzsl = ("formatted_val_gzsl_labels_filtered.npy", "formatted_val_gzsl_images_filtered.npy")
    for source, small in zip(gzsl, NUS_SELECTION_FILES["val-gzsl-small"], strict=True):
        shutil.copy(folder / source, folder / small)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", ["coco", "nus"])
def test_the_paper_recipe_runs_end_to_end_on_the_miniature_benchmark(tmp_path: Path, benchmark: str) -> None:
    root = make_coco_zsl(tmp_path / "coco") if benchmark == "coco" else nus_with_small_split(tmp_path / "nus")
    config = miniature_config(benchmark, tmp_path)
    done = mlgen("run", "--config", config, "--data", f"{benchmark}-zsl:{root}", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    classes = (run / "classes.txt").read_text(encoding="utf-8").split()
    assert len(classes) == (81 if benchmark == "nus" else 17)  # the benchmark's unseen labels
    assert (run / "finetune" / "_SUCCESS.json").is_file()
    metrics = json.loads((run / "classifier" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["ap_rule_name"] == "official" and "AP 0" in metrics["ap_rule"]
    assert metrics["seen_images"] > 0 and metrics["seen_images_validation"] > 0
    official = metrics["official"]
    assert official["label"] == OFFICIAL_SELECTION
    assert set(official["epochs"]) == {"zsl", "gzsl"}
    selection = metrics["selection"]["official"]
    assert selection["label"] == OFFICIAL_SELECTION and selection["metric"] == "f1@3"
    expected_gzsl = "val-gzsl-small" if benchmark == "nus" else "gzsl-test"
    assert selection["splits"] == {"zsl": "unseen-test", "gzsl": expected_gzsl}
    assert "f1@5" in metrics["zsl"] if benchmark == "nus" else "f1@5" not in metrics["zsl"]
    out = done.stdout
    assert out.count(OFFICIAL_SELECTION) == 2, out  # the ZSL and the GZSL row, each labelled
    assert "selected on validation" in out and "optimism of test selection" in out
    gzsl = metrics["gzsl"]  # the miniature GZSL test: most of its 65 labels have no positive image
    aps = list(gzsl["per_class_AP"].values())
    assert gzsl["classes_without_positives"] and gzsl["mAP"] == pytest.approx(sum(ap or 0 for ap in aps) / len(aps))
    if benchmark == "coco":  # sklearn's rule stays an option, and metrics.json says which rule was used
        again = mlgen("evaluate", "--run", run, "--data", f"coco-zsl:{root}", "--ap-rule", "sklearn")
        assert again.returncode == 0, again.stderr
        sklearn = json.loads((run / "classifier" / "metrics.json").read_text(encoding="utf-8"))
        assert sklearn["ap_rule_name"] == "sklearn" and "left out" in sklearn["ap_rule"]
        present = [ap for ap in sklearn["gzsl"]["per_class_AP"].values() if ap is not None]
        assert sklearn["gzsl"]["mAP"] == pytest.approx(sum(present) / len(present))
        assert sklearn["gzsl"]["mAP"] > gzsl["mAP"]
    if benchmark == "nus":  # the parent labels were added to the kept images' labels
        import pyarrow.parquet as pq

        table = read_parents("nus-wide")
        rows = [
            labels
            for manifest in sorted((run / "filtered").glob("[0-9]*.parquet"))
            if "_" not in manifest.stem
            for labels in pq.read_table(manifest, columns=["labels"]).column("labels").to_pylist()
        ]
        assert rows
        for labels in rows:
            for parent, children in table.items():
                if any(label in children for label in labels):
                    assert parent in labels, labels


@pytest.mark.parametrize("benchmark", ["coco", "nus"])
def test_the_dry_run_prints_the_plan_with_the_real_models(tmp_path: Path, benchmark: str) -> None:
    bench = tmp_path / "bench.json"
    bench.write_text(
        json.dumps(
            {
                "device": "a GPU",
                "generate": {"model": "sd2", "size": 768, "steps": 50, "images_per_s": 0.1},
                "filter": {"images_per_s": 100.0},
                "finetune": {"steps_per_s": 0.5},
            }
        ),
        encoding="utf-8",
    )
    data = f"{benchmark}-zsl:{tmp_path / 'not-here'}"  # a plan needs no data, no weights
    config = EXAMPLES / f"paper-{benchmark}.yaml"
    unset = dict.fromkeys(BUILTIN_MODELS)  # the config's own models, not the tests' built-in ones
    done = mlgen("run", "--config", config, "--data", data, "--dry-run", cwd=tmp_path, env=unset)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in (
        "stabilityai/stable-diffusion-2",
        "ViT-B-32/openai",
        "RN50/openai",
        "768 px, 50 steps",
        "quota 200",
        "4000 steps at 560 px" if benchmark == "coco" else "26000 steps at 560 px",
        "gate 0, min-keep 0",
        "lr 0.002, batch 32" if benchmark == "coco" else "lr 0.0005, batch 96",
        "GPU hours   about",
        "AP 0",
    ):
        assert expected in out, (expected, out)
    if benchmark == "nus":
        assert "top-7" in out and "parents nus-wide" in out
    assert not (tmp_path / "runs").exists()  # nothing written


def test_recipe_inputs_fail_in_one_line(tmp_path: Path) -> None:
    config = EXAMPLES / "paper-coco.yaml"
    done = mlgen("run", "--config", config, "--data", f"coco-zsl:{tmp_path}:seen-train", "--dry-run", cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "without a split" in done.stderr
    (tmp_path / "mine.txt").write_text("zebra\nkite\n", encoding="utf-8")
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"classes: {tmp_path / 'mine.txt'}\n", encoding="utf-8")
    done = mlgen("run", "--config", mine, "--data", f"coco-zsl:{tmp_path}", "--dry-run", cwd=tmp_path)
    assert done.returncode == 1 and "not the 17 unseen labels of coco-zsl" in done.stderr, done.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds:\n  quota: 0\n", encoding="utf-8")
    done = mlgen("run", "--config", bad, "--dry-run", cwd=tmp_path)
    assert done.returncode == 1 and "'quota' of rounds" in done.stderr, done.stderr


def test_official_selection_needs_the_whole_benchmark() -> None:
    from mlgen.classifiers.stage import ClassifierStage
    from mlgen.config import ClassifierConfig
    from mlgen.errors import MlgenError

    run = SimpleNamespace(classes=lambda: ["a"], stage_dir=lambda name: Path("/nonexistent") / name)
    with pytest.raises(MlgenError, match="--test-data"):
        ClassifierStage(run, ClassifierConfig(clip="tiny", select="official"))
