"""What both model families share: the image token grid and the text tokenizer's ids."""
from __future__ import annotations

import torch.nn as nn

from mmtrain.models.config import ModelConfig


class ImageTokenModel(nn.Module):
    """Checks the inputs and sets the geometry every family reads: ``grid`` (tokens per
    side), ``num_image_tokens`` (L), ``token_dim`` (P = p*p*C) and ``ids`` (pad, bos, eos,
    boi, eoi in text mode)."""

    def __init__(self, cfg: ModelConfig, latent_channels: int, latent_size: int, vocab_size: int = 0,
                 special_ids: dict | None = None):
        super().__init__()
        if latent_size % cfg.patch_size:
            raise ValueError(f"latent size {latent_size} is not divisible by model.patch_size {cfg.patch_size}")
        if cfg.condition == "text" and (vocab_size < 1 or not special_ids):
            raise ValueError("model.condition=text needs a text tokenizer (vocab_size and special ids)")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.latent_channels = latent_channels
        self.latent_size = latent_size
        self.grid = latent_size // cfg.patch_size
        self.num_image_tokens = self.grid**2
        self.token_dim = cfg.patch_size**2 * latent_channels
        self.ids = dict(special_ids or {})

    def _init_linear_layers(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
