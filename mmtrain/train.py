"""The training loop, run once per rank (``mmtrain train`` starts the ranks with torchrun).

Resumes from the newest intact checkpoint of ``<run_dir>/checkpoints`` (or ``train.resume_from``;
damaged newer ones are named and moved to ``checkpoints/damaged/``): model, optimizer, LR
schedule, EMA, RNG states, step and samples seen come back; the data stream continues
at stream position ``samples_seen`` (exact, even with another world size, where the
DeepSpeed state goes through a universal checkpoint), and the diffusion noise, token
order and AR split are seeded per (seed, rank, step), so a resumed run sees exactly the
batches an uninterrupted one would have.
"""
from __future__ import annotations

import contextlib
import dataclasses
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
from mmtrain.components import checkpoint
from mmtrain.components.data import Batch, build_train_loader
from mmtrain.components.ema import ShardedEMA
from mmtrain.components.metrics import MetricsLogger, graphs_compiled, peak_flops
from mmtrain.components.optimizer import build_optimizer, deepspeed_config
from mmtrain.components.optimizer import describe as describe_optimizer
from mmtrain.components.preemption import PreemptionWatch
from mmtrain.config import Config, save_config
from mmtrain.models import Condition, build_model, family
from mmtrain.models.diffusion import build_diffusion
from mmtrain.tokenize.build import build_image_tokenizer
from mmtrain.tokenize.image import patchify
from mmtrain.tokenize.run_text import AnyTextTokenizer, copy_run_tokenizer, load_text_tokenizer, run_text_tokenizer_path

log = logging.getLogger("mmtrain.train")


class NonFiniteLossError(RuntimeError):
    pass


def check_run_tokenizer(cfg: Config, text_tok: AnyTextTokenizer | None) -> None:
    """A run keeps the tokenizer it started with: refuse a different one before anything is written."""
    if text_tok is None:
        return
    kept = run_text_tokenizer_path(cfg.train.run_dir)  # tokenizer/text.model, or tokenizer/text_hf/
    if kept.exists():
        load_text_tokenizer(kept).check_matches(text_tok.fingerprint,
                                                where=f"tokenizer.text_model={cfg.text_model_path} vs the copy in {kept}")


def _prepare_run_dir(cfg: Config, rank: int, text_tok: AnyTextTokenizer | None,
                     point: checkpoint.ResumePoint | None = None) -> Path:
    run_dir = Path(cfg.train.run_dir)
    check_run_tokenizer(cfg, text_tok)  # every rank, so a refusal never leaves the others waiting at the barrier
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if point is not None and point.selection is not None:
            # damaged (or, for train.resume_from, newer) checkpoints out of the way of this run's next saves
            checkpoint.set_aside(run_dir, point.selection, cfg.train.resume_from)
        checkpoint.discard_incomplete(run_dir)
        save_config(cfg, run_dir / "config.yaml")
        if text_tok is not None:
            # the run carries its own tokenizer copy so sampling never depends on outside paths
            # (tokenizer/text.model + text.json, sidecar first; or tokenizer/text_hf/)
            copy_run_tokenizer(text_tok, run_dir / "tokenizer")
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


def resolve_pretrained(cfg: Config) -> Config:
    """``train.init_from`` a Hugging Face checkpoint (a directory with ``config.json``): the model's
    architecture (``model.backbone: llama``, width, depth, heads, ``model.llama``) and, unless
    ``tokenizer.text_model`` names one, the text tokenizer are the checkpoint's. Applied before the
    run's config.yaml is written, so the saved config is the resolved one. Other configs as given."""
    from mmtrain.models.pretrained import is_hf_checkpoint, model_config_from_hf

    src = cfg.train.init_from
    if not src or not is_hf_checkpoint(src):
        return cfg
    tokenizer = dataclasses.replace(cfg.tokenizer, text_model=cfg.tokenizer.text_model or src)
    return dataclasses.replace(cfg, model=model_config_from_hf(cfg.model, src), tokenizer=tokenizer)


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
            # the captions are the loader's: it said once already how many it cut
            images = generate_images(LoadedRun(cfg, module, text_tok, image_tok, step, "", device=distributed.device(),
                                               prompts_cut_reported=True), conditions, cfg.sample, batch_size=n)
    finally:
        module.train()
    if rank != 0:
        return None
    path = run_dir / "samples" / f"{checkpoint.tag_for_step(step)}.png"
    path.parent.mkdir(exist_ok=True)
    image_grid(images, [str(c) for c in conditions], cols=n, scale=2).save(path)
    return path


class Trainer:
    """One rank's training run, in the order it happens: :meth:`build` (process group, model,
    DeepSpeed engine, EMA, resume, data, metrics), then per optimizer step :meth:`train_step`
    (its micro-batches), :meth:`log`, :meth:`sample`, :meth:`save`, until ``train.steps`` (or
    ``train.stop_at``) or an agreed preemption signal (:meth:`preempted`). :func:`train` runs it."""

    def __init__(self, cfg: Config, watch: PreemptionWatch | None = None) -> None:
        self.cfg, self.watch = resolve_pretrained(cfg), watch
        self.step, self.samples_seen = 0, 0
        self.history: list[dict] = []
        self.grad_norm = torch.zeros(())
        self.saved_step, self.stopped_by = -1, None

    # ------------------------------------------------------------------ build

    def build(self) -> None:
        cfg = self.cfg
        self._phase_t = self._startup_t = time.perf_counter()  # start-up lines: each phase's seconds (rank 0)
        self.rank, self.world = distributed.launched_rank(), distributed.launched_world_size()
        logging.basicConfig(level=logging.INFO if self.rank == 0 else logging.WARNING, format="[%(asctime)s] %(name)s: %(message)s")
        # every rank chooses the same checkpoint (read only); the preflight already warned about damaged ones
        self.point = checkpoint.plan_resume(cfg.train.run_dir, self.world, cfg.train.zero_stage, cfg.train.resume_from,
                                            announce=self.rank == 0)
        if self.point is not None and self.point.universal:
            # before the process group exists: no collective timeout runs while rank 0 converts
            checkpoint.make_universal(cfg.train.run_dir, self.point, self.rank, cfg.train.convert_timeout_s)
        self.rank, self.world, self.dev = distributed.init(cfg.train.dist_timeout_s, with_deepspeed=True)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.text_tok = load_text_tokenizer(cfg.text_model_path) if cfg.model.condition == "text" else None
        self.run_dir = _prepare_run_dir(cfg, self.rank, self.text_tok, self.point)
        self._startup(f"process group of {self.world} rank(s) and run directory ready", "building the model")
        self.build_model()
        n_params = sum(p.numel() for p in self.model.parameters())
        self._startup("model built", "initialising DeepSpeed", f"{n_params / 1e6:.2f}M parameters"
                      + (", its blocks compile on the first step" if cfg.train.compile else ""))
        self.build_engine()
        self._startup("DeepSpeed initialised",
                      f"loading checkpoint {self.point.tag}" if self.point is not None else "setting up the data loader",
                      f"ZeRO-{cfg.train.zero_stage}")
        if self.point is not None:
            self.resume()
            self._startup(f"checkpoint {self.point.tag} loaded", "setting up the data loader")
        self.build_data()
        self.metrics = MetricsLogger(cfg.logging, str(self.run_dir), cfg.train.steps, self.step, cfg.to_dict(),
                                     enabled=self.rank == 0)
        self.peak = peak_flops(cfg.logging, cfg.train.precision)
        self.window = Window(self.dev)

    def _startup(self, done: str, doing: str, detail: str = "") -> None:
        """One start-up line (rank 0 logs INFO): what was done, in how many seconds, and what starts now."""
        now = time.perf_counter()
        log.info("start-up: %s in %.1f s%s; %s", done, now - self._phase_t, f" ({detail})" if detail else "", doing)
        self._phase_t = now

    def build_model(self) -> None:
        """The image tokenizer, the model (initial weights, compiled blocks), its family and the diffusion process."""
        cfg = self.cfg
        from mmtrain.models.pretrained import is_hf_checkpoint, load_hf_weights

        self.image_tok = build_image_tokenizer(cfg.tokenizer.image).to(self.dev)
        hf = bool(cfg.train.init_from) and self.point is None and is_hf_checkpoint(cfg.train.init_from)
        with self._partitioned(hf):
            self.model = build_model(cfg.model, cfg.data.image_size, self.text_tok, self.image_tok)
        self.family = family(self.model)
        if hf:
            done = load_hf_weights(self.model, cfg.train.init_from, self.rank)
            log.info("initial weights from the Hugging Face checkpoint %s: %d tensors, %d rows added for new tokens; "
                     "the largest full parameter held at once: %d of the model's %d elements%s", cfg.train.init_from,
                     done["tensors"], done["added_rows"], done["largest_gathered"], done["model_elements"],
                     " (ZeRO-3: built partitioned, filled one tensor at a time)" if cfg.train.zero_stage == 3 else "")
        elif cfg.train.init_from and self.point is None:
            load_initial_weights(self.model, cfg.train.init_from)
        if cfg.train.compile:
            if warning := self.family.compile_warning(cfg.model):
                log.warning(warning)
            for block in self.model.transformer_blocks():
                block.compile()
        self.diffusion = build_diffusion(cfg.diffusion)

    def _partitioned(self, enabled: bool):
        """ZeRO-3 and a pretrained checkpoint to load: build the model partitioned over the ranks
        (``deepspeed.zero.Init``), so that no rank ever holds all of it."""
        if not enabled or self.cfg.train.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        ds_cfg = deepspeed_config(self.cfg.optim, self.cfg.train, self.cfg.model.hidden_size)
        return deepspeed.zero.Init(config_dict_or_path=ds_cfg, remote_device=None, pin_memory=False)

    def build_engine(self) -> None:
        """Optimizer and LR schedule, the DeepSpeed engine around them, and the EMA."""
        cfg = self.cfg
        opt, self.sched = build_optimizer(self.model, cfg.optim, cfg.train.steps, cfg.train.offload)
        # read before DeepSpeed swaps its own tensors into the groups; parameter names per optimizer group: how an offline export finds ZeRO-0's fp32 masters
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.group_names = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]

        import deepspeed

        ds_cfg = deepspeed_config(cfg.optim, cfg.train, cfg.model.hidden_size,
                                  load_universal=self.point is not None and self.point.universal)
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=opt, lr_scheduler=self.sched, config=ds_cfg)
        self.ema = ShardedEMA(self.engine.module, cfg.ema, self.rank, self.world, self.engine.optimizer) if cfg.ema.enabled else None

    def resume(self) -> None:
        """Model, optimizer, schedule, EMA and RNG states, step and samples seen from ``self.point``."""
        state = checkpoint.resume(self.engine, self.run_dir, self.point, self.ema)
        if self.text_tok is not None:
            self.text_tok.check_matches(state["tokenizer_fingerprint"], where=f"checkpoint in {self.run_dir}")
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        log.info("resumed from %s: step %d, %d samples seen%s", self.point.tag, self.step, self.samples_seen,
                 f" (saved on {self.point.meta['world_size']} ranks, now {self.world})" if self.point.world_changed else "")

    def build_data(self) -> None:
        """The loader at stream position ``samples_seen`` and the per-micro-batch random sources."""
        cfg = self.cfg
        n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.model.parameters())
        log.info("model: %.2fM parameters, %d ranks, ZeRO-%d, %s%s; optimizer: %s", n_params / 1e6, self.world,
                 cfg.train.zero_stage, cfg.train.precision, f", EMA {cfg.ema.decay}" if self.ema else "",
                 describe_optimizer(self.engine))
        self.loader = build_train_loader(cfg.data, cfg.train.micro_batch_size, self.rank, world_size=self.world,
                                         seed=cfg.train.seed, start_sample=self.samples_seen, text_tokenizer=self.text_tok,
                                         max_text_len=cfg.model.max_text_len,
                                         latent_shape=self.image_tok.latent_shape(cfg.data.image_size, cfg.data.image_size),
                                         max_images=cfg.model.max_images)
        point = self.point
        if point is not None and point.meta.get("loader", {}).get("stream") not in (None, self.loader.stream_identity):
            log.warning("the data config changed since %s (was %s): stream position %d now indexes a different stream",
                        point.tag, point.meta["loader"]["stream"], self.samples_seen)
        # noise, masks, t and token order are drawn where they are used: no copy per micro-batch
        self.gen, self.rng = torch.Generator(device=self.dev), random.Random()
        # the VAE encodes on the GPU in bf16 when DeepSpeed trains in bf16 (its tokens are cast to bf16 anyway)
        bf16 = cfg.train.precision == "bf16"
        self.encode_autocast = dict(device_type=self.dev.type, dtype=torch.bfloat16, enabled=self.dev.type == "cuda" and bf16)

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self, data_iter) -> Batch:
        """``train.grad_accum`` micro-batches, then the optimizer step and the EMA update; returns the last micro-batch."""
        cfg, step = self.cfg, self.step
        finite = torch.ones((), dtype=torch.bool, device=self.dev)  # every loss of this optimizer step so far
        losses = []
        logs_now = (step + 1) % cfg.logging.log_every == 0 or step + 1 == cfg.train.last_step
        for micro in range(cfg.train.grad_accum):
            data, inputs = self.micro_batch(data_iter, micro)
            out = self.engine(**inputs)
            finite &= torch.isfinite(out["loss"].detach())
            losses.append(out["loss"].detach())
            self.engine.backward(out["loss"])
            if micro == cfg.train.grad_accum - 1:
                # one host read per optimizer step, before DeepSpeed applies the update: a NaN
                # on any rank stops every rank here, with the weights of the last good step
                if not distributed.all_true(finite):
                    raise _non_finite_error(step, losses, self.rank, self.run_dir)
                if cfg.train.zero_stage == 0 and logs_now:
                    self.grad_norm = _full_grad_norm(self.engine.module)  # DeepSpeed reports none without ZeRO
            self.engine.step()
            self.window.add(out, self.family.training_flops(self.model, out.get("sequence_rows", len(data.keys)), out["sequence_length"]))
        self.step += 1
        self.samples_seen += cfg.train.micro_batch_size * cfg.train.grad_accum * self.world
        if self.step == self.start_step + 1:  # optimizer state now exists; init transients are over
            reset_peak_memory()
        if self.ema is not None:
            self.ema.update(self.step - 1)
        self.metrics.step()
        return data

    def micro_batch(self, data_iter, micro: int) -> tuple[Batch, dict]:
        """The next micro-batch and the forward's inputs, drawn from this (step, data slice)'s seed."""
        cfg = self.cfg
        seed = step_seed(cfg.train.seed, self.step, micro * self.world + self.rank)
        self.gen.manual_seed(seed)
        self.rng.seed(seed)
        data = next(data_iter)
        if self.step == self.start_step and micro == 0:  # a host-side clock read, no device sync
            self._startup("first batch arrived", "first step" + (" (compiling the blocks)" if cfg.train.compile else ""))
        self.window.add_batch(data)
        with torch.no_grad(), torch.autocast(**self.encode_autocast):
            # data.use_latents: `mmtrain prep latents` stored image_tok.encode() output (already scaled)
            latents = (distributed.to_device(data.latents, self.dev) if data.latents is not None
                       else self.image_tok.encode(data.images_on(self.dev)))
        # float32: the diffusion forward process (q_sample, targets) runs in float32 and
        # the model casts its inputs once, to the weights' dtype, where it embeds them
        tokens = patchify(latents.float(), cfg.model.patch_size)
        if data.documents is not None:
            cond = Condition(documents=data.documents, pairs=data.pairs)
        elif self.text_tok is not None:
            cond = Condition(text=data.text, text_len=data.text_len)
        else:
            check_labels(data.labels, cfg.model.num_classes, data.keys)
            cond = Condition(labels=data.labels)
        return data, self.family.training_inputs(self.model, tokens, cond, self.diffusion, self.gen, self.rng)

    # ------------------------------------------------------------------ after a step

    def log(self) -> None:
        """Every ``logging.log_every`` steps and at the last: the window's metrics (a collective) to metrics.jsonl / wandb."""
        cfg, step = self.cfg, self.step
        if not (step % cfg.logging.log_every == 0 or step == cfg.train.last_step):
            return
        grad_norm = self.engine.get_global_grad_norm() if cfg.train.zero_stage > 0 else self.grad_norm
        self.grad_norm = grad_norm
        record = {**self.window.record(cfg.train.micro_batch_size, self.peak), "lr": self.sched.get_last_lr()[0],
                  "grad_norm": float(grad_norm),
                  "samples_seen": self.samples_seen, "data_hash": self.window.data_hash.hexdigest()[:16], **peak_memory_mb()}
        if cfg.train.compile:  # graphs compiled so far in this process: a count that keeps rising means recompiles
            record["compiled_graphs"] = graphs_compiled()
        self.history.append({"step": step, **record})
        self.metrics.log(step, record)
        self.window = Window(self.dev)

    def sample(self, data: Batch) -> None:
        """Every ``logging.sample_every`` steps: a grid of images for the first conditions of ``data``."""
        if self.cfg.logging.sample_every and self.step % self.cfg.logging.sample_every == 0:
            path = save_sample_grid(self.engine, self.cfg, self.step, data, self.text_tok, self.image_tok, self.run_dir, self.rank)
            if path is not None:
                self.metrics.log_image(self.step, path, f"step {self.step}")

    def save(self) -> None:
        """A checkpoint of this step on every rank (collective), keeping ``checkpoint.keep_last``."""
        cfg, step, samples_seen = self.cfg, self.step, self.samples_seen
        checkpoint.save(self.engine, self.run_dir, step, {
            "step": step, "samples_seen": samples_seen, "world_size": self.world, "zero_stage": cfg.train.zero_stage,
            "loader": {"position": samples_seen, "stream": self.loader.stream_identity},
            "tokenizer_fingerprint": self.text_tok.fingerprint if self.text_tok else None, "config": cfg.to_dict(),
            "param_group_names": self.group_names,
        }, cfg.checkpoint.keep_last, self.ema)
        self.saved_step = step

    def preempted(self) -> bool:
        """Whether every rank agrees to stop on a preemption signal; then this step is saved first."""
        watch, step, last_step = self.watch, self.step, self.cfg.train.last_step
        if watch is None or step >= last_step or not (stopped_by := watch.agreed()):
            return False
        self.stopped_by = stopped_by
        if self.saved_step != step:
            self.save()
        log.warning("%s: saved step %d of %d, stopping (%s)", watch.signal_name or "signal on another rank",
                    step, self.cfg.train.steps, stopped_by)
        return True

    def first_step_done(self) -> None:
        """The last start-up line, after the first step (one device sync, once: the step's real time)."""
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        self._startup("first step done", f"training (start-up took {time.perf_counter() - self._startup_t:.1f} s)",
                      "compiling included: later steps reuse the graphs" if self.cfg.train.compile else "")

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        self.build()
        cfg = self.cfg
        data_iter = iter(self.loader)
        self.start_step = self.step
        self._startup("data loader set up", "waiting for the first batch")
        try:
            while self.step < cfg.train.last_step:
                data = self.train_step(data_iter)
                if self.step == self.start_step + 1:
                    self.first_step_done()
                self.log()
                self.sample(data)
                if self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.train.last_step:
                    self.save()
                if self.preempted():
                    break
            del data_iter  # stop the loader's workers before the process group goes
            distributed.barrier()
        finally:
            self.metrics.close()
        if self.stopped_by is None:
            log.info("finished %d steps; checkpoints in %s", self.step, checkpoint.checkpoint_root(self.run_dir))
        return {"step": self.step, "history": self.history, "stopped_by": self.stopped_by}


def train(cfg: Config, watch: PreemptionWatch | None = None) -> dict:
    """Train to ``train.steps`` (or ``train.stop_at``), or until ``watch`` reports a preemption signal: then every
    rank saves the current step and the result's ``stopped_by`` says ``requeue`` or ``stop``."""
    from mmtrain.config import require_run_paths

    require_run_paths(cfg, "the run config")
    return Trainer(cfg, watch).run()


def quiet_library_warnings() -> None:
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside DeepSpeed's own calls


def main(argv: list[str] | None = None) -> int:
    """One rank of ``mmtrain train`` (started by torchrun) or of ``slurm/train.sbatch`` (an srun task)."""
    quiet_library_warnings()
    from mmtrain.config import load_config, require_run_paths
    from mmtrain.launch import lifecycle

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = load_config(argv[0], argv[1:])
    require_run_paths(cfg, argv[0])  # the ranks of --skip-preflight starts too
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
        if isinstance(exc, checkpoint.CheckpointError):  # no checkpoint to resume from: one line, as the preflight says it
            if distributed.launched_rank() == 0:
                print(f"mmtrain train: error: {exc}", file=sys.stderr)
            return 2
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
