"""``mmtrain export``: a run's ZeRO checkpoint -> a self-contained model directory.

The directory holds ``model.safetensors`` (the trained weights, fp32, consolidated from
the ZeRO shards), ``ema.safetensors`` (the EMA, when the run kept one), ``config.yaml``,
``tokenizer/`` and ``export.json`` (which checkpoint, step, samples seen). It loads with
:func:`mmtrain.inference.load_model_dir` on one process without DeepSpeed, and starts new
runs through ``train.init_from``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from mmtrain.components.checkpoint import checkpoint_root, load_model_state, resolve_tag
from mmtrain.components.ema import consolidate, has_ema


def unshared(state: dict) -> dict:
    """``state`` ready for safetensors, which refuses tensors that share memory: a tied weight (the
    LM head that is the embedding table) is written as a copy under each of its names."""
    seen, out = set(), {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen else tensor.contiguous()
        seen.add(key)
    return out


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, tag: str | None = None, overwrite: bool = False) -> Path:
    """``tag``: a step (``100``) or a tag (``step00000100``), which must be intact; None: the newest
    intact checkpoint (a damaged newer one is named in a warning)."""
    run_dir, out = Path(run_dir), Path(out)
    tag = resolve_tag(run_dir, tag)
    ckpt = checkpoint_root(run_dir) / tag
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")

    state, meta = load_model_state(run_dir, tag)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(unshared(state), str(tmp / "model.safetensors"), metadata={"step": str(meta["step"])})
    files = ["model.safetensors"]
    if has_ema(ckpt):
        ema = consolidate(ckpt)
        if set(ema) != set(state):
            raise ValueError(f"{ckpt}: EMA parameters {sorted(set(ema) ^ set(state))[:5]} differ from the model's")
        save_file(unshared(ema), str(tmp / "ema.safetensors"), metadata={"step": str(meta["step"])})
        files.append("ema.safetensors")
    # the checkpoint's own copies: the config and tokenizer this exact state was trained with
    src_config = ckpt / "config.yaml" if (ckpt / "config.yaml").is_file() else run_dir / "config.yaml"
    shutil.copy2(src_config, tmp / "config.yaml")
    src_tok = ckpt / "tokenizer" if (ckpt / "tokenizer").is_dir() else run_dir / "tokenizer"
    if src_tok.is_dir():
        shutil.copytree(src_tok, tmp / "tokenizer")
    info = {"run_dir": str(run_dir.resolve()), "checkpoint": tag, "step": meta["step"],
            "samples_seen": meta["samples_seen"], "files": files}
    (tmp / "export.json").write_text(json.dumps(info, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
