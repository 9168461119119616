"""``mlgen demo``: every stage offline on the built-in tiny models, in a minute or two on a CPU."""

from __future__ import annotations

import json

from mlgen import workflow
from mlgen.config import ClassifierConfig, FilterConfig, GenerateConfig, PromptsConfig
from mlgen.labels import parse_labels
from mlgen.pipeline.rundir import RunDir


def run_demo(run: RunDir, llm: str = "smollm2") -> list[str]:
    """Run prompts -> generate -> filter -> classifier; return summary lines."""
    classes = parse_labels("\n".join(workflow.DEMO_CLASSES), "demo classes")
    prompt_settings = PromptsConfig(llm=llm, prompts_per_set=3, synonyms_per_label=3, sets_per_shard=5)
    raw_settings = GenerateConfig(model="tiny", images_per_prompt=4, shard_size=32, steps=20)
    raw = workflow.generate(run, raw_settings, prompt_settings, classes)
    filtered = workflow.filter_images(run, FilterConfig(clip="tiny"))
    workflow.train_classifier(run, ClassifierConfig(clip="tiny", epochs=30))
    metrics = json.loads((run.root / "classifier" / "metrics.json").read_text())["test"]
    prompts = run.success("prompts")["counts"]
    return [
        f"prompts/   {prompts['prompts']} prompts for {prompts['label_sets']} label sets "
        f"({prompts['prompts_from_llm']} written by the LLM), {prompts['synonyms']} synonyms",
        f"raw/       {raw['counts']['images']} images in {raw['shards']} WebDataset shards (+ Parquet manifests)",
        f"filtered/  {filtered['counts']['kept']} kept, {filtered['counts']['dropped']} dropped by the CLIP filter",
        f"classifier/ held-out mAP {metrics['mAP']:.3f}, P@3 {metrics['precision@3']:.3f}, "
        f"R@3 {metrics['recall@3']:.3f}, F1@3 {metrics['f1@3']:.3f} on {metrics['images']} images",
        "(tiny models have random weights: the numbers exercise the pipeline, they mean nothing)",
    ]
