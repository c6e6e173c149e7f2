"""CLIP score of generated images against their prompts, with open_clip and a local checkpoint.

CLIP score = 100 * max(cos(image embedding, text embedding), 0), averaged over images: the
definition of torchmetrics' ``CLIPScore`` (Hessel et al. 2021 without the 2.5 rescale).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mmtrain.eval.features import MetricUnavailable


class ClipScorer:
    def __init__(self, model_name: str, weights: Path, model_config: str = "", device: str | torch.device = "cpu"):
        import open_clip

        if model_config:
            if not Path(model_config).is_file():
                raise FileNotFoundError(f"eval.clip_model_config={model_config}: no such file")
            if Path(model_config).stem != model_name:
                raise ValueError(f"eval.clip_model_config={model_config}: open_clip names the architecture after the file, "
                                 f"so eval.clip_model must be {Path(model_config).stem!r}, got {model_name!r}")
            open_clip.add_model_config(model_config)
        if model_name not in open_clip.list_models():
            raise ValueError(f"eval.clip_model={model_name!r}: not an open_clip architecture (see open_clip.list_models(), "
                             f"or give eval.clip_model_config)")
        if not Path(weights).is_file():
            raise MetricUnavailable(f"CLIP weights not found at {weights} (set eval.clip_weights to a local open_clip "
                                    f"checkpoint of {model_name})")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(weights), device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = device

    @torch.no_grad()
    def scores(self, images: list, prompts: list[str]) -> torch.Tensor:
        """Per-image CLIP scores (N,) of PIL images against their prompts."""
        if len(images) != len(prompts):
            raise ValueError(f"CLIP score: {len(images)} images but {len(prompts)} prompts")
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        image_emb = F.normalize(self.model.encode_image(pixels).float(), dim=-1)  # N, E
        text_emb = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)).float(), dim=-1)  # N, E
        return (100 * (image_emb * text_emb).sum(-1).clamp(min=0)).cpu()
