"""The arms of ``mlgen experiment``: what each trains on (or that it trains nothing), and what it shares.

Arms that differ only in training share one generation (``run``): ``mlgen``, ``no-filter`` (its raw images),
``no-filter-matched`` (as many raw images per label set as the filter kept), ``soft`` (soft targets), ``+fusion`` and
``text-embedding-head`` (its prompts) all read the seed's ``mlgen`` run.

Like for like: every trained arm runs the same epochs of a real pass then a synthetic pass, each pass exactly
``pass_steps`` optimizer steps whatever its image count, so every arm gets the same steps on the seen columns
and on the unseen ones (a one-source arm runs an empty second pass: the same learning-rate curve). Each keeps
its best epoch on the seed's validation scenes. Arms differ in their data, except where their name says:
``+fusion`` (fusion modules; compared with ``mlgen-uncached``, the same pixels-through-the-encoder training
without them) and the prompt-context heads (``seen-only``, ``paper``: DualCoOp with one shared context, which
alone can score names it never trained on).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlgen.errors import MlgenError


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # zero-shot | s3 | stage (a ClassifierStage on a generated or imported run) | text
    run: str | None  # the seed's run folder it reads (None: no run)
    what: str
    source: str = "filtered"  # stage arms: filtered (kept images) or raw (every generated image)
    fusion: bool = False
    seen_data: bool = True  # stage arms: the seen-label real images train beside (GZSL, as the paper)
    prompt_head: bool = False  # trains the shared-context prompt head (DualCoOp) instead of the shared head
    reference: str = "mlgen"  # the arm it is compared with in the main table
    paper: bool = False  # the paper's classifier: DualCoOp (shared context) + fusion, ASL, SGD
    cache: bool = True  # False: pixels through the encoder every step (as a fusion model must)
    soft_targets: float = 0.0  # --soft-targets: non-training labels on W x the teacher's filter probability
    probe: bool = False  # the ceiling: trained to convergence (``probe_epochs``), not on the arms' budget


ARMS: tuple[Arm, ...] = (
    Arm("zero-shot", "zero-shot", None, "the teacher CLIP, prompt ensemble (no training)"),
    Arm("s3", "s3", None, "S^3 synonym spaces of the teacher CLIP (no training)"),
    Arm(
        "seen-only",
        "stage",
        "seen-only",
        "DualCoOp (one shared context) trained on real seen-label images only, scoring the unseen names",
        seen_data=False,
        prompt_head=True,
    ),
    Arm(
        "paper",
        "stage",
        "mlgen",
        "the paper's classifier on mlgen's data: DualCoOp (shared context) + fusion, ASL, SGD",
        paper=True,
        prompt_head=True,
        fusion=True,
        cache=False,
        reference="seen-only",
    ),
    Arm(
        "text-embedding-head",
        "text",
        "mlgen",
        "the head trained on the prompts' CLIP text embeddings instead of images (TaI-DPT's idea, not its method)",
    ),
    Arm("mlgen", "stage", "mlgen", "LLM prompts -> generation -> filter -> head, with the seen real images"),
    Arm("no-filter", "stage", "mlgen", "mlgen on every generated image (no CLIP filter)", source="raw"),
    Arm(
        "no-filter-matched",
        "stage",
        "mlgen",
        "a seeded random subset of the raw images, as many per label set as the filter kept",
        source="matched",
    ),
    Arm(
        "soft",
        "stage",
        "mlgen",
        "mlgen with soft targets (He et al. 2023): labels an image was not made for train on 0.5 x the teacher's "
        "filter probability instead of 0",
        soft_targets=0.5,
    ),
    Arm(
        "paper-filter",
        "stage",
        "paper-filter",
        "mlgen's images under the COCO script's filter: bare names, exact set, no gate, no fallback",
    ),
    Arm("filter-topk", "stage", "filter-topk", "the NUS-WIDE rule (requested labels in the top-k, extras added)"),
    Arm("no-gate", "stage", "no-gate", "the default filter judging every label, however poorly the teacher reads it"),
    Arm("no-fallback", "stage", "no-fallback", "the default filter without the fallback (a label may be emptied)"),
    Arm("filter-best", "stage", "filter-best", "each label read by its most reliable name (label or synonym)"),
    Arm(
        "filter-prototype",
        "stage",
        "filter-prototype",
        "the default filter with each label's text blended 0.5 with its images' prototype (leave-one-out)",
    ),
    Arm("all-labels", "stage", "all-labels", "the seen labels compete in the filter's grouping softmax"),
    Arm("+aliases", "stage", "aliases", "the default filter given the world's aliases (heart: love symbol, ...)"),
    Arm("+finetune", "stage", "finetune", "mlgen with the text encoder fine-tuned first"),
    Arm(
        "+finetune-best",
        "stage",
        "finetune-best",
        "+finetune with each label read by its best name in the +aliases filter's reliability.json (finetune "
        "--names-from)",
        reference="+finetune",
    ),
    Arm(
        "mlgen-uncached",
        "stage",
        "mlgen",
        "mlgen with pixels through the encoder every step (+fusion's reference)",
        cache=False,
    ),
    Arm(
        "+fusion",
        "stage",
        "mlgen",
        "mlgen plus the feature fusion modules",
        fusion=True,
        cache=False,
        reference="mlgen-uncached",
    ),
    Arm("template-prompts", "stage", "template", "mlgen with one template prompt instead of the LLM's"),
    Arm("singletons", "stage", "singletons", "mlgen with one label per image instead of pairs"),
    Arm("oracle", "stage", "oracle", "the head trained on real images of the unseen labels, on the arms' budget"),
    Arm(
        "probe",
        "stage",
        "probe",
        "a linear probe on the teacher's frozen features, trained on real scenes of every label to convergence "
        "(probe_epochs, chosen on validation): the ceiling of the frozen backbone",
        seen_data=False,
        probe=True,
    ),
)
BY_NAME = {arm.name: arm for arm in ARMS}
REFERENCE = "mlgen"


def select_arms(spec: str) -> list[Arm]:
    """``ALL`` or a comma-separated subset, in the table's order; an unknown name is one error line."""
    if spec.strip().upper() == "ALL":
        return list(ARMS)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise MlgenError("--arms is empty: ALL or a comma-separated list of arms")
    unknown = [name for name in names if name not in BY_NAME]
    if unknown:
        raise MlgenError(f"unknown arm '{unknown[0]}': use ALL or some of {', '.join(BY_NAME)}")
    return [arm for arm in ARMS if arm.name in names]


# Further comparisons the table reports beside each arm's difference to its reference: (arm, reference).
EXTRA_COMPARISONS: tuple[tuple[str, str], ...] = (
    ("paper", "zero-shot"),
    ("no-filter", "no-filter-matched"),
)


def stage_name(arm: Arm) -> str:
    """The classifier stage folder of a stage arm in its run (arms sharing the mlgen run get their own)."""
    return "classifier" if arm.run != "mlgen" or arm.name == REFERENCE else "classifier-" + arm.name.strip("+")
