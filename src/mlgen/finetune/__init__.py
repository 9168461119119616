"""Text-encoder fine-tuning with the CLIP-score discriminative loss (Diff-ZS-MLC; ``mlgen finetune``)."""

from mlgen.finetune.output import load_text_encoder, text_encoder_hash

__all__ = ["load_text_encoder", "text_encoder_hash"]
