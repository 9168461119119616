"""The arms of ``mlgen experiment``: what each trains on (or that it trains nothing), and what it shares.

Arms that differ only in training share one generation (``run``): ``mlgen``, ``no-filter`` (its raw images),
``+fusion`` and ``text-only`` (its prompts) all read the seed's ``mlgen`` run. Every trained arm uses the same
head, optimizer, augmentation and number of optimizer steps (``ClassifierConfig.steps``), except ``seen-only``:
a head trained on seen labels alone must score names it never trained on, which only a shared prompt context
can (DualCoOp, the classic zero-shot multi-label baseline); it keeps the same optimizer, augmentation and steps.
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
    Arm("text-only", "text", "mlgen", "the head trained on the prompts' text embeddings instead of images"),
    Arm("mlgen", "stage", "mlgen", "LLM prompts -> generation -> filter -> head, with the seen real images"),
    Arm("no-filter", "stage", "mlgen", "mlgen on every generated image (no CLIP filter)", source="raw"),
    Arm("+finetune", "stage", "finetune", "mlgen with the text encoder fine-tuned first"),
    Arm("+fusion", "stage", "mlgen", "mlgen plus the feature fusion modules", fusion=True),
    Arm("template-prompts", "stage", "template", "mlgen with one template prompt instead of the LLM's"),
    Arm("singletons", "stage", "singletons", "mlgen with one label per image instead of pairs"),
    Arm("oracle", "stage", "oracle", "the head trained on real images of the unseen labels (the ceiling)"),
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


def stage_name(arm: Arm) -> str:
    """The classifier stage folder of a stage arm in its run (arms sharing the mlgen run get their own)."""
    return "classifier" if arm.run != "mlgen" or arm.name == REFERENCE else "classifier-" + arm.name.strip("+")
