"""The training loop, run once per rank (``mmtrain train`` starts the ranks with torchrun).

Resumes from ``<run_dir>/checkpoints/latest`` when it exists: model, optimizer, LR
schedule, step and samples seen come back; the data stream continues at stream position
``samples_seen`` (exact, even with another world size), and the diffusion noise, token
order and AR split are seeded per (seed, rank, step), so a resumed run sees exactly the
batches an uninterrupted one would have.
"""
from __future__ import annotations

import hashlib
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
            # sidecar first: another rank that already sees text.model then always finds text.json
            for suffix in (".json", ".model"):
                dst = tok_dir / f"text{suffix}"
                if src.with_suffix(suffix).resolve() != dst.resolve():
                    atomic_write_bytes(dst, src.with_suffix(suffix).read_bytes())
    dist.barrier()
    return run_dir


def new_window() -> dict:
    """Running sums between two log lines; ``data_hash`` fingerprints the sample keys this rank saw."""
    return {"loss": 0.0, "diffusion_loss": 0.0, "text_loss": 0.0, "n": 0, "t0": time.perf_counter(), "data_hash": hashlib.sha1()}


def check_labels(labels: torch.Tensor, num_classes: int, keys: list[str]) -> None:
    """``keys`` are the batch's ``"source:key"`` ids, so the error names the sample."""
    if (labels < 0).any():
        key = keys[int((labels < 0).nonzero()[0])]
        raise ValueError(f"model.condition=class but sample {key} (data source:key) has no 'cls' field (class label)")
    if (labels >= num_classes).any():
        key = keys[int(labels.argmax())]
        raise ValueError(f"class label {int(labels.max())} of sample {key} is >= model.num_classes ({num_classes})")


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

    loader = build_train_loader(cfg.data, cfg.train.micro_batch_size, rank, world_size=world, seed=cfg.train.seed,
                                start_sample=samples_seen, text_tokenizer=text_tok, max_text_len=cfg.model.max_text_len,
                                latent_shape=image_tok.latent_shape(cfg.data.image_size, cfg.data.image_size))
    gen, rng = torch.Generator(), random.Random()
    metrics = MetricsLogger(cfg.logging, str(run_dir), cfg.train.steps, step, cfg.to_dict(), enabled=rank == 0)
    samples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    window = new_window()
    history: list[dict] = []

    def save() -> None:
        checkpoint.save(engine, run_dir, step, {
            "step": step, "samples_seen": samples_seen, "tokenizer_fingerprint": text_tok.fingerprint if text_tok else None,
            "config": cfg.to_dict(), "world_size": world,
        }, cfg.checkpoint.keep_last)

    data_iter = iter(loader)
    try:
        while step < cfg.train.steps:
            for micro in range(cfg.train.grad_accum):
                # noise, order and AR split depend only on (seed, rank, step, micro-batch), so a
                # resumed run draws exactly what an uninterrupted one would have
                noise_seed = (((cfg.train.seed * 1000 + rank) * 1_000_003 + step) * 1009 + micro) % 2**63
                gen.manual_seed(noise_seed)
                rng.seed(noise_seed)
                data = next(data_iter)
                window["data_hash"].update("\n".join(data.keys).encode())
                with torch.no_grad():
                    # data.use_latents: `mmtrain prep latents` stored image_tok.encode() output (already scaled)
                    latents = data.latents if data.latents is not None else image_tok.encode(data.images)
                    tokens = patchify(latents, cfg.model.patch_size).to(dtype)
                if text_tok is not None:
                    batch = training_inputs(model, tokens, diffusion, gen, rng, text=data.text, text_len=data.text_len)
                else:
                    check_labels(data.labels, cfg.model.num_classes, data.keys)
                    batch = training_inputs(model, tokens, diffusion, gen, rng, labels=data.labels)
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
                          "samples_seen": samples_seen, "data_hash": window["data_hash"].hexdigest()[:16]}
                history.append({"step": step, **record})
                metrics.log(step, record)
                window = new_window()
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
