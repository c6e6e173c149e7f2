"""The training loop, run once per rank (``mmtrain train`` starts the ranks with torchrun).

Resumes from ``<run_dir>/checkpoints/latest`` when it exists: model, optimizer, LR
schedule, EMA, RNG states, step and samples seen come back; the data stream continues
at stream position ``samples_seen`` (exact, even with another world size, where the
DeepSpeed state goes through a universal checkpoint), and the diffusion noise, token
order and AR split are seeded per (seed, rank, step), so a resumed run sees exactly the
batches an uninterrupted one would have.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

from mmtrain import distributed
from mmtrain.atomic import atomic_write_bytes
from mmtrain.components import checkpoint
from mmtrain.components.data import Batch, build_train_loader
from mmtrain.components.ema import ShardedEMA
from mmtrain.components.metrics import MetricsLogger, graphs_compiled, peak_flops
from mmtrain.components.optimizer import build_optimizer, deepspeed_config
from mmtrain.components.optimizer import describe as describe_optimizer
from mmtrain.components.preemption import PreemptionWatch
from mmtrain.config import Config, save_config
from mmtrain.models import build_model, family
from mmtrain.models.diffusion import build_diffusion
from mmtrain.tokenize.build import build_image_tokenizer
from mmtrain.tokenize.image import patchify
from mmtrain.tokenize.text import TextTokenizer

log = logging.getLogger("mmtrain.train")


class NonFiniteLossError(RuntimeError):
    pass


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
        checkpoint.discard_incomplete(run_dir)
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
    distributed.barrier()
    return run_dir


def check_labels(labels: torch.Tensor, num_classes: int, keys: list[str]) -> None:
    """``keys`` are the batch's ``"source:key"`` ids, so the error names the sample."""
    if (labels < 0).any():
        key = keys[int((labels < 0).nonzero()[0])]
        raise ValueError(f"model.condition=class but sample {key} (data source:key) has no 'cls' field (class label)")
    if (labels >= num_classes).any():
        key = keys[int(labels.argmax())]
        raise ValueError(f"class label {int(labels.max())} of sample {key} is >= model.num_classes ({num_classes})")


def load_initial_weights(model: torch.nn.Module, path: str) -> None:
    """Start a fresh run from a model directory (``mmtrain convert`` or ``mmtrain export`` output)."""
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


def step_seed(seed: int, step: int, data_slice: int) -> int:
    """Noise, token order and AR split of one micro-batch. ``data_slice`` = micro * world + rank
    is which B-sample slice of the step's global batch the micro-batch holds (see
    mmtrain.components.data), so the draw follows the data, not the rank: a resumed run
    sees exactly what an uninterrupted one would have, also on another world size that
    keeps the global batch (e.g. 2 ranks x 1 micro-batch -> 1 rank x 2 micro-batches)."""
    return (((seed * 1000 + data_slice) * 1_000_003 + step) * 1009) % 2**63


def _full_grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """Global L2 norm of the (already all-reduced) gradients of an unpartitioned model, on its device."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def _non_finite_error(step: int, losses: list[torch.Tensor], rank: int, run_dir: Path) -> NonFiniteLossError:
    bad = [float(x) for x in losses if not torch.isfinite(x)]
    where = f"loss {bad[0]} on rank {rank}" if bad else f"on another rank than {rank}"
    last = checkpoint.latest_tag(run_dir)
    return NonFiniteLossError(f"non-finite loss at step {step + 1} ({where}); stopped without saving. "
                              f"Last good checkpoint: {checkpoint.checkpoint_root(run_dir) / last if last else 'none'}")


def reset_peak_memory() -> None:
    """Start the peak-memory counters afresh (Linux: the resident-set high-water mark), so
    the logged peak is that of training, not of building the full model before ZeRO
    partitions it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_memory_mb() -> dict:
    """Peak resident memory (and peak CUDA allocation) of a rank since the first step, max over ranks."""
    cuda = torch.cuda.is_available()
    rss, cuda_mb = distributed.max_over_ranks([_peak_rss_mb(), torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0])
    return {"peak_rss_mb": round(rss, 1), **({"peak_cuda_mb": round(cuda_mb, 1)} if cuda else {})}


class Window:
    """Running sums between two log lines; ``data_hash`` fingerprints the sample keys this rank saw.

    Losses and token counts add up on the device, so a micro-batch costs no host read;
    :meth:`record` reads them once per log step."""

    DEVICE_KEYS = ("loss", "diffusion_loss", "text_loss", "sequence_tokens")
    # what the loaders did in the window (Batch.io, Batch.substituted), summed over ranks: logged as data/<key>
    DATA_KEYS = ("substituted", "requests", "retries", "bytes_fetched", "shard_downloads", "cache_hits",
                 "cache_misses", "cache_evictions", "corrupt_shards")

    def __init__(self, dev: torch.device) -> None:
        self.sums = torch.zeros(len(self.DEVICE_KEYS), dtype=torch.float64, device=dev)
        self.micro_batches, self.flops = 0, 0.0
        self.data = dict.fromkeys(self.DATA_KEYS, 0)
        self.t0 = time.perf_counter()
        self.data_hash = hashlib.sha1()

    def add_batch(self, batch: Batch) -> None:
        self.data_hash.update("\n".join(batch.keys).encode())
        self.data["substituted"] += batch.substituted
        for k in self.DATA_KEYS[1:]:
            self.data[k] += batch.io.get(k, 0)

    def add(self, out: dict, flops: float) -> None:
        self.sums += torch.stack([out[k].detach().to(torch.float64) for k in self.DEVICE_KEYS])
        self.micro_batches += 1
        self.flops += flops

    def record(self, micro_batch_size: int, peak: float | None) -> dict:
        """Collective: averages over ranks and the window, throughput summed over ranks."""
        host = torch.tensor([self.micro_batches, self.flops, *self.data.values()], dtype=torch.float64)
        totals = distributed.sum_over_ranks(torch.cat([self.sums, distributed.to_device(host, self.sums.device)]))
        elapsed = time.perf_counter() - self.t0  # after the read: the device has finished the window's work
        s = dict(zip((*self.DEVICE_KEYS, "micro_batches", "flops", *self.DATA_KEYS), totals))
        n = max(s["micro_batches"], 1.0)
        rec = {"loss": s["loss"] / n, "diffusion_loss": s["diffusion_loss"] / n, "text_loss": s["text_loss"] / n,
               "samples_per_s": s["micro_batches"] * micro_batch_size / elapsed,
               "tokens_per_s": s["sequence_tokens"] / elapsed,
               **{f"data/{k}": int(s[k]) for k in self.DATA_KEYS}}
        if peak is not None:
            rec["mfu"] = s["flops"] / elapsed / (peak * distributed.world_size())
        return rec


def save_sample_grid(engine, cfg: Config, step: int, data: Batch, text_tok, image_tok, run_dir: Path, rank: int) -> Path | None:
    """Generate images for the first prompts (labels) of this rank's batch. Every rank runs
    the same number of forwards, which ZeRO-3's collective weight gathers need; rank 0 saves."""
    from mmtrain.inference import LoadedRun, generate_images, image_grid

    n = min(cfg.logging.sample_count, len(data.keys))
    conditions = data.captions[:n] if text_tok is not None else [int(c) for c in data.labels[:n]]
    from deepspeed.runtime.zero import GatheredParameters

    module = engine.module
    module.eval()
    try:
        # sampling reads the top module's own tensors (pos_embed, text_pos, ...) outside its
        # forward, where ZeRO-3's hooks would gather them: gather them for the duration
        with torch.no_grad(), GatheredParameters(list(module.parameters(recurse=False))):
            images = generate_images(LoadedRun(cfg, module, text_tok, image_tok, step, "", device=distributed.device()), conditions,
                                     cfg.sample, batch_size=n)
    finally:
        module.train()
    if rank != 0:
        return None
    path = run_dir / "samples" / f"{checkpoint.tag_for_step(step)}.png"
    path.parent.mkdir(exist_ok=True)
    image_grid(images, [str(c) for c in conditions], cols=n, scale=2).save(path)
    return path


def train(cfg: Config, watch: PreemptionWatch | None = None) -> dict:
    """Train to ``train.steps`` (or ``train.stop_at``), or until ``watch`` reports a preemption signal: then every
    rank saves the current step and the result's ``stopped_by`` says ``requeue`` or ``stop``."""
    rank, world = distributed.launched_rank(), distributed.launched_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="[%(asctime)s] %(name)s: %(message)s")
    point = checkpoint.plan_resume(cfg.train.run_dir, world, cfg.train.zero_stage)
    if point is not None and point.universal:
        # before the process group exists: no collective timeout runs while rank 0 converts
        checkpoint.make_universal(cfg.train.run_dir, point, rank, cfg.train.convert_timeout_s)
    rank, world, dev = distributed.init(cfg.train.dist_timeout_s, with_deepspeed=True)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    text_tok = TextTokenizer.from_file(cfg.text_model_path) if cfg.model.condition == "text" else None
    run_dir = _prepare_run_dir(cfg, rank, text_tok)

    image_tok = build_image_tokenizer(cfg.tokenizer.image).to(dev)
    model = build_model(cfg.model, cfg.data.image_size, text_tok, image_tok)
    if cfg.train.init_from and point is None:
        load_initial_weights(model, cfg.train.init_from)
    if cfg.train.compile:
        if cfg.model.seq_buckets == 0 and cfg.model.family == "causalfusion":
            log.warning("train.compile with model.seq_buckets=0: every AR split is a new sequence length, so the blocks "
                        "recompile every few micro-batches; set model.seq_buckets (default 4)")
        for block in model.transformer_blocks():
            block.compile()
    diffusion = build_diffusion(cfg.diffusion)
    model_family = family(model)
    opt, sched = build_optimizer(model, cfg.optim, cfg.train.steps, cfg.train.offload)
    # read before DeepSpeed swaps its own tensors into the groups; parameter names per optimizer group: how an offline export finds ZeRO-0's fp32 masters
    names = {id(p): n for n, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


    import deepspeed

    ds_cfg = deepspeed_config(cfg.optim, cfg.train, cfg.model.hidden_size, load_universal=point is not None and point.universal)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
    ema = ShardedEMA(engine.module, cfg.ema, rank, world, engine.optimizer) if cfg.ema.enabled else None
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32

    step, samples_seen = 0, 0
    if point is not None:
        state = checkpoint.resume(engine, run_dir, point, ema)
        if text_tok is not None:
            text_tok.check_matches(state["tokenizer_fingerprint"], where=f"checkpoint in {run_dir}")
        step, samples_seen = state["step"], state["samples_seen"]
        log.info("resumed from %s: step %d, %d samples seen%s", point.tag, step, samples_seen,
                 f" (saved on {point.meta['world_size']} ranks, now {world})" if point.world_changed else "")
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, %d ranks, ZeRO-%d, %s%s; optimizer: %s", n_params / 1e6, world,
             cfg.train.zero_stage, cfg.train.precision, f", EMA {cfg.ema.decay}" if ema else "", describe_optimizer(engine))

    loader = build_train_loader(cfg.data, cfg.train.micro_batch_size, rank, world_size=world, seed=cfg.train.seed,
                                start_sample=samples_seen, text_tokenizer=text_tok, max_text_len=cfg.model.max_text_len,
                                latent_shape=image_tok.latent_shape(cfg.data.image_size, cfg.data.image_size))
    if point is not None and point.meta.get("loader", {}).get("stream") not in (None, loader.stream_identity):
        log.warning("the data config changed since %s (was %s): stream position %d now indexes a different stream",
                    point.tag, point.meta["loader"]["stream"], samples_seen)
    # noise, masks, t and token order are drawn where they are used: no copy per micro-batch
    gen, rng = torch.Generator(device=dev), random.Random()
    # the VAE encodes on the GPU in bf16 when DeepSpeed trains in bf16 (its tokens are cast to bf16 anyway)
    encode_autocast = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda" and dtype == torch.bfloat16)
    metrics = MetricsLogger(cfg.logging, str(run_dir), cfg.train.steps, step, cfg.to_dict(), enabled=rank == 0)
    peak = peak_flops(cfg.logging, cfg.train.precision)
    samples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    window = Window(dev)
    history: list[dict] = []

    def save() -> None:
        checkpoint.save(engine, run_dir, step, {
            "step": step, "samples_seen": samples_seen, "world_size": world, "zero_stage": cfg.train.zero_stage,
            "loader": {"position": samples_seen, "stream": loader.stream_identity},
            "tokenizer_fingerprint": text_tok.fingerprint if text_tok else None, "config": cfg.to_dict(),
            "param_group_names": group_names,
        }, cfg.checkpoint.keep_last, ema)

    data_iter = iter(loader)
    start_step, grad_norm, saved_step, stopped_by = step, torch.zeros(()), -1, None
    last_micro = cfg.train.grad_accum - 1
    last_step = cfg.train.last_step
    try:
        while step < last_step:
            finite = torch.ones((), dtype=torch.bool, device=dev)  # every loss of this optimizer step so far
            losses = []
            logs_now = (step + 1) % cfg.logging.log_every == 0 or step + 1 == last_step
            for micro in range(cfg.train.grad_accum):
                seed = step_seed(cfg.train.seed, step, micro * world + rank)
                gen.manual_seed(seed)
                rng.seed(seed)
                data = next(data_iter)
                window.add_batch(data)
                with torch.no_grad(), torch.autocast(**encode_autocast):
                    # data.use_latents: `mmtrain prep latents` stored image_tok.encode() output (already scaled)
                    latents = (distributed.to_device(data.latents, dev) if data.latents is not None
                               else image_tok.encode(data.images_on(dev)))
                # float32: the diffusion forward process (q_sample, targets) runs in float32 and
                # the model casts its inputs once, to the weights' dtype, where it embeds them
                tokens = patchify(latents.float(), cfg.model.patch_size)
                if text_tok is not None:
                    batch = model_family.training_inputs(model, tokens, diffusion, gen, rng, text=data.text, text_len=data.text_len)
                else:
                    check_labels(data.labels, cfg.model.num_classes, data.keys)
                    batch = model_family.training_inputs(model, tokens, diffusion, gen, rng, labels=data.labels)
                out = engine(**batch)
                finite &= torch.isfinite(out["loss"].detach())
                losses.append(out["loss"].detach())
                engine.backward(out["loss"])
                if micro == last_micro:
                    # one host read per optimizer step, before DeepSpeed applies the update: a NaN
                    # on any rank stops every rank here, with the weights of the last good step
                    if not distributed.all_true(finite):
                        raise _non_finite_error(step, losses, rank, run_dir)
                    if cfg.train.zero_stage == 0 and logs_now:
                        grad_norm = _full_grad_norm(engine.module)  # DeepSpeed reports none without ZeRO
                engine.step()
                window.add(out, model_family.training_flops(model, len(data.keys), out["sequence_length"]))
            step += 1
            samples_seen += samples_per_step
            if step == start_step + 1:  # optimizer state now exists; init transients are over
                reset_peak_memory()
            if ema is not None:
                ema.update(step - 1)
            metrics.step()
            if step % cfg.logging.log_every == 0 or step == last_step:
                grad_norm = engine.get_global_grad_norm() if cfg.train.zero_stage > 0 else grad_norm
                record = {**window.record(cfg.train.micro_batch_size, peak), "lr": sched.get_last_lr()[0],
                          "grad_norm": float(grad_norm),
                          "samples_seen": samples_seen, "data_hash": window.data_hash.hexdigest()[:16], **peak_memory_mb()}
                if cfg.train.compile:  # graphs compiled so far in this process: a count that keeps rising means recompiles
                    record["compiled_graphs"] = graphs_compiled()
                history.append({"step": step, **record})
                metrics.log(step, record)
                window = Window(dev)
            if cfg.logging.sample_every and step % cfg.logging.sample_every == 0:
                path = save_sample_grid(engine, cfg, step, data, text_tok, image_tok, run_dir, rank)
                if path is not None:
                    metrics.log_image(step, path, f"step {step}")
            if step % cfg.checkpoint.every_steps == 0 or step == last_step:
                save()
                saved_step = step
            if watch is not None and step < last_step and (stopped_by := watch.agreed()):
                if saved_step != step:
                    save()
                log.warning("%s: saved step %d of %d, stopping (%s)", watch.signal_name or "signal on another rank",
                            step, cfg.train.steps, stopped_by)
                break
        del data_iter  # stop the loader's workers before the process group goes
        distributed.barrier()
    finally:
        metrics.close()
    if stopped_by is None:
        log.info("finished %d steps; checkpoints in %s", step, checkpoint.checkpoint_root(run_dir))
    return {"step": step, "history": history, "stopped_by": stopped_by}


def quiet_library_warnings() -> None:
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside DeepSpeed's own calls


def main(argv: list[str] | None = None) -> int:
    """One rank of ``mmtrain train`` (started by torchrun) or of ``slurm/train.sbatch`` (an srun task)."""
    quiet_library_warnings()
    from mmtrain.config import load_config
    from mmtrain.launch import lifecycle

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = load_config(argv[0], argv[1:])
    # inside a Slurm job TERM announces a preemption or a cancel; under torchrun alone it is
    # torchrun ending the ranks after a failure
    job_id = os.environ.get("SLURM_JOB_ID")
    watch = PreemptionWatch(stop_on_term=job_id is not None)
    # the ranks of a Slurm job record its runs in RUN_DIR/jobs.jsonl as `mmtrain launch` jobs do
    rank0 = job_id is not None and distributed.launched_rank() == 0
    run_dir = cfg.train.run_dir
    if rank0:
        lifecycle.record_start(run_dir, job_id, "slurm", distributed.launched_world_size(), launcher="mmtrain train")
    try:
        result = train(cfg, watch)
    except Exception as exc:
        if job_id is not None:  # any rank: the first failure of a run is its cause
            lifecycle.record_failure(run_dir, job_id, exc, distributed.launched_rank(), watch.signal_name)
        raise
    finally:
        distributed.destroy()
    if rank0:
        if result["stopped_by"] == "requeue":
            lifecycle.requeue_after_time_limit(run_dir, job_id, cfg.launch.max_timeouts, result["step"], watch.signal_name)
        else:
            lifecycle.record_end(run_dir, job_id, "slurm", result["stopped_by"], result["step"], watch.signal_name)
    return 0


def exit_rank(code: int) -> None:
    """End a rank process without running C++ static destructors: a gloo / shared-memory
    comm thread torn down at interpreter exit can abort ("terminate called without an
    active exception") and turn a finished run into a failed job."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_rank(main())
