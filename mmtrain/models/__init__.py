"""Models. :data:`FAMILIES` maps each ``model.family`` name to its :class:`~mmtrain.models.base.ModelFamily`
(build, training inputs, FLOPs, sampling, captioning, state-dict layout), which the trainer,
the samplers and eval call through :func:`family`; :func:`build_model` turns a run config
plus its tokenizers into a model of that family."""
from __future__ import annotations

from mmtrain.models import causalfusion_family, transdiff
from mmtrain.models.base import Condition, ModelFamily
from mmtrain.models.causalfusion import CausalFusion
from mmtrain.models.config import FAMILIES as FAMILY_NAMES
from mmtrain.models.config import ModelConfig
from mmtrain.models.transdiff import TransDiff

__all__ = ["FAMILIES", "Condition", "Model", "ModelFamily", "build_model", "captioning_families", "document_families", "family",
           "model_class"]

Model = CausalFusion | TransDiff
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (causalfusion_family.FAMILY, transdiff.FAMILY)}
if tuple(FAMILIES) != FAMILY_NAMES:  # every name model.family accepts has an implementation, and no other
    raise ImportError(f"model families {tuple(FAMILIES)} != the names model.family accepts {FAMILY_NAMES}")


def family(model_or_cfg: Model | ModelConfig) -> ModelFamily:
    cfg = model_or_cfg if isinstance(model_or_cfg, ModelConfig) else model_or_cfg.cfg
    return FAMILIES[cfg.family]


def model_class(model_cfg: ModelConfig) -> type:
    return family(model_cfg).model_class


def document_families() -> list[str]:
    """The ``model.family`` names whose models train on and continue documents."""
    return [name for name, f in FAMILIES.items() if f.documents]


def captioning_families() -> list[str]:
    """The ``model.family`` names whose models write captions."""
    return [name for name, f in FAMILIES.items() if f.captions]


def build_model(model_cfg: ModelConfig, image_size: int, text_tok, image_tok) -> Model:
    """``text_tok`` may be None in class mode."""
    if image_size % image_tok.downsample:
        raise ValueError(f"data.image_size {image_size} is not divisible by the image tokenizer's downsample {image_tok.downsample}")
    latent_size = image_size // image_tok.downsample
    fam = family(model_cfg)
    if model_cfg.condition == "class":
        return fam.build(model_cfg, latent_channels=image_tok.latent_channels, latent_size=latent_size)
    special = {"pad": text_tok.pad_id, "bos": text_tok.bos_id, "eos": text_tok.eos_id, "boi": text_tok.boi_id, "eoi": text_tok.eoi_id}
    return fam.build(model_cfg, latent_channels=image_tok.latent_channels, latent_size=latent_size,
                     vocab_size=text_tok.vocab_size, special_ids=special)
