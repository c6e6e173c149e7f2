"""The checks that run once before any rank of a start exists, so that a bad config, a missing
shard or a mismatched tokenizer fails in seconds on the submitting machine, not after a queue
wait on every rank: by ``mmtrain train`` before it starts the ranks, by ``mmtrain launch``
before it submits, by ``slurm/train.sbatch`` before ``srun`` (``mmtrain train --preflight-only``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from mmtrain.config import Config, load_config, require_run_paths

log = logging.getLogger("mmtrain.preflight")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def preflight(config_path: str, overrides: list[str], on_this_node: bool = True) -> Config:
    """The run config of ``config_path`` + ``overrides``, once its data sources, init weights and text
    tokenizer are checked.

    ``on_this_node`` False: the ranks run on other machines (``mmtrain launch`` to Slurm), so the
    ``auto`` shard cache limit is not measured on this one's disk (each node measures its own)."""
    from mmtrain.components.data import check_cache_limit, open_sources

    from mmtrain.train import resolve_pretrained

    cfg = resolve_pretrained(load_config(config_path, overrides))  # train.init_from a HF checkpoint: its architecture
    require_run_paths(cfg, config_path)  # no default for the data or the run directory
    # every training source exists and is well-formed (remote: every shard is there with its index's size,
    # and the credentials work) and fits data.cache_limit; fills the tar index cache for the ranks
    sources = open_sources(cfg.data, on_this_node=on_this_node, documents_ok=True)
    check_cache_limit(cfg.data, sources)
    if cfg.data.val_shards:
        check_val_shards(cfg.data.val_shards, os.path.expanduser(cfg.data.index_cache) if cfg.data.index_cache else "")
    init = Path(cfg.train.init_from)
    if cfg.train.init_from and not ((init / "model.safetensors").is_file() or init.is_file() or
                                    (init / "model.safetensors.index.json").is_file()):
        raise FileNotFoundError(f"train.init_from={cfg.train.init_from}: no model.safetensors there (an mmtrain model directory "
                                "or a local Hugging Face checkpoint; nothing is downloaded)")
    from mmtrain.tokenize.build import check_image_tokenizer

    check_image_tokenizer(cfg.tokenizer.image)  # e.g. a recipe's VAE path left unset: one line, before any rank
    if cfg.model.attention == "flex" and not cuda_available():
        raise ValueError("model.attention=flex: FlexAttention cannot train on CPU (no backward there); "
                         "set model.attention=sdpa, which gives the same numbers")
    if cfg.model.condition != "class":
        if not Path(cfg.text_model_path).exists():
            raise FileNotFoundError(f"text tokenizer {cfg.text_model_path} not found (set tokenizer.text_model to a sentencepiece .model or a "
                                    "Hugging Face tokenizer directory, or run `mmtrain tokenizer train`)")
        from mmtrain.tokenize.run_text import load_text_tokenizer
        from mmtrain.train import check_run_tokenizer

        check_run_tokenizer(cfg, load_text_tokenizer(cfg.text_model_path))
    check_checkpoints(cfg)
    if on_this_node:
        warn_about_cpus_per_task(cfg.data.num_workers)
    log.info("preflight passed: %s: %d source(s), %d samples%s", config_path, len(sources), sum(len(s) for s in sources),
             "" if cfg.model.condition == "class" else ", text tokenizer matches")
    return cfg


def check_val_shards(path: str, index_cache: str = "") -> int:
    """The number of samples of ``data.val_shards`` (evaluation reads it, after training): a path that
    does not exist or holds no samples fails the preflight with the key, not ``mmtrain eval`` a run later."""
    from mmtrain.data.sources import open_source

    fix = "point data.val_shards at prepared validation shards (e.g. the val/ folder `mmtrain prep` writes) or leave it unset"
    try:
        source = open_source(path, cache_dir=index_cache)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"data.val_shards={path}: {exc}; {fix}") from None
    except ValueError as exc:
        raise ValueError(f"data.val_shards={path}: {exc}; {fix}") from None
    if len(source) == 0:
        raise ValueError(f"data.val_shards={path}: no samples; {fix}")
    return len(source)


def check_checkpoints(cfg: Config) -> str | None:
    """The checkpoint the ranks will resume from (None: a fresh run): ``train.resume_from`` or the newest
    intact one; damaged newer ones are named and moved to ``checkpoints/damaged/`` now, before any rank
    starts. No intact checkpoint: a one-line error that says how to start fresh."""
    from mmtrain.components import checkpoint

    selection = checkpoint.choose_resume(cfg.train.run_dir, cfg.train.resume_from)
    checkpoint.set_aside(cfg.train.run_dir, selection, cfg.train.resume_from)
    return selection.tag


def warn_about_cpus_per_task(num_workers: int) -> None:
    """Inside a Slurm job: each rank needs the cores ``mmtrain launch`` asks for (``--cpus-per-task``)."""
    from mmtrain.launch.submit import cpus_per_task_for

    if "SLURM_JOB_ID" not in os.environ:
        return
    need, have = cpus_per_task_for(num_workers), os.environ.get("SLURM_CPUS_PER_TASK")
    if have is None or int(have) < need:
        log.warning("%s, but each rank runs data.num_workers=%d loader workers besides itself: submit with "
                    "--cpus-per-task=%d (data.num_workers + 2) or more",
                    f"this job has --cpus-per-task={have}" if have else "this job was submitted without --cpus-per-task "
                    "(Slurm's default is often 1 CPU per task)", num_workers, need)
