"""The classifier stage: what ClassifierConfig says (backbone, fusion, head, loss), trained with ``fit``.

The training images are the source stage's shards (filtered by default), optionally with real images of
seen labels (``seen_data``): every epoch a real pass then a synthetic pass (official), each scored on its own
columns. Training views are augmented as the official code (squash resize, Cutout, RandAugment); with a
cached frozen encoder K augmented views are cached. With ``holdout`` > 0 a label-set split of the synthetic
images is held out and scored: a SYNTHETIC figure, never the real test (``mlgen evaluate --data``).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlgen.classifiers.benchmarks import NUS_SELECTION_FILES, data_exists, open_split, parse_spec, split_classes
from mlgen.classifiers.cache import FeatureCache
from mlgen.classifiers.data import AugmentedView, check_image_folders, squash_transform, train_transform
from mlgen.classifiers.features import label_embeddings
from mlgen.classifiers.metrics import evaluate_scores, precision_recall_f1_at_k
from mlgen.classifiers.model import MultiLabelClassifier, build_classifier, head_options, load_clip, save_classifier
from mlgen.classifiers.source import Source, labelled_samples, mixed, multi_hot, shard_samples, synthetic_targets
from mlgen.classifiers.train import Pass, alternating, fit, fixed_length, idle_pass
from mlgen.config import ClassifierConfig, check_soft_targets
from mlgen.errors import MlgenError
from mlgen.paths import write_json_atomic
from mlgen.pipeline.ranks import Ranks, current_ranks
from mlgen.pipeline.runner import Stage

THRESHOLD = 0.5  # the decision threshold saved with the model (CP/CR/CF1 and OP/OR/OF1 use it)
# Every figure of a checkpoint chosen on the test split carries this label (metrics.json, printed tables).
OFFICIAL_SELECTION = "selected on the test split, as the official code does"
OFFICIAL_FOLDER = "official"  # classifier/official/{zsl,gzsl}/: the test-selected checkpoints


def held_out(groups: list[int], fraction: float) -> torch.Tensor:
    """A stable split by label set: every image of a held-out set is held out (no prompt on both sides).

    About ``fraction`` of the sets (at least one, and at least one left to train on), chosen by a hash
    of the set id so the same run always splits the same way.
    """
    sets = sorted(set(groups), key=lambda g: hashlib.sha256(str(g).encode()).digest())
    count = min(max(1, round(len(sets) * fraction)), len(sets) - 1)
    chosen = set(sets[:count])
    return torch.tensor([g in chosen for g in groups], dtype=torch.bool)


def seen_rows(labels: list[tuple[str, ...]], unseen: list[str]) -> list[bool]:
    """Which real images have a seen label (one that is not among the generated ``unseen``), for the counts.
    Every real image is trained on, as the official loader: one without a seen label is an all-negative
    example on the seen columns its batch is scored on."""
    generated = set(unseen)
    return [any(label not in generated for label in row) for row in labels]


def is_benchmark_split(config: ClassifierConfig) -> bool:
    """Whether the real seen-label images are a benchmark's split (``coco-zsl:ROOT:seen-train``): a reproduction,
    where the final weights are no answer to "which epoch"."""
    return bool(config.seen_data) and parse_spec(config.seen_data) is not None


class ClassifierStage(Stage):
    """One unit of work: train on the kept images (and real seen-label images), optionally score a hold-out."""

    name = "classifier"
    config_section = "classifier"
    requires = ("filtered",)

    def __init__(self, run, config: ClassifierConfig) -> None:
        super().__init__(run, config)
        self.classes = run.classes()
        self.requires = (config.source,)  # "raw": the same classifier without the filter (an ablation)
        check_soft_targets(config)  # also for configs built in code (the experiment's arms)
        if config.seen_data and not data_exists(config.seen_data):
            raise MlgenError(f"--seen-data not found: {config.seen_data}")
        if config.val_data and not data_exists(config.val_data):
            raise MlgenError(f"--val-data not found: {config.val_data}")
        self.image_folders = tuple(Path(folder) for folder in config.images)
        check_image_folders(self.image_folders, [config.seen_data, config.val_data])
        if config.select != "official" and not (config.val_data or config.val_holdout) and is_benchmark_split(config):
            raise MlgenError(
                f"--select {config.select} chooses the epoch on validation images: with a benchmark's seen split give "
                "--val-holdout SHARE (e.g. 0.05 of it) or --val-data FILE, or --select official (test-selected)"
            )
        if config.val_holdout and not config.seen_data:
            raise MlgenError("--val-holdout holds out a share of --seen-data: give --seen-data too")
        if config.select != "validation":
            spec = parse_spec(config.test_data) if config.test_data else None
            if spec is None or spec.split is not None:
                raise MlgenError(
                    f"--select {config.select} picks epochs on a benchmark's test splits: give --test-data "
                    "coco-zsl:ROOT or nus-zsl:ROOT (the whole benchmark, no split)"
                )
            if not data_exists(config.test_data):
                raise MlgenError(f"--test-data not found: {config.test_data}")

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        if current_ranks().world_size > 1:  # the plan has one unit per rank (below)
            settings["processes"] = current_ranks().world_size
        return settings

    def plan(self) -> list[dict[str, Any]]:
        # one unit per rank: under torchrun every rank runs ``fit`` on its slice of each global batch
        return [{"shard": r, "kind": "train"} for r in range(current_ranks().world_size)]

    def setup(self, ranks: Ranks) -> None:
        self.device = ranks.device
        self.clip_model, self.preprocess, self.tokenizer = load_clip(self.config.clip, ranks.device)
        self.squash = squash_transform(self.preprocess)  # the official evaluation view (and training's base)
        self.test_view = squash_transform(self.preprocess, "bilinear")  # the official test transform, exactly

    def _source(
        self, model: MultiLabelClassifier, cache, targets, rows, images, columns, augment: bool, draw=None, test=False
    ) -> Source:
        """Cached features (or K cached augmented views) when the encoder is frozen, else streamed pixels;
        ``test``: the official test view (bilinear squash)."""
        c = self.config
        train_view = train_transform(self.preprocess) if augment else None
        view, tag = (self.test_view, "bilinear") if test else (self.squash, "squash")
        if cache is None:
            return Source(targets, rows, images=images, preprocess=view, columns=columns, augment=train_view, draw=draw)
        if not augment:
            features = cache.features(images(), view, c.batch_size, tag=tag)
            return Source(targets, rows, features=features, columns=columns, draw=draw)
        views = [
            cache.features(images(), AugmentedView(train_view, v), c.batch_size, tag=f"aug{v}")
            for v in range(c.augment_views)
        ]
        return Source(targets, rows, views=views, columns=columns, draw=draw)

    def _synthetic_rows(self, groups: list[int]) -> torch.Tensor:
        """The hold-out mask (all False without ``holdout``)."""
        if not self.config.holdout:
            return torch.zeros(len(groups), dtype=torch.bool)
        if len(set(groups)) < 2:
            raise MlgenError(
                f"the {self.config.source} stage has {len(groups)} images of {len(set(groups))} label sets: "
                "too few to hold out a label set (--holdout 0, generate more images or lower the filter --threshold)"
            )
        return held_out(groups, self.config.holdout)

    def _passes(self, model, cache, classes: list[str], synthetic: Source, seen) -> list[Pass]:
        """The training passes of an epoch, by schedule: real then synthetic (official), mixed or alternating."""
        c = self.config
        synthetic_pass = Pass(lambda epoch: synthetic.batches(epoch, c.batch_size, c.seed), synthetic.columns)
        if seen is None:
            return [synthetic_pass]
        labels, images = seen
        columns = None if synthetic.columns is None else ~synthetic.columns
        rows = torch.ones(len(labels), dtype=torch.bool)  # every row, as the official loader (see seen_rows)
        rows &= ~self._val_rows(len(labels))  # --val-holdout: those are validated on, never trained on
        self.seen_trained = int(rows.sum())  # metrics.json's seen_images: what the real pass trains on
        draw = c.seen_classes_per_batch or None
        real = self._source(model, cache, multi_hot(labels, classes), rows, images, columns, c.augment, draw)
        real_pass = Pass(lambda epoch: real.batches(epoch, c.batch_size, c.seed + 1), columns, "real")
        if c.schedule == "official":
            return [real_pass, synthetic_pass]
        combine = alternating if c.schedule == "alternating" else mixed
        return [Pass(combine(real_pass.batches, synthetic_pass.batches), None, c.schedule)]

    def _shaped(self, passes: list[Pass]) -> list[Pass]:
        """``pass_steps`` batches in every pass and ``passes_per_epoch`` passes (padded with empty ones)."""
        c = self.config
        if c.pass_steps is not None:
            passes = [fixed_length(one, c.pass_steps) for one in passes]
        if c.passes_per_epoch is not None:
            passes = passes + [idle_pass() for _ in range(c.passes_per_epoch - len(passes))]
        return passes

    def _val_rows(self, count: int) -> torch.Tensor:
        """bool [count]: the seen-data images held out for validation (``val_holdout``; a seeded draw)."""
        held = torch.zeros(count, dtype=torch.bool)
        if self.config.val_holdout:
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.config.seed + 7))
            held[order[: max(1, round(count * self.config.val_holdout))]] = True
        return held

    def _selector(self, model: MultiLabelClassifier, cache, classes: list[str], seen=None):
        """The validation score of ``val_data`` (mAP over this run's labels, on the images that hold one), or with
        ``val_holdout`` of the held-out seen-data images (mAP over the seen labels: the only ones they show), or
        None without validation data."""
        c = self.config
        if not c.val_data and c.val_holdout and seen is not None:
            labels, images = seen
            targets = multi_hot(labels, classes)
            rows = self._val_rows(len(labels))
            columns = [i for i, label in enumerate(classes) if label not in set(self.classes)]
            source = self._source(model, cache, targets, rows, images, None, False)
            truth = targets[rows][:, columns].numpy()
            return lambda trained: evaluate_scores(self._logits(trained, source)[:, columns], truth)["mAP"]
        if not c.val_data:
            return None
        chosen = list(c.val_labels) if c.val_labels else self.classes
        missing = [label for label in chosen if label not in classes]  # scored by name: a shared prompt context
        if missing and (not hasattr(model.head, "set_classes") or getattr(model.head, "class_specific", True)):
            raise MlgenError(f"the {c.head} head cannot score '{missing[0]}' on validation (it never trained on it)")
        scored = classes + missing
        labels, images, _ = labelled_samples(Path(c.val_data), self.image_folders)
        rows = torch.tensor([any(label in chosen for label in row) for row in labels])
        if not rows.any():
            raise MlgenError(f"--val-data {c.val_data}: no image holds one of the labels {', '.join(chosen)}")
        targets = multi_hot(labels, scored)
        source = self._source(model, cache, targets, rows, images, None, False)
        columns = [scored.index(label) for label in chosen]
        truth = targets[rows][:, columns].numpy()

        def score(trained: MultiLabelClassifier) -> float:
            if missing:
                trained.head.set_classes(self.tokenizer, scored)
            try:
                logits = self._logits(trained, source)
            finally:
                if missing:
                    trained.head.set_classes(self.tokenizer, classes)
            return evaluate_scores(logits[:, columns], truth)["mAP"]

        return score

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        folder = self.run.stage_dir(c.source)
        metas = [meta for meta, _ in shard_samples(folder)]
        if not metas:
            raise MlgenError(
                f"the {c.source} stage has 0 images to train on (generate more or lower the filter --threshold)"
            )
        test = self._synthetic_rows([meta["set_id"] for meta in metas])
        seen_labels, seen_images, seen_skipped = (
            labelled_samples(Path(c.seen_data), self.image_folders) if c.seen_data else ([], None, 0)
        )
        if c.seen_data and not any(seen_rows(seen_labels, self.classes)):
            raise MlgenError(f"--seen-data {c.seen_data}: no image has a label outside the run's (generated) labels")
        found = {label for labels in seen_labels for label in labels} | set(split_classes(c.seen_data or ""))
        extra = sorted(found - set(self.classes))
        classes = self.classes + extra  # GZSL: the seen labels of the real data beside the generated ones
        unseen = torch.tensor([label in self.classes for label in classes]) if c.label_masks and extra else None
        truth = multi_hot([meta["labels"] for meta in metas], classes)  # what a held-out image is scored on
        targets = synthetic_targets(metas, classes, c.soft_targets)  # what it trains on
        model = build_classifier(
            self.clip_model,
            self.tokenizer,
            classes,
            c.head,
            c.fusion,
            self.device,
            c.head_init,
            c.seed,
            **head_options(c),
        )
        cache = FeatureCache(self.run.root, c.clip, model) if model.cacheable and c.cache else None

        def images():
            return (image for _, image in shard_samples(folder))

        started = time.perf_counter()
        synthetic = self._source(model, cache, targets, ~test, images, unseen, c.augment)
        heldout = self._source(model, cache, truth, test, images, None, False) if test.any() else None
        # before training: the fused encoder is still the frozen one, so this is CLIP's own zero-shot score
        zero_shot = self._zero_shot(model, heldout, classes) if heldout is not None else None
        passes = self._passes(model, cache, classes, synthetic, (seen_labels, seen_images) if seen_images else None)
        passes = self._shaped(passes)
        select = self._selector(model, cache, classes, (seen_labels, seen_images) if seen_images else None)
        test_select = self._test_selector(model, cache, classes)
        result = fit(
            model,
            passes,
            c.epochs,
            c.loss,
            c.lr,
            seed=c.seed,
            steps=c.steps,
            optimizer=c.optimizer,
            select=select,
            select_every=c.select_every,
            test_select=test_select,
        )
        self.model, self.fit_result = model, result  # for callers that drive the stage themselves (tests)
        with_seen = sum(seen_rows(seen_labels, self.classes))
        held = int(self._val_rows(len(seen_labels)).sum()) if seen_images else 0
        metrics = {
            "train_images": len(synthetic),
            "seen_images": self.seen_trained if seen_images else 0,
            **({"seen_images_validation": held} if c.val_holdout else {}),
            "seen_images_skipped": seen_skipped,
            "seen_images_without_a_seen_label": len(seen_labels) - with_seen,  # kept: all-negative, as official
            "seen_classes_per_batch": c.seen_classes_per_batch or "all",
            "optimizer_steps": result.optimizer_steps,
            "steps_by_pass": result.steps_by_pass,
            "validation": [{"epoch": e, "mAP": round(v, 4)} for e, v in result.validation] or None,
            "selected_epoch": result.selected_epoch,
            "selection": self._selection(result),
            "epochs": len(result.history),
            "schedule": c.schedule if seen_images else "synthetic only",
            "soft_targets": c.soft_targets or "off",
            "label_masks": "real batches on seen columns, synthetic on unseen" if unseen is not None else "all columns",
            "augment": (f"{c.augment_views} cached views" if cache else "fresh per epoch") if c.augment else "off",
            "final_loss": result.history[-1] if result.history else None,
            "train_seconds": round(time.perf_counter() - started, 3),
            "feature_cache": None if cache is None else {"hits": cache.hits, "misses": cache.misses},
        }
        if heldout is not None:
            metrics["synthetic_heldout"] = evaluate_scores(self._logits(model, heldout), truth[test].numpy())
            metrics["zero_shot_clip_heldout"] = evaluate_scores(zero_shot, truth[test].numpy())
            metrics["synthetic_heldout_split"] = "by label set: no prompt's images on both sides"
        if shard["shard"] != 0:  # the other ranks trained the same model; rank 0 writes it
            return {}
        self._save_official(model, result, classes, extra)  # before: --select official saves the ZSL choice below
        if c.select == "official":
            model.load_state_dict(result.official_best["zsl"][1], strict=False)
        save_classifier(
            model,
            self.folder,
            clip=c.clip,
            backbone=c.clip,
            loss=c.loss,
            thresholds=dict.fromkeys(classes, THRESHOLD),
            seen_labels=extra,
            **({"selected": OFFICIAL_SELECTION} if c.select == "official" else {}),
        )
        write_json_atomic(self.folder / "metrics.json", metrics)
        return {"train_images": metrics["train_images"], "test_images": int(test.sum())}

    def _test_selector(self, model: MultiLabelClassifier, cache, classes: list[str]):
        """``select`` official/both: each epoch's TEST F1@3, as the official training script computes it: ZSL on the
        unseen test split (unseen labels), GZSL on the GZSL test split (NUS-WIDE: on val-gzsl-small), every label."""
        c = self.config
        if c.select == "validation":
            return None
        spec = parse_spec(c.test_data)
        chosen = {"zsl": "unseen-test", "gzsl": "gzsl-test"}
        if spec.benchmark == "nus-zsl":
            chosen["gzsl"] = next(iter(NUS_SELECTION_FILES))
        settings = {}
        for name, split_name in chosen.items():
            split = open_split(spec, split_name)
            unknown = [label for label in split.classes if label not in set(classes)]
            if unknown:
                raise MlgenError(
                    f"--select {c.select}: the classifier does not know {len(unknown)} label(s) of {spec} "
                    f"(e.g. '{unknown[0]}'): train with --seen-data {spec.benchmark}:ROOT:seen-train"
                )
            targets = multi_hot(split.labels, classes)
            rows = torch.ones(len(split.labels), dtype=torch.bool)

            def images(files=split.files):
                return (path.read_bytes() for path in files)

            source = self._source(model, cache, targets, rows, images, None, False, test=True)
            columns = [classes.index(label) for label in split.classes]
            settings[name] = (source, columns, targets[:, columns].numpy())
        self.selection_splits = chosen

        def score(trained: MultiLabelClassifier) -> dict[str, float]:
            return {
                name: precision_recall_f1_at_k(self._logits(trained, source)[:, columns], truth, 3)["f1"]
                for name, (source, columns, truth) in settings.items()
            }

        return score

    def _selection(self, result) -> dict[str, Any]:
        """metrics.json's ``selection``: how the saved weights were chosen, and the official choice beside."""
        c = self.config
        if c.val_data or c.val_holdout:
            on = c.val_data or f"{c.val_holdout:.0%} of --seen-data held out (mAP over the seen labels)"
            validation = {"on": on, "epoch": result.selected_epoch}
        else:
            validation = {"on": "no validation data: the final weights", "epoch": len(result.history) - 1}
        out: dict[str, Any] = {"select": c.select, "validation": validation}
        if result.official_best:
            out["official"] = {
                "label": OFFICIAL_SELECTION,
                "data": c.test_data,
                "splits": self.selection_splits,
                "metric": "f1@3",
                "epochs": {name: epoch for name, (epoch, _) in result.official_best.items()},
                "scores": [{"epoch": e, **{k: round(v, 4) for k, v in s.items()}} for e, s in result.official],
            }
        return out

    def _save_official(self, model: MultiLabelClassifier, result, classes: list[str], extra: list[str]) -> None:
        """classifier/official/{zsl,gzsl}/: each setting's test-selected weights (``select`` official or both);
        the weights the model ends with are put back afterwards."""
        if not result.official_best:
            return
        c = self.config
        final = model.trainable_state()
        for name, (epoch, state) in result.official_best.items():
            model.load_state_dict(state, strict=False)
            save_classifier(
                model,
                self.folder / OFFICIAL_FOLDER / name,
                clip=c.clip,
                backbone=c.clip,
                loss=c.loss,
                thresholds=dict.fromkeys(classes, THRESHOLD),
                seen_labels=extra,
                selected=OFFICIAL_SELECTION,
                selected_epoch=epoch,
            )
        model.load_state_dict(final, strict=False)

    def _logits(self, model: MultiLabelClassifier, source: Source) -> np.ndarray:
        """Logits of the source's rows, in order (ranked as they are: sigmoid saturates in float32)."""
        model.eval()
        chunks = []
        with torch.no_grad():
            for inputs, *_ in source.batches(0, 256, 0, shuffle=False):
                if isinstance(inputs, dict):
                    logits = model.forward_features({k: v.to(self.device) for k, v in inputs.items()})
                else:
                    logits = model(inputs.to(self.device))
                chunks.append(logits.double().cpu())
        return torch.cat(chunks).numpy()

    def _zero_shot(self, model: MultiLabelClassifier, source: Source, classes: list[str]) -> np.ndarray:
        text = label_embeddings(self.clip_model, self.tokenizer, classes, self.device)
        chunks = []
        for inputs, *_ in source.batches(0, 256, 0, shuffle=False):
            if not isinstance(inputs, dict):
                inputs = model.frozen_features(inputs.to(self.device))
            pooled = inputs["pooled"]
            chunks.append(torch.nn.functional.normalize(pooled.float().cpu(), dim=-1) @ text.T)
        return torch.cat(chunks).numpy()
