"""Hugging Face LLaMA-family checkpoints <-> CausalFusion on the LLaMA backbone (``model.backbone=llama``).

In: :func:`model_config_from_hf` reads a local checkpoint's ``config.json`` into the ``model``
section (width, depth, heads, ``model.llama``); :func:`load_hf_weights` fills a built model from
its safetensors, one tensor at a time. The names map one to one (:func:`hf_to_model_key`):
``model.embed_tokens`` -> ``tok_embed``, ``model.layers.N`` -> ``blocks.N``, ``model.norm`` ->
``final_norm``, ``lm_head`` -> ``lm_head``. Rows the tokenizer added (``<boi>``, ``<eoi>``) start
at the mean row; in ``frozen_text`` each block's image copy starts as the loaded block. The
image-side weights (input projection, timestep embedding, 2-D positions, diffusion head) are
the model's own new ones.

Under ZeRO-3 the model is built partitioned (``deepspeed.zero.Init``: no rank ever holds all
of it) and each parameter is gathered alone, filled by rank 0 from the checkpoint, and
partitioned again as the next one is read: the most a rank holds at once is one full
parameter (:func:`load_hf_weights` reports the largest).

Out: :func:`export_hf` writes the language part of a trained model (text embedding with the
added rows, the blocks' text weights, final norm, LM head) as a checkpoint transformers'
``AutoModelForCausalLM`` loads, with its tokenizer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from mmtrain.models.config import ModelConfig
from mmtrain.models.llama import DecoderSpec, _local_dir, safetensors_files

log = logging.getLogger("mmtrain.pretrained")


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """A Hugging Face model directory (``config.json`` + safetensors), not an mmtrain model directory."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and not (p / "config.yaml").is_file()


def model_config_from_hf(model_cfg: ModelConfig, directory: str | os.PathLike) -> ModelConfig:
    """``model_cfg`` with the architecture of the checkpoint in ``directory``: ``backbone: llama``,
    width, depth, heads and ``model.llama`` from its ``config.json``; everything else (image
    patch, text budget, training mode ...) as given."""
    spec = DecoderSpec.from_directory(directory)
    return dataclasses.replace(model_cfg, backbone="llama", **spec.model_fields())


def hf_to_model_key(key: str) -> str | None:
    """A checkpoint key -> the CausalFusion parameter name (None: not a parameter)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    if key == "lm_head.weight":
        return key
    key = key.removeprefix("model.")
    if key.startswith("embed_tokens."):
        return "tok_embed." + key.removeprefix("embed_tokens.")
    if key.startswith("layers."):
        return "blocks." + key.removeprefix("layers.")
    if key.startswith("norm."):
        return "final_norm." + key.removeprefix("norm.")
    return key


def model_to_hf_key(name: str) -> str | None:
    """A CausalFusion parameter name -> the checkpoint key (None: an image-side weight, not exported)."""
    if name == "lm_head.weight":
        return name
    if name.startswith("tok_embed."):
        return "model.embed_tokens." + name.removeprefix("tok_embed.")
    if name.startswith("final_norm."):
        return "model.norm." + name.removeprefix("final_norm.")
    if name.startswith("blocks.") and ".image." not in name:
        return "model.layers." + name.removeprefix("blocks.")
    return None


def _gathered(param: torch.nn.Parameter):
    """The full tensor of a ZeRO-3 partitioned parameter, written back from rank 0 on exit; a no-op otherwise."""
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    return contextlib.nullcontext()


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, directory: str | os.PathLike, rank: int = 0) -> dict:
    """Fill ``model`` (CausalFusion, ``backbone: llama``, built from :func:`model_config_from_hf`'s
    config) from the checkpoint in ``directory``, one tensor at a time (ZeRO-3: gathered, filled
    by rank 0, partitioned again). Every checkpoint tensor must find its parameter and every
    pretrained parameter must be found (a tied LM head may be absent). Returns what it did:
    ``tensors`` read, ``largest_gathered`` (elements of the biggest full parameter held at once),
    ``model_elements`` (all parameters), ``added_rows``."""
    from safetensors import safe_open

    path = _local_dir(directory)  # (mmtrain.models.llama.checkpoint_tensors reads every rank's copy; here only rank 0 reads)
    params = dict(model.named_parameters(remove_duplicate=False))
    numel = {n: (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) for n, p in params.items()}
    wanted = model.pretrained_parameter_names()
    tied = model.lm_head.weight is model.tok_embed.weight
    seen, unexpected, largest, added = set(), [], 0, 0
    image_copy = {n for n in params if ".image." in n}
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                name = hf_to_model_key(key)
                if name is None:
                    continue
                if name not in params:
                    unexpected.append(key)
                    continue
                if name == "lm_head.weight" and tied:
                    continue  # the embedding's own tensor (some tied checkpoints still store it)
                p = params[name]
                shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
                tensor = f.get_tensor(key) if rank == 0 else None
                if rank == 0:
                    rows_ok = tensor.shape[1:] == shape[1:] and tensor.shape[0] <= shape[0] and name.endswith(
                        ("tok_embed.weight", "lm_head.weight"))
                    if tuple(tensor.shape) != shape and not rows_ok:
                        raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model expects {shape}")
                image_name = _image_copy_name(name)
                for target in [name] + ([image_name] if image_name in image_copy else []):
                    q = params[target]
                    with _gathered(q):
                        if rank == 0:
                            rows = tensor.shape[0]
                            q.data[:rows].copy_(tensor.to(q.dtype))
                            if rows < q.shape[0]:  # rows the tokenizer added: the mean row
                                q.data[rows:] = tensor.float().mean(0).to(q.dtype)
                                added = q.shape[0] - rows
                    largest = max(largest, numel[target])
                seen.add(name)
    if tied:
        seen.add("lm_head.weight")
    missing = sorted(wanted - seen)
    if missing or unexpected:
        raise ValueError(f"{path}: the checkpoint does not match model.backbone=llama with this config; missing "
                         f"{missing[:8]}, unexpected {sorted(unexpected)[:8]}")
    return {"tensors": len(seen), "largest_gathered": largest, "model_elements": sum(numel[n] for n in params
                                                                                      if params[n] is not model.lm_head.weight
                                                                                      or not tied),
            "added_rows": added}


def _image_copy_name(name: str) -> str:
    """``blocks.N.rest`` -> ``blocks.N.image.rest`` (a ``frozen_text`` block's image weights)."""
    parts = name.split(".")
    return ".".join(parts[:2] + ["image"] + parts[2:]) if parts[0] == "blocks" else ""


def language_state(model_state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """The language part of a CausalFusion state dict under the checkpoint's names."""
    out = {}
    for name, tensor in model_state.items():
        key = model_to_hf_key(name)
        if key is None or (tied and key == "lm_head.weight"):
            continue
        out[key] = tensor.detach().contiguous()
    return out


def export_hf(model_state: dict[str, torch.Tensor], model_cfg: ModelConfig, text_tok, out: str | os.PathLike) -> Path:
    """Write the language part of a LLaMA-backbone model (``model_state``: its full state dict) as a
    Hugging Face checkpoint in ``out``: ``config.json``, ``model.safetensors`` (float32), the tokenizer
    with ``<boi>``/``<eoi>`` (``text_tok``: the run's tokenizer). Written in a temp folder, then renamed."""
    import shutil

    from safetensors.torch import save_file

    if model_cfg.backbone != "llama":
        raise ValueError(f"export --hf writes a Hugging Face language model: it needs model.backbone=llama, this run has "
                         f"model.backbone={model_cfg.backbone}")
    vocab = model_state["tok_embed.weight"].shape[0]
    spec = DecoderSpec.from_model_config(model_cfg, vocab)
    config = spec.to_hf_config()
    config.update(bos_token_id=text_tok.bos_id, eos_token_id=text_tok.eos_id, pad_token_id=text_tok.pad_id,
                  max_position_embeddings=model_cfg.llama.max_position_embeddings, torch_dtype="float32")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.float() for k, v in language_state(model_state, spec.tie_word_embeddings).items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    text_tok.save_hf(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
