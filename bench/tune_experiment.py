"""Choose the experiment's fixed settings on VALIDATION scenes, never on the test set.

For each candidate setting, the arm it concerns is trained on the experiment's own data for a few seeds (the same
runs ``mlgen experiment`` makes: generation, filter, seen and oracle images) and scored by its best validation
mAP (the unseen labels on the seed's ``val`` scenes: what checkpoint selection reads). The test scenes are never
rendered or read here. Prints one table per question and the candidate each chooses.

- the shared head's optimizer and learning rate, and augmentation (arm ``mlgen``; ``oracle`` as a check);
- the shared head's start: random weights or the teacher's text embeddings, with its learning rate (arm ``mlgen``;
  ``--init-arms`` adds others, e.g. ``oracle``);
- the label sets: the LLM's pairs (arm ``mlgen``) or one label per image (arm ``singletons``);
- the paper arm's SGD learning rate (arm ``paper``: DualCoOp shared context + fusion);
- the default head on each of ``--arms`` (``arms``: e.g. generated against real images at another
  ``--oracle-images`` count);
- blending mlgen's trained head with the teacher's zero-shot head in weight space (``interpolate``; WiSE-FT);
- soft targets (arm ``mlgen`` with ``--soft-targets W``: its non-training labels on W x the teacher's probability);
- the filter's default (arm ``mlgen`` on the seed's images filtered again with each candidate: rule, gate, best
  name, fallback, competitors; ``no filter`` as the reference the default must not fall below);
- the training budget (``budget``: epochs of ``mlgen`` and ``oracle``, with the epoch each selects: a budget whose
  best epoch is the last one is cut short) and the probe's (``probe``: its ``probe_epochs``);
- why the paper arm is below zero-shot (``paper-why``: budget, DualCoOp context length, SGD rate, fusion rate, no
  fusion, the shared head's optimizer), beside the teacher's zero-shot validation mAP.

Seeds: tuning uses seeds ``--first-seed`` (1000 by default; below 1000 is refused) .. first + seeds - 1, disjoint
from every experiment seed (the headline uses 10-19), and every table printed names its seeds.

Usage: HF_HUB_OFFLINE=1 python bench/tune_experiment.py [--world toy] [--seeds 2] [--first-seed 1000]
       [--llm template] [--out DIR]
       [--questions head,init,sets,paper,soft,filter,interpolate,arms] [--model FOLDER]
       [--images-per-prompt 4] [--oracle-images 512] [--generate-steps 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import tempfile
from pathlib import Path

from mlgen.config import ExperimentConfig
from mlgen.errors import MlgenError
from mlgen.experiment.arms import BY_NAME
from mlgen.experiment.cells import Context, _stage_class, classifier_config
from mlgen.experiment.data import resolve
from mlgen.experiment.runner import DEFAULT_CLASSIFIER
from mlgen.experiment.runs import filtered_variant, prepare
from mlgen.pipeline.runner import run_stage

HEAD = {  # name -> changes to the shared head: the first tuning, of a head started from random weights
    "adamw 1e-3, no augment": dict(head_init="random", optimizer="adamw", lr=1e-3, augment=False),
    "adamw 3e-3, no augment": dict(head_init="random", optimizer="adamw", lr=3e-3, augment=False),
    "adamw 1e-3, augment": dict(head_init="random", optimizer="adamw", lr=1e-3, augment=True, augment_views=4),
    "sgd 0.002 (official), no augment": dict(head_init="random", optimizer="sgd", lr=0.002, augment=False),
    "sgd 0.02, no augment": dict(head_init="random", optimizer="sgd", lr=0.02, augment=False),
}
INIT = {  # name -> the shared head's start: random (what it knows of the unseen labels comes from the images) or
    # the teacher's text embeddings of the label names (the untrained head is the teacher's zero-shot classifier)
    "random init, adamw 1e-3": dict(head_init="random", lr=1e-3),
    "text init, adamw 1e-3": dict(head_init="text", lr=1e-3),
    "text init, adamw 3e-4": dict(head_init="text", lr=3e-4),
    "text init, adamw 1e-4": dict(head_init="text", lr=1e-4),
    # the cosine head's weights start at unit norm from text but at ~0.02 * sqrt(dim) from random: the same AdamW
    # step turns a text-started head several times less, so larger rates are candidates too
    "text init, adamw 3e-3": dict(head_init="text", lr=3e-3),
    "text init, adamw 1e-2": dict(head_init="text", lr=1e-2),
    "text init, adamw 3e-2": dict(head_init="text", lr=3e-2),
    "text init, adamw 1e-1": dict(head_init="text", lr=1e-1),
}
PAPER_LR = (0.002, 0.02, 0.2)
FILTER = {  # name -> changes to the default filter (the seed's mlgen images filtered again); None: no filter
    "exact, bare (COCO script)": {"rule": "exact", "text": "bare", "gate": 0.0, "min_keep": 0.0},
    "topk (NUS-WIDE script)": {"rule": "topk", "gate": 0.0, "min_keep": 0.0},
    "exact, gate 0.6": {"rule": "exact", "gate": 0.6, "min_keep": 0.0},
    "exact, gate 0.75": {"rule": "exact", "gate": 0.75, "min_keep": 0.0},
    "exact, best name": {"rule": "exact", "text": "best", "gate": 0.0, "min_keep": 0.0},
    "exact, min-keep 0.5": {"rule": "exact", "gate": 0.0, "min_keep": 0.5},
    "exact, seen labels compete": {"rule": "exact", "gate": 0.0, "min_keep": 0.0, "competitors": "seen"},
    "topk, gate 0.75": {"rule": "topk", "gate": 0.75, "min_keep": 0.0},
    "topk, gate 0.75, min-keep 0.5": {"rule": "topk", "gate": 0.75, "min_keep": 0.5},
    "no filter": None,
    "exact, gate 0.75, min-keep 0.5": {"rule": "exact", "gate": 0.75, "min_keep": 0.5},
    "exact, gate 0.9": {"rule": "exact", "gate": 0.9, "min_keep": 0.0},
    "exact, gate 0.75, min-keep 0.5, prototype 0.5": {"rule": "exact", "gate": 0.75, "min_keep": 0.5, "prototype": 0.5},
    "exact, prototype 0.5, no gate": {"rule": "exact", "gate": 0.0, "min_keep": 0.0, "prototype": 0.5},
}
BUDGETS = (20, 40, 80)  # epochs of every trained arm (pass_steps each of a real and a synthetic pass)
PROBE_BUDGETS = (30, 60, 120, 240)  # the probe's epochs (one real pass of pass_steps each)
# the paper arm (DualCoOp shared context 4 + fusion, ASL, SGD 0.002, 20 epochs) changed one thing at a time
PAPER_WHY = {  # cheap candidates (cached features, no fusion) first; the folder of candidate k is tune-paper-whyK
    "as run (20 epochs, context 4, sgd 0.002, fusion lr 1e-4)": {"epochs": 20},
    "no fusion (DualCoOp alone)": {"epochs": 20, "fusion": False, "cache": True},
    "no fusion, 80 epochs": {"epochs": 80, "fusion": False, "cache": True},
    "no fusion, 320 epochs": {"epochs": 320, "fusion": False, "cache": True},
    "no fusion, adamw 3e-2 (the shared head's optimizer)": {
        "epochs": 20,
        "fusion": False,
        "cache": True,
        "optimizer": "adamw",
        "lr": 3e-2,
    },
    "no fusion, context 8": {"epochs": 20, "fusion": False, "cache": True, "prompt_context": 8},
    "no fusion, context 2": {"epochs": 20, "fusion": False, "cache": True, "prompt_context": 2},
    "no fusion, sgd 0.02": {"epochs": 20, "fusion": False, "cache": True, "lr": 0.02},
    "80 epochs": {"epochs": 80},
    "fusion lr 1e-2": {"epochs": 20, "fusion_lr": 1e-2},
}
SOFT_TARGETS = (0.0, 0.25, 0.5)  # 0: hard targets (the default); 0.5: He et al. 2023's mix
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # weight of the trained head against the teacher's zero-shot head


def val_metrics(ctx: Context, seed: int, arm: str, changes: dict, tag: str) -> dict:
    """The arm's metrics.json with ``changes`` to its ClassifierConfig (its own stage folder): ``validation`` holds
    the unseen labels' validation mAP of every epoch, ``selected_epoch`` the best."""
    spec = BY_NAME[arm]
    run = prepare(ctx.root, ctx.config, ctx.setup, seed, spec.run)
    config = dataclasses.replace(classifier_config(ctx, seed, spec), **changes)
    stage = _stage_class(f"tune-{arm.strip('+')}-{tag}")(run, config)
    run_stage(stage)
    return json.loads((stage.folder / "metrics.json").read_text(encoding="utf-8"))


def val_score(ctx: Context, seed: int, arm: str, changes: dict, tag: str) -> float:
    """The arm's best validation mAP with ``changes`` to its ClassifierConfig (its own stage folder)."""
    return max(entry["mAP"] for entry in val_metrics(ctx, seed, arm, changes, tag)["validation"])


def zero_shot_val(ctx: Context, seed: int) -> float:
    """The teacher's zero-shot (prompt ensemble) mAP on the unseen labels of the seed's validation images that hold
    one: the level the paper arm is compared with, on validation."""
    import torch

    from mlgen.classifiers.evaluate import load_eval_set, zero_shot_scores
    from mlgen.classifiers.metrics import mean_average_precision
    from mlgen.experiment.data import val_set

    images, targets, _ = load_eval_set(val_set(ctx.config, ctx.setup, ctx.root, seed), ctx.setup.classes)
    unseen = len(ctx.setup.unseen)
    rows = targets[:, :unseen].any(axis=1)
    held = [image for image, keep in zip(images, rows, strict=True) if keep]
    scores = zero_shot_scores(ctx.setup.clip, held, ctx.setup.classes, torch.device("cpu"))
    return mean_average_precision(scores[:, :unseen], targets[rows][:, :unseen])


def budget_table(ctx: Context, seeds: list[int], arm: str, candidates: dict[str, dict], tag: str) -> None:
    """Each candidate's best validation mAP and the epoch it selects, per seed ("last" when the best epoch is the
    budget's last one: cut short)."""
    print(f"\n| {arm}: candidate | val mAP (mean, {seed_names(seeds)}) | per seed | selected epoch per seed |")
    print("|---|---|---|---|")
    for index, (name, changes) in enumerate(candidates.items()):
        scores, chosen = [], []
        for seed in seeds:
            metrics = val_metrics(ctx, seed, arm, changes, f"{tag}{index}")
            scores.append(max(entry["mAP"] for entry in metrics["validation"]))
            last = metrics["validation"][-1]["epoch"]
            chosen.append(
                f"{metrics['selected_epoch']}/{last}" + (" last" if metrics["selected_epoch"] == last else "")
            )
        per_seed = ", ".join(f"{x:.3f}" for x in scores)
        print(f"| {name} | {statistics.fmean(scores):.3f} | {per_seed} | {', '.join(chosen)} |", flush=True)


def filter_val_score(ctx: Context, seed: int, changes: dict | None, tag: str) -> float:
    """mlgen's best validation mAP on the seed's images filtered with ``changes`` (None: every raw image)."""
    if changes is None:
        return val_score(ctx, seed, "no-filter", {}, tag)
    run = filtered_variant(ctx.root, ctx.config, ctx.setup, seed, f"tune-{tag}", changes)
    stage = _stage_class("classifier")(run, classifier_config(ctx, seed, BY_NAME["mlgen"]))
    try:
        run_stage(stage)
    except MlgenError as err:  # e.g. a filter that kept nothing: the candidate fails, the others go on
        print(f"{tag}, seed {seed}: {err}")
        return math.nan
    metrics = json.loads((stage.folder / "metrics.json").read_text(encoding="utf-8"))
    return max(entry["mAP"] for entry in metrics["validation"])


def interpolated_val_scores(ctx: Context, seed: int) -> list[float]:
    """mlgen's validation mAP with its trained linear head blended with the untrained one (the teacher's zero-shot
    classifier) in weight space, per :data:`ALPHAS` (WiSE-FT's idea, Wortsman et al. 2022; 1 is the trained head)."""
    import torch
    import torch.nn.functional as F

    from mlgen.classifiers.data import squash_transform
    from mlgen.classifiers.evaluate import load_eval_set
    from mlgen.classifiers.features import label_embeddings
    from mlgen.classifiers.metrics import mean_average_precision
    from mlgen.classifiers.model import load_classifier, load_clip, read_config
    from mlgen.classifiers.predict import predict_logits
    from mlgen.experiment.data import val_set

    val_score(ctx, seed, "mlgen", {}, "interpolate")  # trains the default head (its own folder)
    folder = prepare(ctx.root, ctx.config, ctx.setup, seed, "mlgen").stage_dir("tune-mlgen-interpolate")
    config, cpu = read_config(folder), torch.device("cpu")
    clip_model, preprocess, tokenizer = load_clip(config["clip"], cpu)
    model = load_classifier(clip_model, tokenizer, folder, cpu)
    start = F.normalize(label_embeddings(clip_model, tokenizer, config["classes"], cpu), dim=-1)  # the text start
    trained = F.normalize(model.head.weight.detach().clone(), dim=-1)
    bias = model.head.bias.detach().clone()
    images, targets, _ = load_eval_set(val_set(ctx.config, ctx.setup, ctx.root, seed), config["classes"])
    columns = [config["classes"].index(label) for label in ctx.setup.unseen]
    rows = targets[:, columns].any(axis=1)  # as checkpoint selection scores: images holding an unseen label
    held = [image for image, keep in zip(images, rows, strict=True) if keep]
    scores = []
    for alpha in ALPHAS:
        with torch.no_grad():
            model.head.weight.copy_((1 - alpha) * start + alpha * trained)
            model.head.bias.copy_(alpha * bias)
        logits = predict_logits(model, squash_transform(preprocess), held)
        scores.append(mean_average_precision(logits[:, columns], targets[rows][:, columns]))
    return scores


def paper_why(ctx: Context, seeds: list[int]) -> None:
    """The paper arm with one change at a time (``PAPER_WHY``); the fusion modules' learning rate is a module
    constant of the trainer (official 1e-4), set here for its candidate only."""
    from mlgen.classifiers import train

    candidates = {}
    for name, changes in PAPER_WHY.items():
        changes = dict(changes)
        candidates[name] = changes
    print(f"\n| paper: candidate | val mAP (mean, {seed_names(seeds)}) | per seed | selected epoch per seed |")
    print("|---|---|---|---|")
    for index, (name, changes) in enumerate(candidates.items()):
        fusion_lr = changes.pop("fusion_lr", None)
        official = train.FUSION_LR
        train.FUSION_LR = fusion_lr or official
        try:
            scores, chosen = [], []
            for seed in seeds:
                metrics = val_metrics(ctx, seed, "paper", changes, f"why{index}")
                scores.append(max(entry["mAP"] for entry in metrics["validation"]))
                chosen.append(f"{metrics['selected_epoch']}/{metrics['validation'][-1]['epoch']}")
        finally:
            train.FUSION_LR = official
        per_seed = ", ".join(f"{x:.3f}" for x in scores)
        print(f"| {name} | {statistics.fmean(scores):.3f} | {per_seed} | {', '.join(chosen)} |", flush=True)


def choose(ctx: Context, seeds: list[int], arm: str, candidates: dict[str, dict], question: str) -> str:
    rows = {}
    for index, (name, changes) in enumerate(candidates.items()):  # a folder per question and candidate
        if question == "filter":
            rows[name] = [filter_val_score(ctx, seed, changes, f"{question}{index}") for seed in seeds]
        else:
            rows[name] = [val_score(ctx, seed, arm, changes, f"{question}{index}") for seed in seeds]
    return print_choice(f"{arm}: candidate", rows, seeds)


def choose_arms(ctx: Context, seeds: list[int], candidates: dict[str, tuple[str, dict]]) -> str:
    """Like :func:`choose`, but each candidate is a whole arm (its own generation) with changes to its head."""
    rows = {
        name: [val_score(ctx, s, arm, changes, "sets") for s in seeds] for name, (arm, changes) in candidates.items()
    }
    return print_choice("candidate", rows, seeds)


def seed_names(seeds: list[int]) -> str:
    return f"seeds {seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}"


def print_choice(title: str, rows: dict[str, list[float]], seeds: list[int]) -> str:
    """Print the candidates' validation table; the best mean (a failed candidate, NaN, never) is the choice."""
    print(f"\n| {title} | val mAP (mean over {seed_names(seeds)}) | per seed |\n|---|---|---|")
    for name, scores in rows.items():
        print(f"| {name} | {statistics.fmean(scores):.3f} | {', '.join(f'{s:.3f}' for s in scores)} |")
    best = max(
        rows, key=lambda name: -math.inf if math.isnan(statistics.fmean(rows[name])) else statistics.fmean(rows[name])
    )
    print(f"chosen on validation: {best}")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="toy")
    parser.add_argument("--unseen", default="circle,triangle,star,heart")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=1000, help="tuning seeds start here (1000 or more)")
    parser.add_argument("--llm", default="template", help="template (fast) or smollm2 (the experiment's)")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument(
        "--questions", default="head,paper", help="head, init, sets, paper, soft, filter, interpolate, arms"
    )
    parser.add_argument("--init-arms", default="mlgen", help="arms the init question trains (comma-separated)")
    parser.add_argument("--arms", default="mlgen,no-filter,oracle", help="arms the arms question scores")
    parser.add_argument("--model", default=None, help="generate with this text-to-image model, not the world's")
    parser.add_argument("--images-per-prompt", type=int, default=ExperimentConfig.images_per_prompt)
    parser.add_argument("--oracle-images", type=int, default=ExperimentConfig.oracle_images)
    parser.add_argument("--generate-steps", type=int, default=ExperimentConfig.generate_steps)
    args = parser.parse_args()
    if args.first_seed < 1000:
        parser.error("--first-seed: tuning seeds are 1000 or more (below are the experiment's)")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    import torch

    torch.set_num_threads(1)
    config = ExperimentConfig(
        world=args.world,
        unseen=args.unseen,
        seeds=args.seeds,
        first_seed=args.first_seed,
        llm=args.llm,
        model=args.model,
        images_per_prompt=args.images_per_prompt,
        oracle_images=args.oracle_images,
        generate_steps=args.generate_steps,
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.out or Path(tmp)) / "experiment"
        ctx = Context(root, config, resolve(config), DEFAULT_CLASSIFIER)  # no test set: nothing here scores on it
        if "head" in args.questions:
            choose(ctx, seeds, "mlgen", HEAD, "head")
        if "init" in args.questions:
            for arm in args.init_arms.split(","):
                choose(ctx, seeds, arm, INIT, f"init-{arm.strip('+')}")
        if "sets" in args.questions:  # label sets of the LLM's pairs (the paper) or one label per image
            sets = {"pairs (mlgen)": ("mlgen", {}), "one label per image (singletons)": ("singletons", {})}
            choose_arms(ctx, seeds, sets)
        if "paper" in args.questions.split(","):
            choose(ctx, seeds, "paper", {f"sgd {lr}": dict(lr=lr) for lr in PAPER_LR}, "paper")
        if "filter" in args.questions:
            choose(ctx, seeds, "mlgen", FILTER, "filter")
        if "arms" in args.questions:  # the default head on each arm's images: what each source gives
            rows = {arm: [val_score(ctx, seed, arm, {}, "arms") for seed in seeds] for arm in args.arms.split(",")}
            print_choice("arm (default head)", rows, seeds)
        if "interpolate" in args.questions:
            per_seed = [interpolated_val_scores(ctx, seed) for seed in seeds]
            rows = {f"alpha {alpha}": [scores[i] for scores in per_seed] for i, alpha in enumerate(ALPHAS)}
            print_choice("mlgen: trained head blended with zero-shot, alpha", rows, seeds)
        if "budget" in args.questions:
            for arm in ("mlgen", "oracle"):
                budget_table(ctx, seeds, arm, {f"{e} epochs": {"epochs": e} for e in BUDGETS}, "budget")
        if "probe" in args.questions.split(","):
            budget_table(ctx, seeds, "probe", {f"{e} epochs": {"epochs": e} for e in PROBE_BUDGETS}, "probe")
        if "paper-why" in args.questions:
            rows = [zero_shot_val(ctx, seed) for seed in seeds]
            each = ", ".join(f"{x:.3f}" for x in rows)
            print(f"\nzero-shot val mAP ({seed_names(seeds)}): {statistics.fmean(rows):.3f} ({each})")
            paper_why(ctx, seeds)
        if "soft" in args.questions:
            choose(ctx, seeds, "mlgen", {f"soft targets {w}": dict(soft_targets=w) for w in SOFT_TARGETS}, "soft")


if __name__ == "__main__":
    main()
