"""The training loop, run once per rank (``mmtrain train`` starts the ranks with torchrun).

Resumes from ``<run_dir>/checkpoints/latest`` when it exists: model, optimizer, LR
schedule, step and samples seen come back, and the data stream and noise RNGs are
re-seeded from the resumed step so the run continues instead of replaying.
"""
from __future__ import annotations

import logging
import random
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from mmtrain.atomic import atomic_write_bytes
from mmtrain.components import checkpoint
from mmtrain.components.data import build_train_loader
from mmtrain.components.metrics import MetricsLogger
from mmtrain.components.optimizer import build_optimizer, deepspeed_config
from mmtrain.config import Config, load_config, save_config
from mmtrain.models import build_model
from mmtrain.models.causalfusion import training_inputs
from mmtrain.models.diffusion import build_diffusion
from mmtrain.tokenize.image import build_image_tokenizer, patchify
from mmtrain.tokenize.text import TextTokenizer

log = logging.getLogger("mmtrain.train")


class NonFiniteLossError(RuntimeError):
    pass


def _init_distributed(cfg: Config) -> tuple[int, int]:
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=cfg.train.dist_timeout_s))
    return dist.get_rank(), dist.get_world_size()


def check_run_tokenizer(cfg: Config, text_tok: TextTokenizer | None) -> None:
    """A run keeps the tokenizer it started with: refuse a different one before anything is written."""
    if text_tok is None:
        return
    kept = Path(cfg.train.run_dir) / "tokenizer" / "text.model"
    if kept.is_file():
        TextTokenizer.from_file(kept).check_matches(text_tok.fingerprint,
                                                   where=f"tokenizer.text_model={cfg.text_model_path} vs the copy in {kept.parent}")


def _prepare_run_dir(cfg: Config, rank: int, text_tok: TextTokenizer | None) -> Path:
    run_dir = Path(cfg.train.run_dir)
    check_run_tokenizer(cfg, text_tok)  # every rank, so a refusal never leaves the others waiting at the barrier
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if text_tok is not None:
            # the run carries its own tokenizer copy so sampling never depends on outside paths
            tok_dir = run_dir / "tokenizer"
            tok_dir.mkdir(exist_ok=True)
            src = Path(cfg.text_model_path)
            for suffix in (".model", ".json"):
                dst = tok_dir / f"text{suffix}"
                if src.with_suffix(suffix).resolve() != dst.resolve():
                    atomic_write_bytes(dst, src.with_suffix(suffix).read_bytes())
    dist.barrier()
    return run_dir


def check_labels(labels: torch.Tensor, num_classes: int, shards: str) -> None:
    if (labels < 0).any():
        raise ValueError(f"model.condition=class but samples in {shards} have no 'cls' field (class label)")
    if (labels >= num_classes).any():
        raise ValueError(f"class label {int(labels.max())} in {shards} is >= model.num_classes ({num_classes})")


def load_initial_weights(model: torch.nn.Module, path: str) -> None:
    """Start a fresh run from a model directory (``mmtrain convert`` output or an export)."""
    from safetensors.torch import load_file

    file = Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"train.init_from={path}: no model.safetensors there")
    state = load_file(str(file))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"train.init_from={path}: weights do not fit model config: {exc}") from None
    log.info("initial weights from %s", file)


def train(cfg: Config) -> dict:
    rank, world = _init_distributed(cfg)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="[%(asctime)s] %(name)s: %(message)s")
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    text_tok = TextTokenizer.from_file(cfg.text_model_path) if cfg.model.condition == "text" else None
    run_dir = _prepare_run_dir(cfg, rank, text_tok)
    image_tok = build_image_tokenizer(cfg.tokenizer.image)
    model = build_model(cfg.model, cfg.data.image_size, text_tok, image_tok)
    if cfg.train.init_from and checkpoint.latest_tag(run_dir) is None:
        load_initial_weights(model, cfg.train.init_from)
    diffusion = build_diffusion(cfg.diffusion)
    opt, sched = build_optimizer(model, cfg.optim, cfg.train.steps)

    import deepspeed

    ds_cfg = deepspeed_config(cfg.optim, cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.zero_stage, cfg.train.precision)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32

    step, samples_seen = 0, 0
    state = checkpoint.resume(engine, run_dir)
    if state is not None:
        if text_tok is not None:
            text_tok.check_matches(state["tokenizer_fingerprint"], where=f"checkpoint in {run_dir}")
        step, samples_seen = state["step"], state["samples_seen"]
        log.info("resumed from step %d (%d samples seen)", step, samples_seen)
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, %d ranks, ZeRO-%d, %s", n_params / 1e6, world, cfg.train.zero_stage, cfg.train.precision)

    loader = build_train_loader(cfg.data, cfg.train.micro_batch_size, rank, cfg.train.seed, step)
    gen = torch.Generator().manual_seed((cfg.train.seed * 1000 + rank) * 1_000_003 + step)
    rng = random.Random((cfg.train.seed * 1000 + rank) * 1_000_003 + step)
    metrics = MetricsLogger(cfg.logging, str(run_dir), cfg.train.steps, step, cfg.to_dict(), enabled=rank == 0)
    samples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    window = {"loss": 0.0, "diffusion_loss": 0.0, "text_loss": 0.0, "n": 0, "t0": time.perf_counter()}
    history: list[dict] = []

    def save() -> None:
        checkpoint.save(engine, run_dir, step, {
            "step": step, "samples_seen": samples_seen, "tokenizer_fingerprint": text_tok.fingerprint if text_tok else None,
            "config": cfg.to_dict(), "world_size": world,
        }, cfg.checkpoint.keep_last)

    data_iter = iter(loader)
    try:
        while step < cfg.train.steps:
            for _ in range(cfg.train.grad_accum):
                images, captions, labels = next(data_iter)
                with torch.no_grad():
                    tokens = patchify(image_tok.encode(images), cfg.model.patch_size).to(dtype)
                if text_tok is not None:
                    text, text_len = text_tok.encode_batch(captions, cfg.model.max_text_len)
                    batch = training_inputs(model, tokens, diffusion, gen, rng, text=text, text_len=text_len)
                else:
                    check_labels(labels, cfg.model.num_classes, cfg.data.train_shards)
                    batch = training_inputs(model, tokens, diffusion, gen, rng, labels=labels)
                out = engine(**batch)
                engine.backward(out["loss"])
                engine.step()
                for k in ("loss", "diffusion_loss", "text_loss"):
                    window[k] += float(out[k].detach())
                window["n"] += 1
            step += 1
            samples_seen += samples_per_step
            metrics.step()
            if not torch.isfinite(out["loss"].detach()).all():
                raise NonFiniteLossError(f"non-finite loss {float(out['loss'])} at step {step} on rank {rank}")
            if step % cfg.logging.log_every == 0 or step == cfg.train.steps:
                stats = torch.tensor([window["loss"], window["diffusion_loss"], window["text_loss"], window["n"]], dtype=torch.float64)
                dist.all_reduce(stats)
                elapsed = time.perf_counter() - window["t0"]
                record = {"loss": stats[0].item() / stats[3].item(), "diffusion_loss": stats[1].item() / stats[3].item(),
                          "text_loss": stats[2].item() / stats[3].item(), "lr": sched.get_last_lr()[0],
                          "samples_per_s": stats[3].item() * cfg.train.micro_batch_size / elapsed,
                          "samples_seen": samples_seen}
                history.append({"step": step, **record})
                metrics.log(step, record)
                window = {"loss": 0.0, "diffusion_loss": 0.0, "text_loss": 0.0, "n": 0, "t0": time.perf_counter()}
            if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.steps:
                save()
    finally:
        metrics.close()
    log.info("finished %d steps; checkpoints in %s", step, checkpoint.checkpoint_root(run_dir))
    return {"step": step, "history": history}


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside DeepSpeed's own calls
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = load_config(argv[0], argv[1:])
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
