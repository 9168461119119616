"""``mlgen bench``: size a job on this machine before booking it (images/s, steps/s, memory, projected time)."""

from __future__ import annotations

import datetime
import json
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from mlgen import __version__
from mlgen.config import PAPER_DIFFUSION, PAPER_FILTER_CLIP
from mlgen.errors import MlgenError


def bench_command(
    model: Annotated[
        str, typer.Option(help="diffusers model id or folder; built in (named only): toy*, tiny.")
    ] = PAPER_DIFFUSION,
    arch: Annotated[
        str | None, typer.Option(help="sd2, sd15, sdxl or sd-turbo: the real architecture with random weights.")
    ] = None,
    clip: Annotated[
        str, typer.Option(help="open_clip ARCH/PRETRAINED, hf-hub:ID, folder; built in (named only): toy*, tiny.")
    ] = PAPER_FILTER_CLIP,
    clip_arch: Annotated[
        str | None, typer.Option(help="ViT-B-32, RN50 or ViT-L-14: the real CLIP architecture with random weights.")
    ] = None,
    size: Annotated[int | None, typer.Option(min=8, help="Image side in pixels (default: the model's preset).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps per image.")] = 2,
    images: Annotated[int | None, typer.Option(min=1, help="Images to generate (default: one batch).")] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Images per batch (default: automatic; 1 on CPU with --arch).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto (fp16 on CUDA, fp32 on CPU), fp16, bf16, fp32.")] = "auto",
    compile_unet: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the UNet.")] = False,
    filter_images: Annotated[
        int | None, typer.Option(min=1, help="Images the filter benchmark scores (default 32; 8 on CPU with --arch).")
    ] = None,
    finetune_steps: Annotated[
        int | None, typer.Option(min=0, help="Fine-tuning steps timed (0: skip; default 1, 0 on CPU with --arch).")
    ] = None,
    quota: Annotated[int, typer.Option(help="Projection: kept images per label.")] = 200,
    labels: Annotated[int, typer.Option(help="Projection: number of labels.")] = 17,
    out: Annotated[Path, typer.Option(help="Where the figures go (JSON).")] = Path("bench.json"),
) -> None:
    """Images/s of generate and filter beside the bare library calls, fine-tuning steps/s, memory, projected time."""
    if quota < 1 or labels < 1:
        raise MlgenError(f"--quota and --labels must be at least 1, got {quota} and {labels}")
    from mlgen.bench.models import arch_spec, random_clip_dir, random_pipeline_dir

    if arch is not None:
        arch_spec(arch)  # an unknown arch: one line, before anything loads
        model = str(random_pipeline_dir(arch))
    if clip_arch is not None:
        clip = str(random_clip_dir(clip_arch))
    from mlgen.workflow import check_models

    check_models([model], [clip])  # one line before anything runs when a model cannot be had
    results = run_bench(
        model, arch, clip, size, steps, images, batch_size, dtype, compile_unet, filter_images, finetune_steps
    )
    results["projection"] = projection(results, quota, labels)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    typer.echo("\n".join(table(results)))
    typer.echo(f"figures in {out}")


def run_bench(
    model: str,
    arch: str | None,
    clip: str,
    size: int | None,
    steps: int,
    images: int | None,
    batch_size: int | None,
    dtype: str,
    compile_unet: bool,
    filter_count: int | None,
    finetune_steps: int | None,
) -> dict[str, Any]:
    import torch

    from mlgen.bench import measure
    from mlgen.config import GenerateConfig
    from mlgen.generate.diffusion import auto_batch_size
    from mlgen.models.registry import torch_dtype
    from mlgen.pipeline.ranks import current_ranks

    device = current_ranks().device
    started = time.time()
    real_size_on_cpu = arch is not None and device.type != "cuda"
    if real_size_on_cpu and batch_size is None:
        batch_size = 1  # a real UNet renders one image in seconds here: a batch of 8 would take minutes
    if filter_count is None:
        filter_count = 8 if real_size_on_cpu else 32  # rendered by the tiny model at --size first
    skipped = None
    if finetune_steps is None:
        finetune_steps = 0 if real_size_on_cpu else 1
        if real_size_on_cpu:
            skipped = "skipped on CPU with --arch (a real-size training step is slow here; --finetune-steps 1 runs it)"
    config = GenerateConfig(
        model=model, preset=arch, size=size, steps=steps, batch_size=batch_size, dtype=dtype, compile=compile_unet
    )
    with tempfile.TemporaryDirectory(prefix="mlgen-bench-") as tmp:
        side = size or 512
        chosen = batch_size or auto_batch_size(device, side, torch_dtype(dtype, device))
        run = measure.prompt_run(Path(tmp) / "generate", images or chosen)
        generate, stage = measure.bench_generate(run, config, images or chosen)
        del stage
        filter_run = measure.prompt_run(Path(tmp) / "filter", filter_count)
        measure.bench_generate(filter_run, GenerateConfig(model="tiny", steps=1, size=generate["size"]), filter_count)
        filtered = measure.bench_filter(filter_run, clip)
        finetune = None
        if finetune_steps:
            finetune = measure.bench_finetune(run, model, clip, generate["size"], steps, finetune_steps)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {
        "mlgen_version": __version__,
        "date": datetime.date.today().isoformat(),
        "device": device_name,
        "torch": torch.__version__,
        "arch": arch,
        "generate": generate,
        "filter": filtered,
        "finetune": finetune,
        "finetune_skipped": skipped,
        "memory": measure.memory(),
        "seconds": round(time.time() - started, 1),
    }


def projection(results: dict[str, Any], quota: int, labels: int) -> dict[str, Any]:
    """Wall time of a quota job with these models: round 1's images (every label's pairs) at the measured rates."""
    from mlgen.dryrun import plan_job, projected_seconds

    g = results["generate"]
    names = [f"label{i}" for i in range(labels)]
    data = {"prompts": {"llm": "template"}, "generate": {"model": "tiny", "size": g["size"], "steps": g["steps"]}}
    job = plan_job(data, names, quota)
    seconds = projected_seconds(job, results)
    return {
        "quota": quota,
        "labels": labels,
        "images": job.images,
        "seconds": {k: round(v) for k, v in seconds.items()},
        "total_seconds": round(sum(seconds.values())),
    }


def table(r: dict[str, Any]) -> list[str]:
    g, f, t, m, p = r["generate"], r["filter"], r["finetune"], r["memory"], r["projection"]
    what = f"{r['arch']} (random weights)" if r["arch"] else g["model"]
    lines = [
        f"mlgen bench on {r['device']}: {what}, {g['size']} px, {g['steps']} steps, {g['dtype']}",
        f"{'':26}{'mlgen stage':>14}{'bare call':>14}{'stage/bare':>12}",
        f"{'generate images/s':26}{g['images_per_s']:14.3f}{g['bare_images_per_s']:14.3f}{g['ratio']:12.3f}",
        f"{'filter images/s':26}{f['images_per_s']:14.2f}{f['bare_images_per_s']:14.2f}{f['ratio']:12.3f}",
    ]
    if t:
        lines.append(f"{'finetune steps/s':26}{t['steps_per_s']:14.4f}")
    elif r.get("finetune_skipped"):
        lines.append(f"{'finetune steps/s':26}{'':>4}{r['finetune_skipped']}")
    gpu = "n/a" if m["peak_gpu_gib"] is None else f"{m['peak_gpu_gib']} GiB"
    lines.append(f"peak memory: RSS {m['peak_rss_gib']} GiB, GPU {gpu}; batch size chosen: {g['batch_size']}")
    hours = p["total_seconds"] / 3600
    lines.append(
        f"projected: --quota {p['quota']} --labels {p['labels']}: round 1 renders {p['images']} images, "
        f"about {hours:.1f} h on this machine ({', '.join(f'{k} {v} s' for k, v in p['seconds'].items())})"
    )
    lines.append(f"(bench took {r['seconds']} s)")
    return lines
