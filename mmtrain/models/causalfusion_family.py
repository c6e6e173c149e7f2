"""CausalFusion as the trainer, the samplers and eval see it (:class:`~mmtrain.models.base.ModelFamily`):
one-image batches through :mod:`mmtrain.models.causalfusion`, document batches through
:mod:`mmtrain.models.document_layout`."""
from __future__ import annotations

import random

import torch

from mmtrain.models.base import Condition, ModelFamily
from mmtrain.models.causalfusion import (CausalFusion, generate_caption_ids, sample_image_tokens, training_flops,
                                         training_inputs)
from mmtrain.models.config import ModelConfig
from mmtrain.models.document_layout import document_training_inputs
from mmtrain.models.document_sampling import continue_documents


class CausalFusionFamily(ModelFamily):
    """CausalFusion for the trainer, the samplers and eval: generates images and, in text mode, captions."""

    name = "causalfusion"
    model_class = CausalFusion
    token_proj_key, image_pos_key = "x_proj.weight", "pos_embed"
    captions = True
    documents = True

    def training_inputs(self, model: CausalFusion, latent_tokens: torch.Tensor, cond: Condition, diffusion,
                        gen: torch.Generator, rng: random.Random) -> dict:
        if cond.documents is not None:
            return document_training_inputs(model, latent_tokens, cond.documents, cond.pairs, diffusion, gen, rng)
        return training_inputs(model, latent_tokens, diffusion, gen, rng, **cond.as_kwargs())

    def training_flops(self, model: CausalFusion, batch_size: int, seq_len: int) -> float:
        return training_flops(model, batch_size, seq_len)

    def sample_image_tokens(self, model: CausalFusion, diffusion, cond: Condition, *, ar_steps: int,
                            generator: torch.Generator, **options) -> torch.Tensor:
        return sample_image_tokens(model, diffusion, ar_steps=ar_steps, generator=generator, **cond.as_kwargs(), **options)

    def caption_ids(self, model: CausalFusion, image_tokens: torch.Tensor, max_len: int, generator: torch.Generator,
                    top_p: float = 0.0) -> list[list[int]]:
        return generate_caption_ids(model, image_tokens, max_len, generator, top_p=top_p)

    def continue_documents(self, model: CausalFusion, diffusion, prompts: list, prompt_images: torch.Tensor, *,
                           generator: torch.Generator, limits, **options) -> tuple[list, torch.Tensor]:
        return continue_documents(model, diffusion, prompts, prompt_images, generator=generator, limits=limits, **options)

    def compile_warning(self, cfg: ModelConfig) -> str | None:
        if cfg.seq_buckets == 0:
            return ("train.compile with model.seq_buckets=0: every AR split is a new sequence length, so the blocks "
                    "recompile every few micro-batches; set model.seq_buckets (default 4)")
        return None


FAMILY = CausalFusionFamily()
