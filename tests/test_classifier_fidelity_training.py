"""The classifier trains and is scored as the official Diff-ZS-MLC code: per-source label masks, a real pass
then a synthetic pass per epoch with the scheduler stepped after each (constant warm-up, cosine), exact
optimizer-step budgets, squash resize, the official ZSL/GZSL evaluation subsets, rankings by logits, and the
quota's two-label draw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from mlgen.classifiers.data import squash_transform
from mlgen.classifiers.evaluate import _setting, evaluate_on_data, load_eval_set, subsets
from mlgen.classifiers.model import build_classifier, load_clip, save_classifier
from mlgen.classifiers.predict import predict_logits
from mlgen.classifiers.train import Pass, _Trainer, fit, make_optimizer
from mlgen.models.registry import open_clip_name
from mlgen.pipeline.rundir import RunDir

CLASSES = ["circle", "star", "square", "cross"]  # unseen (synthetic): circle, star; seen (real): square, cross
UNSEEN = torch.tensor([True, True, False, False])


def _model(head_init: str = "random"):
    name = open_clip_name("tiny")[0]
    clip = open_clip.create_model(name)
    return build_classifier(clip, open_clip.get_tokenizer(name), CLASSES, "linear", head_init=head_init)


def _features(model, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    pixels = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return model.frozen_features(pixels)


@pytest.mark.parametrize("source", ["real", "synthetic"])
def test_a_batch_has_no_gradient_from_the_other_sources_columns(source: str) -> None:
    model = _model()
    columns = ~UNSEEN if source == "real" else UNSEEN
    trainer = _Trainer(model, "asl", make_optimizer(model, None, "sgd"))
    targets = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.float)
    trainer.backward(_features(model), targets, columns)
    weight, bias = model.head.weight.grad, model.head.bias.grad
    assert torch.count_nonzero(weight[~columns]) == 0 and torch.count_nonzero(bias[~columns]) == 0
    assert torch.count_nonzero(weight[columns]) > 0  # its own columns do learn


def _passes(model, batches_per_pass: int = 2) -> list[Pass]:
    features = _features(model, n=2 * batches_per_pass)
    targets = (torch.rand(2 * batches_per_pass, 4, generator=torch.Generator().manual_seed(1)) > 0.5).float()

    def batches(epoch: int):
        return [({k: v[i : i + 2] for k, v in features.items()}, targets[i : i + 2]) for i in range(0, len(targets), 2)]

    return [Pass(batches, ~UNSEEN, "real"), Pass(batches, UNSEEN, "synthetic")]


def test_learning_rate_trace_is_the_official_one_on_a_three_epoch_run() -> None:
    """Official (Dassl ConstantWarmupScheduler(1 step, 1e-5) around CosineAnnealingLR(T_max=3), stepped after
    the real pass and after the synthetic pass): per pass 1e-5, then cosine of 0, 1, 2, 3, 4 steps."""
    model = _model()
    result = fit(model, _passes(model), epochs=3, optimizer="sgd")
    per_pass = [1e-5, 0.002, 0.0015, 0.0005, 0.0, 0.0005]  # 0.001 * (1 + cos(pi * t / 3)), t = 0..4
    assert result.lr_trace == pytest.approx([lr for lr in per_pass for _ in range(2)], abs=1e-12)
    assert result.optimizer_steps == 12 and len(result.history) == 3
    opt = make_optimizer(model, None, "sgd")
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 5e-4


def test_steps_train_exactly_that_many_optimizer_steps() -> None:
    model = _model()
    result = fit(model, _passes(model, batches_per_pass=3), epochs=50, optimizer="sgd", steps=7)
    assert result.optimizer_steps == 7 == len(result.lr_trace)
    # 7 steps of 3-batch passes: 3 passes = 2 epochs, so the cosine's T_max is 2 scheduler steps
    assert result.lr_trace[:3] == [1e-5] * 3 and result.lr_trace[3:6] == pytest.approx([0.002] * 3)
    assert result.lr_trace[6] == pytest.approx(0.001)


def test_squash_resize_keeps_the_whole_image() -> None:
    """A 128x64 image red in its left eighth: squash keeps the red, open_clip's resize + centre crop cuts it."""
    _, preprocess, _ = load_clip("tiny", torch.device("cpu"))
    image = np.zeros((64, 128, 3), dtype=np.uint8)
    image[:, :, 2] = 255
    image[:, :16] = (255, 0, 0)
    picture = Image.fromarray(image)
    squashed = squash_transform(preprocess)(picture)
    assert squashed.shape == (3, 64, 64)
    assert squashed[0, 32, 2] > squashed[2, 32, 2]  # red at the left border
    assert preprocess(picture)[0, 32, 2] < preprocess(picture)[2, 32, 2]  # the centre crop lost it


def _hand_made_csv(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rows = ["circle", "square", "", "circle|square", "diamond"]  # diamond: a label the model does not know
    lines = ["image,labels"]
    for i, labels in enumerate(rows):
        Image.new("RGB", (64, 64), (40 * i, 80, 120)).save(folder / f"{i}.png")
        lines.append(f"{i}.png,{labels}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "labels.csv"


def test_zsl_and_gzsl_subsets_pick_the_official_images(tmp_path: Path) -> None:
    csv = _hand_made_csv(tmp_path / "real")
    _, targets, _ = load_eval_set(csv, CLASSES)
    rows = subsets(targets, [CLASSES.index("circle"), CLASSES.index("star")])
    assert rows["zsl"].tolist() == [True, False, False, True, False]  # at least one unseen label
    assert rows["gzsl"].tolist() == [True, True, False, True, False]  # at least one label
    run = RunDir(tmp_path / "run")
    model = _model(head_init="text")
    with torch.no_grad():
        model.head.bias.fill_(40.0)  # every logit above 17: float32 probabilities would all be 1.0
    save_classifier(model, run.stage_dir("classifier"), clip="tiny", backbone="tiny", loss="asl")
    (run.stage_dir("classifier") / "_SUCCESS.json").write_text(json.dumps({"config_hash": "test"}))
    (run.stage_dir("classifier") / "metrics.json").write_text("{}")
    metrics = evaluate_on_data(run, csv, ["circle", "star"])
    assert metrics["zsl"]["images"] == 2 and metrics["gzsl"]["images"] == 3
    assert metrics["zero_shot_clip"]["zsl"]["images"] == 2 and "unseen" in metrics["subsets"]["zsl"]
    images, _, _ = load_eval_set(csv, CLASSES)
    _, preprocess, _ = load_clip("tiny", torch.device("cpu"))
    logits = predict_logits(model, squash_transform(preprocess), images)
    assert (logits > 17).all() and len(np.unique(logits.round(6))) > 1  # distinct where sigmoid ties


def test_metrics_rank_by_logits_not_saturated_probabilities() -> None:
    logits = np.array([[20.0], [30.0]])  # float32 sigmoid: 1.0 and 1.0
    targets = np.array([[1], [0]])
    assert torch.sigmoid(torch.tensor(logits, dtype=torch.float32)).unique().tolist() == [1.0]
    assert _setting(logits, targets, ["circle"], logits=True)["mAP"] == pytest.approx(0.5)


def _cprfl_official():
    from mlgen.classifiers.model import HeadOptions

    name = open_clip_name("tiny")[0]
    clip = open_clip.create_model(name)
    options = HeadOptions(cprfl_recipe="official")
    return build_classifier(clip, open_clip.get_tokenizer(name), CLASSES, "cprfl", options=options)


def test_cprfl_official_recipe_trains_with_adamw_onecycle_and_keeps_the_ema_weights() -> None:
    model = _cprfl_official()
    passes = _passes(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = fit(model, passes, epochs=3)
    trace = result.lr_trace
    assert result.optimizer_steps == 12 == len(trace)
    peak = trace.index(max(trace))
    assert max(trace) == pytest.approx(1e-5, rel=0.05) and 0 < peak < len(trace) - 1  # OneCycle: up, then down
    assert trace[0] < 1e-5 / 5 and trace[-1] < trace[peak] / 5
    # the kept weights are the EMA (decay 0.998 over 12 steps): they moved, but far less than one raw step would
    moved = max(float((p.detach() - start[n]).abs().max()) for n, p in model.named_parameters() if n in start)
    assert 0 < moved < 1e-4


def test_mlcd_on_the_linear_head_is_the_margined_loss_under_label_masks() -> None:
    from mlgen.classifiers.losses import mlcd_cosine_loss

    model = _model()
    trainer = _Trainer(model, "mlcd", make_optimizer(model, None, "sgd"))
    # on the unseen columns every row has at most one negative, so the sampled negatives are all of them
    targets = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0], [1, 0, 1, 1]], dtype=torch.float)
    features = _features(model)
    value = trainer.backward(features, targets, UNSEEN)
    weights = torch.nn.functional.normalize(model.head.weight.detach(), dim=-1)
    cosines = torch.nn.functional.normalize(features["pooled"], dim=-1) @ weights.T
    assert float(value) == pytest.approx(float(mlcd_cosine_loss(cosines[:, UNSEEN], targets[:, UNSEEN].bool())))
    assert torch.count_nonzero(model.head.weight.grad[~UNSEEN]) == 0
    assert torch.count_nonzero(model.head.weight.grad[UNSEEN]) > 0


def test_each_real_batch_is_scored_on_100_seen_columns_drawn_at_random_when_there_are_more() -> None:
    """Official num_train_cls: a batch's columns are 100 of the seen ones, a fresh draw per batch, the same on
    every rerun (and so on every rank); 100 or fewer seen columns are all scored."""
    from mlgen.classifiers.source import Source

    seen = torch.arange(300) >= 60  # 240 seen columns, the first 60 unseen
    targets = torch.zeros(8, 300)
    features = {"pooled": torch.randn(8, 4)}
    source = Source(targets, torch.ones(8, dtype=torch.bool), features=features, columns=seen, draw=100)
    drawn = [columns for _, _, columns in source.batches(0, 2, seed=0)]
    assert len(drawn) == 4 and all(int(c.sum()) == 100 and not (c & ~seen).any() for c in drawn)
    assert len({tuple(c.nonzero().flatten().tolist()) for c in drawn}) == 4  # a new draw per batch
    again = [columns for _, _, columns in source.batches(0, 2, seed=0)]
    assert all(torch.equal(a, b) for a, b in zip(drawn, again, strict=True))
    few = Source(targets, torch.ones(8, dtype=torch.bool), features=features, columns=seen & (torch.arange(300) < 150))
    few.draw = 100
    assert all(torch.equal(c, few.columns) for _, _, c in few.batches(0, 2, seed=0))


def test_fit_scores_a_batch_on_its_own_drawn_columns() -> None:
    model = _model()
    features = _features(model, n=2)
    drawn = torch.tensor([False, False, True, False])  # one of the two seen columns drawn for this batch
    batches = [(features, torch.ones(2, 4), drawn)]
    fit(model, [Pass(lambda epoch: batches, ~UNSEEN, "real")], epochs=1, optimizer="sgd", lr=0.1)
    grad_free = model.head.weight.detach().clone()
    model2 = _model()
    assert torch.equal(grad_free[3], model2.head.weight.detach()[3])  # column 3 (seen, not drawn) never moved
    assert not torch.equal(grad_free[2], model2.head.weight.detach()[2])


def test_cprfl_official_recipe_warms_up_for_a_tenth_and_decays_only_matrices() -> None:
    from mlgen.classifiers.recipes import recipe

    model = _cprfl_official()
    optimizer, scheduler, _ = recipe(model, 100)
    trace = []
    for _ in range(100):
        trace.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert trace.index(max(trace)) == 9  # OneCycle pct_start 0.1 (the official train.py), not 0.2
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            expected = 0.0 if parameter.ndim == 1 or name.endswith(".bias") else 1e-4
            assert decay[id(parameter)] == expected, name


def test_cprfl_attention_has_no_dropout_of_its_own() -> None:
    """With the output and MLP dropouts off, a training-mode forward is deterministic: the official attention
    (softmax then values) drops nothing."""
    model = _cprfl_official()
    head = model.head
    for module in head.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    head.train()
    tokens = torch.randn(2, 5, head.visual_proj.in_features, generator=torch.Generator().manual_seed(0))
    assert torch.equal(head({"tokens": tokens}), head({"tokens": tokens}))
