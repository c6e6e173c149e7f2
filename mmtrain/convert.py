"""Official CausalFusion and TransDiff checkpoints -> mmtrain model directories.

CausalFusion: the official ``CausalDiffusionModel`` (causalfusion/causalfusion) and
mmtrain's :class:`~mmtrain.models.causalfusion.CausalFusion` in class mode share their
blocks and most parameter names; three keys are renamed.

TransDiff: the official ``Transdiff`` (TransDiff/TransDiff; HF ``zhendch/Transdiff``)
and :class:`~mmtrain.models.transdiff.TransDiff` share their names but for the decoder
prefix (``diffdecoder.net.`` -> ``decoder.``); the 1-step model's single ``mask_token``
becomes one learned query per slot, its unused ``z_proj`` is dropped, and an MRAR
model's ``z_proj`` columns are reordered from (channel, row, col) to mmtrain's patch
order (row, col, channel).

Shapes (width, depth, condition tokens, classes, latent grid) are read off the weights,
so one function per family covers every released size.
"""
from __future__ import annotations

import pickle
from dataclasses import asdict
from pathlib import Path

import torch

from mmtrain.models.config import ModelConfig

RENAMES = {
    "final_layer.0.": "final_norm.",
    "final_layer.1.": "diffusion_head.",
    "y_embedder.embedding_table.": "class_embed.",
}


class CheckpointFormatError(ValueError):
    """The file is not an official CausalFusion checkpoint."""


def read_official_checkpoint(path: str | Path, marker: str = "x_proj.weight", what: str = "CausalFusion") -> dict[str, torch.Tensor]:
    """The model weights of an official checkpoint: a plain state_dict, or the training
    dict, whose EMA weights are taken (``ema`` / ``model_ema``, as the official samplers
    do), else ``model``. Keys may carry a ``module.`` or ``model.`` prefix; ``marker`` is a
    key every such state_dict has."""
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
    for name in ("ema", "model_ema", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(name), dict) and obj[name]:
            obj = obj[name]
            break
    prefix = next((p for p in ("", "module.", "model.") if isinstance(obj, dict) and p + marker in obj), None)
    if prefix is None:
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointFormatError(f"{path}: expected an official {what} state_dict (key {marker!r}, optionally under "
                                    f"'ema', 'model_ema' or 'model'); found {keys}")
    return {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}


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
    from mmtrain.config import Config
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
    return _write_model_dir(model, cfg, out_dir, in_path, "causalfusion-official")


def _write_model_dir(model: torch.nn.Module, cfg, out_dir: Path, in_path, source: str) -> Path:
    from safetensors.torch import save_file

    from mmtrain.config import save_config

    from mmtrain.export import unshared

    tensors = unshared(model.state_dict())
    tmp = out_dir / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"source": str(in_path), "converted_from": source,
                                           "model_config": str(asdict(cfg.model))})
    tmp.replace(out_dir / "model.safetensors")
    save_config(cfg, out_dir / "config.yaml")
    return out_dir


# --------------------------------------------------------------------------- Hugging Face LLaMA family


def convert_hf_llm(llm_dir: str | Path, out_dir: str | Path, cfg) -> tuple[Path, dict]:
    """A local Hugging Face LLaMA / Mistral / Qwen2 / Qwen3 checkpoint -> an mmtrain model directory:
    CausalFusion on the LLaMA backbone (``cfg``: a full :class:`mmtrain.config.Config` for the image
    side, e.g. ``configs/captions256.yaml``; its model architecture becomes the checkpoint's) with the
    language model's weights, new image weights, and the tokenizer (``tokenizer/text_hf``, ``<boi>``/
    ``<eoi>`` added where the vocabulary has none, their rows the mean row). Train from it with
    ``train.init_from=OUT`` and ``tokenizer.text_model=OUT/tokenizer/text_hf`` (its config.yaml has both's
    architecture and tokenizer); sample and evaluate it as a model directory. Returns the directory and
    what :func:`~mmtrain.models.pretrained.load_hf_weights` did."""
    import dataclasses

    from mmtrain.models import build_model
    from mmtrain.models.pretrained import load_hf_weights, model_config_from_hf
    from mmtrain.tokenize.build import build_image_tokenizer
    from mmtrain.tokenize.hf_text import HFTextTokenizer
    from mmtrain.tokenize.run_text import copy_run_tokenizer

    text_tok = HFTextTokenizer(llm_dir)
    cfg = dataclasses.replace(cfg, model=model_config_from_hf(cfg.model, llm_dir))
    model = build_model(cfg.model, cfg.data.image_size, text_tok, build_image_tokenizer(cfg.tokenizer.image))
    done = load_hf_weights(model, llm_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_path = copy_run_tokenizer(text_tok, out_dir / "tokenizer")
    cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, text_model=str(tok_path.resolve())),
                              train=dataclasses.replace(cfg.train, run_dir=str(out_dir), init_from=""))
    _write_model_dir(model, cfg, out_dir, llm_dir, f"hf-{cfg.model.llama.model_type}")
    return out_dir, done


# --------------------------------------------------------------------------- TransDiff

# width -> heads of the released sizes (B, L, H); the weights do not show the head count
TRANSDIFF_HEADS = {768: 12, 1024: 16, 1280: 16}


def transdiff_model_config(state: dict[str, torch.Tensor], num_heads: int = 0, buffer_size: int = 64,
                           patch_size: int = 1) -> tuple[ModelConfig, int, int]:
    """(ModelConfig, latent_channels, latent_size) of an official TransDiff state_dict.

    ``num_heads``: 0 = the released sizes' (width 768 -> 12, 1024 and 1280 -> 16).
    ``buffer_size``: the class buffer; read off a 1-step model, taken as given for MRAR.
    """
    from mmtrain.models.config import TransDiffConfig

    D = state["class_emb.weight"].shape[1]
    heads = num_heads or TRANSDIFF_HEADS.get(D, 0)
    if not heads:
        raise CheckpointFormatError(f"encoder width {D} is not a released TransDiff size; pass num_heads (--num-heads)")
    W, token_dim = state["diffdecoder.net.input_proj.weight"].shape
    if token_dim % patch_size**2:
        raise CheckpointFormatError(f"input_proj reads {token_dim} values per token, not a multiple of patch_size^2 = {patch_size**2}")
    L = state["diffdecoder.net.diffusion_pos_embed_learned"].shape[1]
    grid = round(L**0.5)
    if grid * grid != L:
        raise CheckpointFormatError(f"diffdecoder.net.diffusion_pos_embed_learned has {L} positions, not a square grid")
    queries = state["mask_token"].shape[1]
    n_enc = state["encoder_pos_embed_learned"].shape[1]
    td = dict(decoder_depth=_count(state, "diffdecoder.net.res_blocks."), decoder_hidden_size=W,
              decoder_heads=heads)
    if queries == 1:  # the 1-step model: one mask token broadcast over the image slots after the buffer
        buffer_size = n_enc - state["diffusion_pos_embed_learned"].shape[1]
        td.update(buffer_size=buffer_size, num_queries=n_enc - buffer_size)
    else:  # MRAR: [buffer | queries | K references] with references as long as the query block
        ref_in = state["z_proj.weight"].shape[1]
        ref_patch = round((ref_in // token_dim) ** 0.5)
        refs, rest = divmod(n_enc - buffer_size - queries, queries)
        if rest or ref_patch**2 * token_dim != ref_in:
            raise CheckpointFormatError(f"MRAR layout: {n_enc} encoder positions do not split into buffer {buffer_size} + "
                                        f"{queries} queries + references of {queries}; pass the right buffer_size")
        td.update(buffer_size=buffer_size, num_queries=queries, mrar_refs=refs, ref_patch=ref_patch, condition_sees_query=False)
    cfg = ModelConfig(hidden_size=D, depth=_count(state, "encoder_blocks."), num_heads=heads,
                      mlp_ratio=state["encoder_blocks.0.mlp.fc1.weight"].shape[0] / D, patch_size=patch_size,
                      condition="class", num_classes=state["class_emb.weight"].shape[0], family="transdiff",
                      transdiff=TransDiffConfig(**td))
    return cfg, token_dim // patch_size**2, grid * patch_size


def _count(state: dict, prefix: str) -> int:
    return 1 + max(int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix))


def convert_transdiff_state(state: dict[str, torch.Tensor], model_cfg: ModelConfig, latent_channels: int) -> dict[str, torch.Tensor]:
    """Official TransDiff keys and layouts -> :class:`~mmtrain.models.transdiff.TransDiff`'s."""
    td = model_cfg.transdiff
    out = {}
    for key, value in state.items():
        if key.startswith("z_proj.") and not td.mrar_refs:
            continue  # the 1-step model overwrites z_proj's output: dead weights
        if key == "mask_token" and value.shape[1] == 1:
            value = value.expand(1, td.num_queries, -1).clone()
        if key == "z_proj.weight":  # columns (c, row, col) -> (row, col, c)
            r, C = td.ref_patch, latent_channels * model_cfg.patch_size**2
            value = value.view(-1, C, r, r).permute(0, 2, 3, 1).reshape(value.shape[0], -1)
        out[key.replace("diffdecoder.net.", "decoder.", 1)] = value
    return out


def convert_transdiff_official(in_path: str | Path, out_dir: str | Path, num_heads: int = 0, buffer_size: int = 64,
                               image_downsample: int = 16, image_tokenizer: str = "mar_kl16",
                               scale_factor: float = 0.2325) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.yaml`` for an official
    TransDiff checkpoint (``checkpoint-last.pth`` of ``zhendch/Transdiff``: ``{'model': ...}``).

    The config samples as the paper does: Euler-Maruyama, 100 steps, CFG 1.3, with the
    flow decoder; the latents are MAR's KL-16 VAE scaled by 0.2325.
    """
    from mmtrain.config import Config
    from mmtrain.models.diffusion import DiffusionConfig
    from mmtrain.models.transdiff import TransDiff

    state = read_official_checkpoint(in_path, marker="class_emb.weight", what="TransDiff")
    model_cfg, channels, latent_size = transdiff_model_config(state, num_heads, buffer_size)
    model = TransDiff(model_cfg, latent_channels=channels, latent_size=latent_size)
    missing, unexpected = model.load_state_dict(convert_transdiff_state(state, model_cfg, channels), strict=False)
    if missing or unexpected:
        raise CheckpointFormatError(f"{in_path}: keys do not map onto mmtrain's TransDiff; missing {missing}, unexpected {unexpected}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = Config(model=model_cfg, diffusion=DiffusionConfig(process="rectified_flow"))
    cfg.data.image_size = latent_size * image_downsample
    cfg.tokenizer.image.kind = image_tokenizer
    cfg.tokenizer.image.scale_factor = scale_factor
    cfg.train.run_dir = str(out_dir)
    cfg.sample.flow_sampler, cfg.sample.diffusion_steps, cfg.sample.cfg_scale = "euler_maruyama", 100, 1.3
    cfg.sample.ar_steps, cfg.sample.clip_x0 = model_cfg.transdiff.mrar_refs + 1, 0.0
    return _write_model_dir(model, cfg, out_dir, in_path, "transdiff-official")
