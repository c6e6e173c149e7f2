"""Models. :func:`build_model` turns a run config plus its tokenizers into a model of
``model.family``; :func:`family` gives that family's module, whose ``training_inputs``,
``training_flops`` and ``sample_image_tokens`` the trainer and the samplers call."""
from __future__ import annotations

from types import ModuleType

from mmtrain.models import causalfusion, transdiff
from mmtrain.models.causalfusion import CausalFusion
from mmtrain.models.config import ModelConfig
from mmtrain.models.transdiff import TransDiff

Model = CausalFusion | TransDiff
_FAMILIES = {"causalfusion": (causalfusion, CausalFusion), "transdiff": (transdiff, TransDiff)}


def family(model_or_cfg: Model | ModelConfig) -> ModuleType:
    cfg = model_or_cfg if isinstance(model_or_cfg, ModelConfig) else model_or_cfg.cfg
    return _FAMILIES[cfg.family][0]


def model_class(model_cfg: ModelConfig) -> type:
    return _FAMILIES[model_cfg.family][1]


def build_model(model_cfg: ModelConfig, image_size: int, text_tok, image_tok) -> Model:
    """``text_tok`` may be None in class mode."""
    if image_size % image_tok.downsample:
        raise ValueError(f"data.image_size {image_size} is not divisible by the image tokenizer's downsample {image_tok.downsample}")
    latent_size = image_size // image_tok.downsample
    cls = model_class(model_cfg)
    if model_cfg.condition == "class":
        return cls(model_cfg, latent_channels=image_tok.latent_channels, latent_size=latent_size)
    special = {"pad": text_tok.pad_id, "bos": text_tok.bos_id, "eos": text_tok.eos_id, "boi": text_tok.boi_id, "eoi": text_tok.eoi_id}
    return cls(model_cfg, latent_channels=image_tok.latent_channels, latent_size=latent_size,
               vocab_size=text_tok.vocab_size, special_ids=special)
