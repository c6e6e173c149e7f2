"""Official CausalFusion checkpoints -> mmtrain.

The official ``CausalDiffusionModel`` (causalfusion/causalfusion) and mmtrain's
:class:`~mmtrain.models.causalfusion.CausalFusion` in class mode share their blocks
and most parameter names; three keys are renamed. Shapes (width, depth, heads,
condition tokens, classes, latent grid) are read off the weights, so one function
covers L, XL, H and any custom size.
"""
from __future__ import annotations

import pickle
from dataclasses import asdict
from pathlib import Path

import torch

from mmtrain.models.causalfusion import ModelConfig

RENAMES = {
    "final_layer.0.": "final_norm.",
    "final_layer.1.": "diffusion_head.",
    "y_embedder.embedding_table.": "class_embed.",
}


class CheckpointFormatError(ValueError):
    """The file is not an official CausalFusion checkpoint."""


def read_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of an official checkpoint: a plain state_dict, or the training
    dict, whose ``ema`` weights are taken (as the official sampler does), else ``model``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        obj = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # the official training dict also pickles its argparse Namespace
            obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "ema" in obj:
        obj = obj["ema"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or "x_proj.weight" not in {k.removeprefix("module.") for k in obj}:
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointFormatError(f"{path}: expected an official CausalFusion state_dict (key 'x_proj.weight', "
                                    f"optionally under 'ema' or 'model'); found {keys}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def official_model_config(state: dict[str, torch.Tensor], patch_size: int = 1, trainable_pos: bool = True) -> tuple[ModelConfig, int, int]:
    """(ModelConfig, latent_channels, latent_size) of an official state_dict.

    ``patch_size`` cannot be told apart from the latent channels by the weights alone
    (x_proj reads p*p*C values); the released models use 1.
    """
    D, token_dim = state["x_proj.weight"].shape
    if token_dim % (patch_size**2):
        raise CheckpointFormatError(f"x_proj reads {token_dim} values per token, not a multiple of patch_size^2 = {patch_size**2}")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
    num_patches = state["pos_embed"].shape[1]
    grid = round(num_patches**0.5)
    if grid * grid != num_patches:
        raise CheckpointFormatError(f"pos_embed has {num_patches} positions, not a square grid")
    cfg = ModelConfig(
        hidden_size=D, depth=depth, num_heads=D // head_dim,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / D, patch_size=patch_size, condition="class",
        num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
        num_cond_tokens=state["cond_pos_embed"].shape[1], trainable_pos=trainable_pos,
    )
    return cfg, token_dim // patch_size**2, grid * patch_size


def convert_official_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official keys to mmtrain's; every other key is already the same."""
    out = {}
    for key, value in state.items():
        for old, new in RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def convert_causalfusion_official(in_path: str | Path, out_dir: str | Path, patch_size: int = 1,
                                  image_downsample: int = 16, image_tokenizer: str = "mar_kl16",
                                  scale_factor: float = 0.2325) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.yaml`` (a full mmtrain config).

    The result loads with :func:`mmtrain.inference.load_run` for sampling and as
    ``train.init_from`` for fine-tuning. The defaults describe the released ImageNet
    models: MAR's KL-16 VAE (16x downsampling) with latents scaled by 0.2325.
    """
    from safetensors.torch import save_file

    from mmtrain.config import Config, save_config
    from mmtrain.models.causalfusion import CausalFusion

    state = read_official_checkpoint(in_path)
    model_cfg, channels, latent_size = official_model_config(state, patch_size)
    model = CausalFusion(model_cfg, latent_channels=channels, latent_size=latent_size)
    converted = convert_official_state(state)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise CheckpointFormatError(f"{in_path}: keys do not map onto mmtrain's model; missing {missing}, unexpected {unexpected}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = Config()
    cfg.model = model_cfg
    cfg.data.image_size = latent_size * image_downsample
    cfg.tokenizer.image.kind = image_tokenizer
    cfg.tokenizer.image.scale_factor = scale_factor
    cfg.train.run_dir = str(out_dir)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = out_dir / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"source": str(in_path), "converted_from": "causalfusion-official",
                                           "model_config": str(asdict(model_cfg))})
    tmp.replace(out_dir / "model.safetensors")
    save_config(cfg, out_dir / "config.yaml")
    return out_dir
