"""AdamW with the papers' settings, its LR schedule, and the DeepSpeed config around it."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from mmtrain.errors import ConfigError

log = logging.getLogger("mmtrain.optimizer")


@dataclass
class OptimizerConfig:
    """Optimizer and schedule.

    Args:
        lr: peak learning rate. Default 1e-3.
        betas: AdamW betas. Default [0.9, 0.95] (CausalFusion / MAR).
        eps: AdamW epsilon. Default 1e-8.
        weight_decay: applied to matrices only, never to norms, biases or embeddings. Default 0.0.
        param_groups: ``split`` (matrices in one group, norms / biases / embeddings in a
            second that never decays) or ``one`` (every parameter in one group, as the official
            CausalFusion code; needs ``weight_decay: 0``). A run resumes with the grouping it
            was started with. Default ``split``.
        warmup_steps: linear warm-up length. Default 20.
        warmup_start: where the warm-up ramp starts: ``first_step`` (step s uses
            ``lr * (s + 1) / warmup_steps``: the first update already learns) or ``zero``
            (``lr * s / warmup_steps``, the first update at lr 0: the official CausalFusion
            recipe, transformers' ``get_constant_schedule_with_warmup``). Default ``first_step``.
        schedule: ``constant`` (after warm-up) or ``cosine`` (to ``min_lr_ratio * lr``). Default ``constant``.
        min_lr_ratio: floor of the cosine schedule. Default 0.1.
        grad_clip: global gradient-norm clip (0 = off). Default 1.0.
        pretrained_lr_scale: ``model.backbone: llama`` with ``model.backbone_training: full``: the
            weights a pretrained language model provides (text embedding, blocks, final norm, LM
            head) train at ``pretrained_lr_scale * lr``, the new image weights at ``lr`` (a
            pretrained model is usually fine-tuned gently while new layers learn fast). Default 1.0.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 20
    warmup_start: str = "first_step"
    param_groups: str = "split"
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    pretrained_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.pretrained_lr_scale <= 0:
            raise ConfigError(f"optim.pretrained_lr_scale: expected > 0, got {self.pretrained_lr_scale}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"optim.schedule: expected 'constant' or 'cosine', got {self.schedule!r}")
        if self.warmup_start not in ("first_step", "zero"):
            raise ConfigError(f"optim.warmup_start: expected 'first_step' or 'zero', got {self.warmup_start!r}")
        if self.param_groups not in ("split", "one"):
            raise ConfigError(f"optim.param_groups: expected 'split' or 'one', got {self.param_groups!r}")
        if self.param_groups == "one" and self.weight_decay:
            raise ConfigError("optim.param_groups: 'one' puts norms and biases in the decayed group; "
                              f"it needs optim.weight_decay: 0, got {self.weight_decay}")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas: expected two numbers, got {self.betas!r}")


def param_groups(model: torch.nn.Module, weight_decay: float, grouping: str = "split", lr: float = 0.0,
                 pretrained_lr_scale: float = 1.0) -> list[dict]:
    """Decay only weight matrices; norms, biases and embedding tables are left alone (``split``),
    or every trainable parameter in one group (``one``, no decay). With ``pretrained_lr_scale != 1``
    each group is split again: the model's pretrained parameters (``pretrained_parameter_names``)
    at ``lr * pretrained_lr_scale``, the rest at ``lr``."""
    groups = _decay_groups(model, weight_decay, grouping)
    pretrained = model.pretrained_parameter_names() if hasattr(model, "pretrained_parameter_names") else set()
    if pretrained_lr_scale == 1.0 or not pretrained:
        return groups
    ids = {id(p) for n, p in model.named_parameters() if n in pretrained}
    split = []
    for g in groups:
        old = [p for p in g["params"] if id(p) in ids]
        new = [p for p in g["params"] if id(p) not in ids]
        split += [{**g, "params": new, "lr": lr}, {**g, "params": old, "lr": lr * pretrained_lr_scale}]
    return [g for g in split if g["params"]]


def _decay_groups(model: torch.nn.Module, weight_decay: float, grouping: str) -> list[dict]:
    if grouping == "one":
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.0}]
    decay, no_decay = [], []
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim  # a model built partitioned (ZeRO-3) holds flat shards
        if ndim < 2 or id(p) in embedding_params or name.endswith("_pos"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_multiplier(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    if step < cfg.warmup_steps:
        return (step + (cfg.warmup_start == "first_step")) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, total_steps: int, offload: str = "none"):
    """AdamW and its schedule. With ZeRO CPU offload the step runs on the CPU, where
    DeepSpeed's vectorised CPU Adam (same AdamW update) is several times faster than torch's."""
    groups = param_groups(model, cfg.weight_decay, cfg.param_groups, cfg.lr, cfg.pretrained_lr_scale)
    if offload != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, adamw_mode=True)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(cfg, s, total_steps))
    return opt, sched


def describe(engine) -> str:
    """What DeepSpeed actually built, read from the engine's objects rather than from the
    config that asked for it: the inner optimizer's class and where ZeRO keeps its states."""
    zero = engine.optimizer  # DeepSpeed's ZeRO wrapper (at ZeRO-0, the optimizer itself)
    inner = getattr(zero, "optimizer", zero)
    placed = []
    if getattr(zero, "offload_optimizer", False) or getattr(zero, "cpu_offload", False):  # ZeRO-3 / ZeRO-1,2 names
        placed.append("optimizer states on the CPU")
    if getattr(zero, "offload_param", False):
        placed.append("parameters on the CPU")
    wrapper = f" in {type(zero).__name__}" if zero is not inner else ""
    return f"{type(inner).__name__}{wrapper}" + (f", {', '.join(placed)}" if placed else "")


def deepspeed_config(cfg: OptimizerConfig, train, hidden_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON config for ``train`` (a :class:`mmtrain.config.TrainConfig`).

    The optimizer and schedule are built as objects and handed to ``deepspeed.initialize``,
    so they do not appear in it. Communication buckets scale with the model width
    (``hidden_size``; the sizes HF Accelerate's "auto" picks): DeepSpeed's fixed defaults
    (5e8-element reduce buckets) would cost gigabytes per rank on a small model.

    Gradient dtypes under bf16 (``train.grad_accum_dtype``, ``train.communication_dtype``;
    DeepSpeed's own default for both is the model's bf16). What DeepSpeed 0.19 does with them:

    - ZeRO-3: each micro-batch's bf16 gradients are copied into a bucket of the communication
      dtype, reduce-scattered in it, and added into a flat gradient partition of the
      accumulation dtype (``grad_partitions_flat_buffer``).
    - ZeRO-2: bf16 gradients are reduced in the communication dtype and added into a compact
      fp32 partition (``_use_compact_grad_partition_buffer``) when accumulating in fp32.
    - ZeRO-1: fp32 accumulation makes DeepSpeed swap its ZeRO-1 optimizer for its
      ``BF16_Optimizer`` (``engine._do_optimizer_sanity_check``; with CPU offload it keeps the
      ZeRO-1 optimizer, which then accumulates in an fp32 ``grad_accum`` per parameter): a full
      fp32 gradient buffer per rank, all-reduced in the communication dtype.
    - ZeRO-0: DeepSpeed raises "unsupported mix" for bf16 weights with fp32 accumulation, so
      no ``data_types`` is emitted: gradients accumulate in the bf16 ``.grad`` of the module;
      the all-reduce runs in the communication dtype (upcast, reduced, rounded back).
    """
    D = hidden_size
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage >= 2:
        zero.update(reduce_bucket_size=D * D, allgather_bucket_size=max(D * D, 10**6))
    if train.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(0.9 * D * D), stage3_param_persistence_threshold=10 * D)
    if train.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if train.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    dtypes = {}
    if train.zero_stage >= 1:
        dtypes["data_types"] = {"grad_accum_dtype": train.grad_accum_dtype}
    elif train.precision == "bf16" and train.grad_accum > 1 and train.grad_accum_dtype == "fp32":
        log.warning("train.zero_stage=0 with bf16: DeepSpeed accumulates the %d micro-batches' gradients in bf16 "
                    "(it has no fp32 accumulation without ZeRO); train.grad_accum_dtype=fp32 needs train.zero_stage >= 1",
                    train.grad_accum)
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "communication_data_type": train.communication_dtype,
        **dtypes,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
