"""Convert original LDM / MAR KL-VAE checkpoints to diffusers ``AutoencoderKL``.

The KL-VAEs of latent diffusion (CompVis LDM, Stable Diffusion) and of MAR
(``LTH14/mar``, ``models/vae.py``) share one architecture and one key layout:

    encoder.conv_in, encoder.down.{i}.block.{j}, encoder.down.{i}.attn.{j},
    encoder.down.{i}.downsample.conv, encoder.mid.{block_1,attn_1,block_2},
    encoder.norm_out, encoder.conv_out, (decoder.* likewise with up.{i} and
    upsample.conv), quant_conv, post_quant_conv

diffusers' ``AutoencoderKL`` computes the same function (GroupNorm(32,
eps=1e-6), SiLU, single-head attention scaled by C**-0.5, stride-2 3x3
downsampling after an explicit (0, 1, 0, 1) zero pad, nearest x2 upsampling
then a 3x3 conv, logvar clamped to [-30, 20]) with different names:

* ``down.{i}.block`` -> ``down_blocks.{i}.resnets``; ``nin_shortcut`` -> ``conv_shortcut``
* attention 1x1 convs ``q/k/v/proj_out`` -> linear ``to_q/to_k/to_v/to_out.0``, ``norm`` -> ``group_norm``
* ``mid.block_1/attn_1/block_2`` -> ``mid_block.resnets.0/attentions.0/resnets.1``
* ``norm_out`` -> ``conv_norm_out``
* decoder ``up.{i}`` -> ``up_blocks.{n-1-i}``: LDM indexes up levels by
  resolution (0 = full size), diffusers by execution order (0 = smallest).

Usage (original checkpoint -> diffusers folder, loadable by ``kind: mar_kl16``)::

    mmtrain convert vae kl16.ckpt vae_mar_kl16 --arch mar_kl16
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# LDM hard-codes GroupNorm(32 groups); diffusers makes it a config value.
LDM_NORM_GROUPS = 32

# MAR's KL-16 tokenizer (LTH14/mar models/vae.py defaults; f16, 16 channels).
# MAR multiplies latents by 0.2325 so that they have about unit std.
MAR_KL16: dict[str, Any] = {
    "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "embed_dim": 16, "num_res_blocks": 2,
    "encoder_attn_resolutions": [16], "decoder_attn_resolutions": [], "resolution": 256,
}
MAR_KL16_SCALE = 0.2325

# Stable Diffusion 1.x/2.x VAE (f8, 4 channels; kl-f8 in LDM). Its diffusers
# config is down/up blocks without attention, block_out_channels
# [128, 256, 512, 512], layers_per_block 2, latent_channels 4.
SD_VAE: dict[str, Any] = {
    "ch": 128, "ch_mult": [1, 2, 4, 4], "embed_dim": 4, "num_res_blocks": 2,
    "encoder_attn_resolutions": [], "decoder_attn_resolutions": [], "resolution": 256,
}
SD_VAE_SCALE = 0.18215

KNOWN_ARCHES: dict[str, dict[str, Any]] = {"mar_kl16": MAR_KL16, "sd_vae": SD_VAE}


class VAEConversionError(ValueError):
    """A checkpoint or architecture that this converter cannot map to diffusers."""


# ------------------------------------------------------------------ config
def ldm_vae_config(
    ch: int,
    ch_mult: Sequence[int],
    embed_dim: int,
    num_res_blocks: int,
    encoder_attn_resolutions: Sequence[int] = (),
    decoder_attn_resolutions: Sequence[int] = (),
    resolution: int = 256,
    z_channels: int | None = None,
    in_channels: int = 3,
    out_channels: int = 3,
) -> dict[str, Any]:
    """LDM/MAR ``Encoder``/``Decoder`` arguments -> diffusers ``AutoencoderKL`` kwargs.

    Args:
        ch: Base width; level i has ``ch * ch_mult[i]`` channels.
        ch_mult: Width multipliers, one per resolution level.
        embed_dim: Latent channels (``quant_conv`` output / 2).
        num_res_blocks: ResNet blocks per encoder level (decoder levels have one more).
        encoder_attn_resolutions: Feature-map sizes (at input size ``resolution``)
            whose encoder level gets an attention block after each ResNet block.
            Default () (none).
        decoder_attn_resolutions: Same for decoder levels; must select no level
            (see below). Default ().
        resolution: The ``resolution`` constructor argument. It only decides
            which level an attention resolution names; the model runs at any
            size divisible by the downsample factor. Default 256.
        z_channels: Encoder output channels; default None = ``embed_dim``.
            diffusers has a single ``latent_channels`` for both.
        in_channels / out_channels: Image channels. Default 3 / 3.

    Raises:
        VAEConversionError: for layouts diffusers' ``AutoencoderKL`` cannot
            express or this converter has not verified: attention in decoder up
            levels, attention resolutions that match no level, ``z_channels !=
            embed_dim``, widths not divisible by the 32 norm groups.
    """
    ch_mult = [int(m) for m in ch_mult]
    if not ch_mult:
        raise VAEConversionError("ldm_vae_config: ch_mult is empty")
    if z_channels is not None and z_channels != embed_dim:
        raise VAEConversionError(
            f"ldm_vae_config: z_channels={z_channels} differs from embed_dim={embed_dim}; diffusers AutoencoderKL "
            "uses latent_channels for both the encoder output and quant_conv"
        )
    widths = [ch * m for m in ch_mult]
    bad = [w for w in widths if w % LDM_NORM_GROUPS]
    if bad:
        raise VAEConversionError(
            f"ldm_vae_config: level widths {widths} must all be divisible by the {LDM_NORM_GROUPS} GroupNorm groups "
            f"that LDM hard-codes; {bad} are not"
        )
    level_res = [resolution // 2**i for i in range(len(ch_mult))]
    for name, res in (("encoder_attn_resolutions", encoder_attn_resolutions),
                      ("decoder_attn_resolutions", decoder_attn_resolutions)):
        stray = sorted({int(r) for r in res} - set(level_res))
        if stray:
            # LDM silently builds no attention for these; that is almost always a
            # mistyped config, and converting it would hide the mistake.
            raise VAEConversionError(
                f"ldm_vae_config: {name} {stray} match no level (level sizes at resolution {resolution}: {level_res})"
            )
    if decoder_attn_resolutions:
        # diffusers has AttnUpDecoderBlock2D, but no released LDM/MAR VAE uses
        # decoder level attention and we have no parity fixture for it, so we
        # refuse rather than ship an unverified mapping.
        raise VAEConversionError(
            f"ldm_vae_config: decoder_attn_resolutions={list(decoder_attn_resolutions)} puts attention in decoder up "
            "levels; only the decoder mid-block attention is supported"
        )
    enc_attn = {int(r) for r in encoder_attn_resolutions}
    down = ["AttnDownEncoderBlock2D" if r in enc_attn else "DownEncoderBlock2D" for r in level_res]
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": down,
        "up_block_types": ["UpDecoderBlock2D"] * len(ch_mult),
        "block_out_channels": widths,
        "layers_per_block": int(num_res_blocks),
        "act_fn": "silu",
        "latent_channels": int(embed_dim),
        "norm_num_groups": LDM_NORM_GROUPS,
        "sample_size": int(resolution),
    }


# ------------------------------------------------------------- state dicts
_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET_NAMES = {"norm1", "conv1", "norm2", "conv2", "nin_shortcut", "conv_shortcut"}
_MID = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}


def _resnet_leaf(rest: str) -> str | None:
    layer, _, param = rest.partition(".")
    if layer not in _RESNET_NAMES or param not in ("weight", "bias"):
        return None
    return f"{'conv_shortcut' if layer == 'nin_shortcut' else layer}.{param}"


def _attn_leaf(rest: str) -> str | None:
    layer, _, param = rest.partition(".")
    if layer not in _ATTN_NAMES or param not in ("weight", "bias"):
        return None
    return f"{_ATTN_NAMES[layer]}.{param}"


def _map_key(key: str, num_up_levels: int) -> tuple[str, bool] | None:
    """LDM key -> (diffusers key, is_attention_param) or None when unknown."""
    if key.split(".")[0] in ("quant_conv", "post_quant_conv") and key.count(".") == 1:
        return key, False
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)", key)
    if m:
        part, layer, param = m.groups()
        return f"{part}.{'conv_norm_out' if layer == 'norm_out' else layer}.{param}", False
    m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\.(.+)", key)
    if m:
        part, layer, rest = m.groups()
        leaf = _attn_leaf(rest) if layer == "attn_1" else _resnet_leaf(rest)
        return (f"{part}.mid_block.{_MID[layer]}.{leaf}", layer == "attn_1") if leaf else None
    m = re.fullmatch(r"(encoder\.down|decoder\.up)\.(\d+)\.(block|attn)\.(\d+)\.(.+)", key)
    if m:
        stem, i, kind, j, rest = m.groups()
        part, blocks, level = ("encoder", "down_blocks", int(i)) if stem == "encoder.down" else (
            "decoder", "up_blocks", num_up_levels - 1 - int(i))
        leaf = _attn_leaf(rest) if kind == "attn" else _resnet_leaf(rest)
        group = "attentions" if kind == "attn" else "resnets"
        return (f"{part}.{blocks}.{level}.{group}.{j}.{leaf}", kind == "attn") if leaf else None
    m = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", key)
    if m:
        return f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}", False
    m = re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)", key)
    if m:
        return f"decoder.up_blocks.{num_up_levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}", False
    return None


def convert_ldm_vae_state_dict(state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Rename LDM/MAR VAE keys to diffusers ``AutoencoderKL`` keys.

    ``state`` must hold only VAE keys (no ``model.``/``first_stage_model.``
    prefix; :func:`extract_vae_state` strips those). Attention 1x1 conv
    weights (C, C, 1, 1) become linear weights (C, C).

    Args:
        state: LDM-layout tensors.
        source: Named in error messages (e.g. the checkpoint path).

    Raises:
        VAEConversionError: listing every key that has no diffusers counterpart.
    """
    up_levels = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
    num_up = max(up_levels) + 1 if up_levels else 0
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        mapped = _map_key(key, num_up)
        if mapped is None:
            unknown.append(key)
            continue
        new_key, is_attn = mapped
        if is_attn and value.dim() == 4:
            if value.shape[2:] != (1, 1):
                raise VAEConversionError(f"{source}: attention weight {key} has shape {tuple(value.shape)}, expected 1x1 conv")
            value = value[:, :, 0, 0]
        out[new_key] = value
    if unknown:
        shown = ", ".join(unknown[:12]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 12 else "")
        raise VAEConversionError(f"{source}: keys with no diffusers AutoencoderKL counterpart (not an LDM/MAR KL-VAE layout?): {shown}")
    return out


# Prefixes under which full training checkpoints keep the VAE: LDM/SD keep it
# as first_stage_model.*, our golden fixture and some MAR exports as model.*.
_VAE_PREFIXES = ("first_stage_model.", "model.", "vae.")
# Training-only state stored next to the VAE in LDM autoencoder checkpoints
# (the discriminator/LPIPS loss, EMA copies); not part of the model.
_IGNORED_PREFIXES = ("loss.", "model_ema.")


def extract_vae_state(obj: Any, source: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Pull the VAE tensors out of a loaded checkpoint object.

    Unwraps a ``"model"`` or ``"state_dict"`` entry (MAR saves ``{"model": sd}``,
    Lightning ``{"state_dict": sd}``), then strips the first prefix in
    ``first_stage_model.``, ``model.``, ``vae.`` under which ``encoder.*`` keys
    live (dropping keys outside it), and drops ``loss.*``/``model_ema.*``.
    """
    if not isinstance(obj, Mapping):
        raise VAEConversionError(f"{source}: expected a mapping of tensors, got {type(obj).__name__}")
    for wrapper in ("model", "state_dict"):
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    keys = list(obj)
    if not any(k.startswith("encoder.") for k in keys):
        for prefix in _VAE_PREFIXES:
            if any(k.startswith(prefix + "encoder.") for k in keys):
                obj = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
                break
        else:
            raise VAEConversionError(
                f"{source}: no 'encoder.*' keys found (also tried prefixes {list(_VAE_PREFIXES)}); "
                f"first keys: {keys[:8]}"
            )
    return {k: v for k, v in obj.items() if not k.startswith(_IGNORED_PREFIXES) and isinstance(v, torch.Tensor)}


# -------------------------------------------------------------- load / save
def _read_checkpoint(path: Path, trust_pickle: bool) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        # weights_only: a checkpoint is data; never run code from it unless asked.
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError variants
        if trust_pickle:
            raise
        raise VAEConversionError(
            f"{path}: could not load with torch.load(weights_only=True) ({type(exc).__name__}: {exc}); if you trust "
            "the file, load it with load_ldm_vae(..., trust_pickle=True)"
        ) from exc


def build_vae(kwargs: Mapping[str, Any]):
    """diffusers ``AutoencoderKL(**kwargs)`` (random init), in eval mode."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**kwargs).eval()


def load_converted(vae, converted: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load that names missing/unexpected/mis-shaped keys and ``source``."""
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(converted)) if converted[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        def show(xs: list[str]) -> str:
            return "; ".join(xs[:8]) + (f"; ... ({len(xs)} in all)" if len(xs) > 8 else "") if xs else "none"
        raise VAEConversionError(
            f"{source}: checkpoint does not fit the configured AutoencoderKL (wrong arch/config?). "
            f"missing: {show(missing)}. unexpected: {show(unexpected)}. shape mismatches: {show(shapes)}"
        )
    vae.load_state_dict(converted, strict=True)


def load_ldm_vae(path: str | Path, config: Mapping[str, Any], trust_pickle: bool = False):
    """Build a diffusers ``AutoencoderKL`` from an original LDM/MAR checkpoint file.

    Args:
        path: ``.safetensors``, or ``.ckpt``/``.pt``/``.pth`` (optionally wrapped
            in ``"model"``/``"state_dict"``, keys optionally prefixed, see
            :func:`extract_vae_state`).
        config: :func:`ldm_vae_config` arguments, e.g. :data:`MAR_KL16`.
        trust_pickle: Allow arbitrary pickled objects in a torch checkpoint.
            Default False (``weights_only=True``).

    Returns the model in eval mode, float32.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_ldm_vae: checkpoint file {path} does not exist")
    state = extract_vae_state(_read_checkpoint(path, trust_pickle), str(path))
    converted = convert_ldm_vae_state_dict(state, str(path))
    vae = build_vae(ldm_vae_config(**config))
    load_converted(vae, {k: v.float() for k, v in converted.items()}, str(path))
    return vae


def save_diffusers(vae, out_dir: str | Path) -> Path:
    """Write ``vae`` as a diffusers folder (config.json + safetensors weights)."""
    out_dir = Path(out_dir)
    vae.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
