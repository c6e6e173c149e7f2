"""Models. :func:`build_model` turns a run config plus its tokenizers into a model."""
from __future__ import annotations

from mmtrain.models.causalfusion import CausalFusion, ModelConfig


def build_model(model_cfg: ModelConfig, image_size: int, text_tok, image_tok) -> CausalFusion:
    """``text_tok`` may be None in class mode."""
    if image_size % image_tok.downsample:
        raise ValueError(f"data.image_size {image_size} is not divisible by the image tokenizer's downsample {image_tok.downsample}")
    latent_size = image_size // image_tok.downsample
    if model_cfg.condition == "class":
        return CausalFusion(model_cfg, latent_channels=image_tok.latent_channels, latent_size=latent_size)
    special = {"pad": text_tok.pad_id, "bos": text_tok.bos_id, "eos": text_tok.eos_id, "boi": text_tok.boi_id, "eoi": text_tok.eoi_id}
    return CausalFusion(model_cfg, latent_channels=image_tok.latent_channels, latent_size=latent_size,
                        vocab_size=text_tok.vocab_size, special_ids=special)
