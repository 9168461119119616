"""Built-in tiny models: real diffusers / open_clip architectures with random weights.

They make every stage runnable offline on a CPU (tests, ``mlgen demo``). Weights come from a
fixed seed and are cached on disk, so a second use only loads files. Their outputs carry no
meaning: use real models for real data.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mlgen.paths import build_dir_atomic, cache_dir

TINY = "tiny"
TINY_RESNET = "tiny-resnet"
# Bump when the architecture or seed below changes, so old caches are not reused.
TINY_VERSION = "v1"
TINY_SEED = 0

TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


# open_clip's ModifiedResNet (``layers`` as a list): its 3x3 convs in layer3/layer4 have 64 and 128
# input channels, so the classifier's GlobalBranch fusion (> 32 input channels) applies to them.
TINY_RESNET_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def clip_tokenizer():
    """A transformers CLIPTokenizer built from the BPE vocabulary that ships inside open_clip.

    transformers 5 needs the ``vocab=``/``merges=`` keywords: ``vocab_file=`` silently gives a
    two-token vocabulary.
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    # open_clip names the special tokens differently; the ids (49406, 49407) are the same.
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="<|endoftext|>")


def _build_tiny_sd(out: Path) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(TINY_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    # Four down blocks: latents are image/8 like a real SD VAE (two blocks are 10-30x slower).
    vae = AutoencoderKL(
        block_out_channels=[32, 32, 32, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=128,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=32,
        )
    )
    tokenizer = clip_tokenizer()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def build_random_clip(out: Path, config: dict | None = None) -> None:
    """An open_clip model of ``config`` (default: the tiny one) with seeded random weights, saved in ``out``."""
    import open_clip
    from safetensors.torch import save_file

    config = TINY_CLIP_CONFIG if config is None else config
    torch.manual_seed(TINY_SEED)
    model = open_clip.CLIP(**config)
    with torch.no_grad():  # a trained CLIP's temperature (100), so softmax decisions are sharp
        model.logit_scale.fill_(torch.log(torch.tensor(100.0)))
        # open_clip zero-initialises every ResNet block's last BatchNorm (each block starts as the identity):
        # random weights would then ignore every 3x3 conv, so give them weight 1 as a trained model has.
        for name, parameter in model.visual.named_parameters():
            if name.endswith("bn3.weight"):
                parameter.fill_(1.0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "open_clip_model.safetensors")
    saved = {"model_cfg": config, "preprocess_cfg": {}}
    (out / "open_clip_config.json").write_text(json.dumps(saved, indent=2), encoding="utf-8")


def tiny_sd_dir() -> Path:
    """Folder of the tiny Stable Diffusion pipeline (diffusers layout), built on first use."""
    return build_dir_atomic(cache_dir() / f"tiny-sd-{TINY_VERSION}", _build_tiny_sd)


def tiny_clip_dir() -> Path:
    """Folder of the tiny open_clip model (``local-dir:`` layout), built on first use."""
    return build_dir_atomic(cache_dir() / f"tiny-clip-{TINY_VERSION}", build_random_clip)


def tiny_resnet_clip_dir() -> Path:
    """Folder of the tiny ResNet open_clip model (``local-dir:`` layout), built on first use."""
    return build_dir_atomic(
        cache_dir() / f"tiny-resnet-clip-{TINY_VERSION}b", lambda out: build_random_clip(out, TINY_RESNET_CONFIG)
    )
