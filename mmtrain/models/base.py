"""What every model family shares: the image token grid and the text tokenizer's ids
(:class:`ImageTokenModel`), the condition a batch carries (:class:`Condition`), and the
interface through which the trainer, the samplers and eval use a family
(:class:`ModelFamily`). A new family subclasses both and is named in
:data:`mmtrain.models.FAMILIES`; nothing outside ``mmtrain/models`` names a family."""
from __future__ import annotations

import contextlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
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
                with gathered([m.weight, m.bias]):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)


def gathered(params: list):
    """The full tensors of ZeRO-3 partitioned parameters while inside, written back from rank 0 on
    exit (a model built under ``deepspeed.zero.Init``: a few at a time, never the whole model);
    a no-op for plain parameters. Every rank draws the same initial values (one seed), so rank 0's
    are everyone's."""
    params = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@dataclass(frozen=True)
class Condition:
    """The condition of a batch of B images: prompts (``text`` B, T ids and ``text_len`` B,
    text mode) or ``labels`` (B, class mode); or a batch of B documents (``documents``, each
    image a row of the batch's M images, and ``pairs``: see
    :class:`mmtrain.components.data.Batch`). The other fields stay None."""

    text: torch.Tensor | None = None
    text_len: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    documents: list | None = None
    pairs: list | None = None

    def as_kwargs(self) -> dict:
        return {"text": self.text, "text_len": self.text_len, "labels": self.labels}


class ModelFamily(ABC):
    """One model architecture as the trainer, the samplers and eval see it.

    The state-dict layout: ``token_proj_key`` is the weight whose dim 1 is the token dim P
    (= patch_size^2 x latent channels) and ``image_pos_key`` the embedding whose dim 1 is the
    image token count L, so a model is rebuilt from its weights alone when its image
    tokenizer is not available (:meth:`latent_geometry`)."""

    name: ClassVar[str]
    model_class: ClassVar[type[ImageTokenModel]]
    token_proj_key: ClassVar[str]
    image_pos_key: ClassVar[str]
    captions: ClassVar[bool] = False  # whether :meth:`caption_ids` writes text (image -> text)
    documents: ClassVar[bool] = False  # whether it trains on and continues documents (:meth:`continue_documents`)

    def build(self, cfg: ModelConfig, latent_channels: int, latent_size: int, vocab_size: int = 0,
              special_ids: dict | None = None) -> ImageTokenModel:
        return self.model_class(cfg, latent_channels=latent_channels, latent_size=latent_size, vocab_size=vocab_size,
                                special_ids=special_ids)

    def latent_geometry(self, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(latent channels, latent size) of the model whose weights are ``state``."""
        P, L = state[self.token_proj_key].shape[1], state[self.image_pos_key].shape[1]
        return P // cfg.patch_size**2, round(L**0.5) * cfg.patch_size

    @abstractmethod
    def training_inputs(self, model, latent_tokens: torch.Tensor, cond: Condition, diffusion, gen: torch.Generator,
                        rng: random.Random) -> dict:
        """The forward's keyword arguments for one micro-batch: ``latent_tokens`` (B, L, P, raster
        order, on the model's device), ``cond`` as the loader gives it (host tensors); every
        random draw from ``rng`` (host) and ``gen`` (on its device)."""

    @abstractmethod
    def training_flops(self, model, batch_size: int, seq_len: int) -> float:
        """Model FLOPs of one forward + backward of ``batch_size`` sequences (the MFU numerator)."""

    @abstractmethod
    def sample_image_tokens(self, model, diffusion, cond: Condition, *, ar_steps: int, generator: torch.Generator,
                            **options) -> torch.Tensor:
        """Condition -> image tokens (B, L, P, raster order). ``options``: the sampler's CFG,
        ``clip_x0``, ``flow_options`` and, where the family can edit, ``known_tokens`` / ``known_mask``."""

    def caption_ids(self, model, image_tokens: torch.Tensor, max_len: int, generator: torch.Generator,
                    top_p: float = 0.0) -> list[list[int]]:
        """Image tokens (B, L, P) -> caption ids; only for families with ``captions``."""
        raise ValueError(f"model.family={self.name} only generates images: it has no caption decoder")

    def continue_documents(self, model, diffusion, prompts: list, prompt_images: torch.Tensor, *, generator: torch.Generator,
                           limits, **options) -> tuple[list, torch.Tensor]:
        """Interleaved generation: continue documents with text and images (only for families with
        ``documents``; see :mod:`mmtrain.models.document_sampling`)."""
        raise ValueError(f"model.family={self.name} does not read or write documents")

    def compile_warning(self, cfg: ModelConfig) -> str | None:
        """Why ``train.compile`` would recompile often with ``cfg``, if it would."""
        return None
