"""YAML configs loaded into typed dataclasses, with ``key.sub=value`` overrides.

Every component owns a small ``Config`` dataclass next to its code; this module only
composes them into the run-level :class:`Config`, loads YAML into it and validates.
Unknown keys, values of the wrong type and every section's own validation raise the one
:class:`mmtrain.errors.ConfigError`, naming the file and the dotted key (:mod:`mmtrain.schema`
builds the sections): a silently ignored typo in a training config costs a cluster day. Keys
that older versions wrote into run configs and that mean nothing now (:data:`RETIRED_KEYS`) are
dropped with a warning, so old runs still load.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mmtrain.atomic import atomic_write_text
from mmtrain.components.checkpoint import CheckpointConfig
from mmtrain.components.data import DataConfig
from mmtrain.components.ema import EMAConfig
from mmtrain.components.metrics import LoggingConfig
from mmtrain.components.optimizer import OptimizerConfig
from mmtrain.errors import ConfigError
from mmtrain.eval.config import EvalConfig
from mmtrain.launch.config import LaunchConfig
from mmtrain.models.config import ModelConfig
from mmtrain.models.diffusion import FLOW_SAMPLERS, DiffusionConfig
from mmtrain.schema import apply_overrides, build_dataclass
from mmtrain.tokenize.image import ImageTokenizerConfig, load_image_tokenizer_yaml
from mmtrain.tokenize.run_text import run_text_tokenizer_path
from mmtrain.tokenize.text import TextTokenizerConfig

log = logging.getLogger("mmtrain.config")

# Keys older versions wrote into run configs (<run_dir>/config.yaml) that no longer mean anything:
# dotted key -> why. Loading drops them with a one-line warning, so old runs still resume and
# export; any other unknown key is still an error.
RETIRED_KEYS = {
    "synthetic": "the synthetic dataset's settings are options of `mmtrain prep synthetic`",
    "data.shuffle_buffer": "the sample order is a seeded permutation (data.shuffle, data.shuffle_window), not a buffer",
}


@dataclass
class TokenizerPaths:
    """Where the run's tokenizers live.

    Args:
        text_model: the text tokenizer: a sentencepiece ``.model`` (its ``.json`` sidecar sits next
            to it) or a Hugging Face tokenizer directory (``tokenizer.json``, or ``tokenizer.model`` with
            ``tokenizer_config.json``; e.g. a pretrained LLaMA-family model's). Default ``""``: the run's
            own copy, ``<run_dir>/tokenizer/text.model`` (or ``<run_dir>/tokenizer/text_hf``).
        text: settings used when ``mmtrain tokenizer train`` builds it.
        image: the continuous image tokenizer: its fields (``tokenizers/*.yaml``), or the path of a
            tokenizer.yaml (e.g. the one ``mmtrain tokenizer train-vae`` writes), loaded in its place.
    """

    text_model: str = ""
    text: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    image: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)


@dataclass
class TrainConfig:
    """The training loop.

    Args:
        run_dir: everything of a run lands here (config, checkpoints, logs, samples).
            Restarting with the same run_dir resumes. Required to train (no default: a
            forgotten path must not train into a shared folder): :func:`require_run_paths`.
        steps: optimizer steps to train in total (not per restart). Default 200.
        micro_batch_size: samples per rank per forward. Default 16.
        grad_accum: micro-batches per optimizer step. Default 1.
        nproc_per_node: ranks ``mmtrain train`` starts on this node. Default 2.
        precision: ``fp32`` or ``bf16`` (bf16 weights and activations, fp32 master weights
            and optimizer state). Default ``fp32`` (CPU friendly).
        zero_stage: DeepSpeed ZeRO stage 0-3. Default 3.
        offload: ZeRO CPU offload: ``none``, ``optimizer`` (optimizer state and step on the
            CPU, ZeRO >= 1) or ``all`` (also the parameters, ZeRO-3 only). Offloading uses
            DeepSpeed's CPU Adam, compiled on first use (about a minute). Default ``none``.
        compile: ``torch.compile`` each transformer block (the repeated unit, so one
            compiled graph serves all of them). Default false.
        seed: global seed; rank r uses ``seed * 1000 + r`` for its noise. Default 0.
        grad_accum_dtype: ``fp32`` or ``bf16``: what ZeRO accumulates gradients in (over the
            micro-batches of a step, and ZeRO-2/3's gradient partitions) when ``precision`` is
            bf16 (DeepSpeed's ``data_types.grad_accum_dtype``). ZeRO-3 and ZeRO-2 add each
            micro-batch's reduced gradient into an fp32 partition; ZeRO-1 runs DeepSpeed's BF16
            optimizer, which keeps a full fp32 gradient buffer on every rank (4 bytes x
            parameters; ZeRO-2 partitions it). ZeRO-0 accumulates in bf16 whatever this says:
            DeepSpeed refuses fp32 accumulation without ZeRO. An fp32 run accumulates in fp32.
            Default ``fp32``.
        communication_dtype: ``fp32`` or ``bf16``: the dtype of the gradient all-reduce /
            reduce-scatter over the ranks when ``precision`` is bf16 (DeepSpeed's
            ``communication_data_type``; bf16 halves the traffic and sums W ranks' gradients
            with 8 mantissa bits). Every ZeRO stage honours it. Default ``fp32``.
        dist_timeout_s: collective timeout, so a dead rank ends the job. Default 600.
        convert_timeout_s: resuming on another world size: how long the other ranks wait
            (on the run directory's filesystem, before the process group exists, so no
            collective timeout applies) for rank 0 to convert the checkpoint to a DeepSpeed
            universal checkpoint; they then stop with an error naming this key. Default 7200.
        init_from: a model directory (``model.safetensors``, e.g. from ``mmtrain convert``)
            whose weights start a fresh run; ignored once the run has a checkpoint. Default "".
        stop_at: end this launch, with a checkpoint, once the run reaches this step; the
            learning-rate schedule and the totals still follow ``steps``, so a run stopped
            at every evaluation point (``benchmarks/bench_learning.py``) trains exactly as one
            uninterrupted run. 0 = ``steps``. Default 0.
        resume_from: the checkpoint a restart resumes from, a step (``100``) or a tag
            (``step00000100``); "" = the newest intact one (a damaged newer one is moved to
            ``checkpoints/damaged/`` with a warning). Resuming from an older step moves the
            newer checkpoints to ``checkpoints/set_aside/``; later restarts of the run (a
            requeue) then resume from its newest checkpoint again. Default "".
    """

    run_dir: str = ""
    steps: int = 200
    micro_batch_size: int = 16
    grad_accum: int = 1
    nproc_per_node: int = 2
    precision: str = "fp32"
    zero_stage: int = 3
    offload: str = "none"
    compile: bool = False
    seed: int = 0
    grad_accum_dtype: str = "fp32"
    communication_dtype: str = "fp32"
    dist_timeout_s: int = 600
    convert_timeout_s: int = 7200
    init_from: str = ""
    stop_at: int = 0
    resume_from: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.stop_at <= self.steps:
            raise ConfigError(f"train.stop_at: expected 0 (= train.steps) up to train.steps ({self.steps}), got {self.stop_at}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision: expected 'fp32' or 'bf16', got {self.precision!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage: expected 0..3, got {self.zero_stage!r}")
        for name in ("grad_accum_dtype", "communication_dtype"):
            value = getattr(self, name)
            if value not in ("fp32", "bf16"):
                raise ConfigError(f"train.{name}: expected 'fp32' or 'bf16', got {value!r}")
            if value == "bf16" and self.precision != "bf16":
                raise ConfigError(f"train.{name}=bf16 needs train.precision=bf16 (an fp32 run has fp32 gradients)")
        if self.offload not in ("none", "optimizer", "all"):
            raise ConfigError(f"train.offload: expected 'none', 'optimizer' or 'all', got {self.offload!r}")
        if self.offload == "optimizer" and self.zero_stage == 0:
            raise ConfigError("train.offload=optimizer needs train.zero_stage >= 1")
        if self.offload == "all" and self.zero_stage != 3:
            raise ConfigError("train.offload=all (parameters too) needs train.zero_stage=3")
        if self.resume_from and not self.resume_from.removeprefix("step").isdigit():
            raise ConfigError(f"train.resume_from: expected a step (100) or a checkpoint tag (step00000100), got {self.resume_from!r}")
        for name in ("steps", "micro_batch_size", "grad_accum", "nproc_per_node", "dist_timeout_s", "convert_timeout_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: expected >= 1, got {getattr(self, name)}")

    @property
    def last_step(self) -> int:
        """Where this launch ends: ``stop_at``, or ``steps`` when it is 0."""
        return self.stop_at or self.steps


@dataclass
class SampleConfig:
    """Inference defaults for ``mmtrain sample`` / ``caption`` / ``eval``.

    Args:
        ar_steps: autoregressive steps S per image (1 = pure diffusion). Default 4.
        diffusion_steps: respaced DDPM (or Euler flow) steps per AR step. Default 50.
        cfg_scale: classifier-free guidance scale on the prompt or class. Default 3.0.
        cfg_schedule: ``constant``; ``linear`` (from 1 up to cfg_scale with the fraction of
            tokens generated, as MAR); or ``interval`` (cfg_scale only while
            cfg_interval[0] <= t < cfg_interval[1], model time 0..1000, as the official
            ``cfg_interval``). Default ``constant``.
        cfg_interval: the timestep interval of the ``interval`` schedule. Default [0, 1000].
        max_caption_len: tokens generated at most when captioning. Default 40.
        seed: sampling seed. Default 0.
        clip_x0: clamp predicted clean latents to [-clip_x0, clip_x0]; 0 = off (VAE latents).
            Default 1.0, right for pixel "latents" in [-1, 1].
        flow_sampler: rectified flow only: ``euler`` (the ODE, deterministic) or
            ``euler_maruyama`` (the reverse SDE of the official TransDiff sampler). Default ``euler``.
        sde_drift_scale: euler_maruyama: drift multiplier (official ``scale_0``). Default 1.0.
        sde_noise_scale: euler_maruyama: noise multiplier (official ``scale_1``). Default 1.0.

    For ``model.family=transdiff``, ``ar_steps`` is the MRAR chain length (capped at
    ``model.transdiff.mrar_refs + 1``) and ``diffusion_steps`` the flow steps per image.
    """

    ar_steps: int = 4
    diffusion_steps: int = 50
    cfg_scale: float = 3.0
    cfg_schedule: str = "constant"
    cfg_interval: tuple[float, float] = (0.0, 1000.0)
    max_caption_len: int = 40
    seed: int = 0
    clip_x0: float = 1.0
    flow_sampler: str = "euler"
    sde_drift_scale: float = 1.0
    sde_noise_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.cfg_schedule not in ("constant", "linear", "interval"):
            raise ConfigError(f"sample.cfg_schedule: expected 'constant', 'linear' or 'interval', got {self.cfg_schedule!r}")
        if len(self.cfg_interval) != 2 or self.cfg_interval[0] > self.cfg_interval[1]:
            raise ConfigError(f"sample.cfg_interval: expected [low, high] with low <= high, got {list(self.cfg_interval)}")
        if self.flow_sampler not in FLOW_SAMPLERS:
            raise ConfigError(f"sample.flow_sampler: expected one of {FLOW_SAMPLERS}, got {self.flow_sampler!r}")
        if self.ar_steps < 1 or self.diffusion_steps < 1:
            raise ConfigError(f"sample.ar_steps and sample.diffusion_steps must be >= 1, got {self.ar_steps}, {self.diffusion_steps}")


@dataclass
class Config:
    """A whole run. See ``configs/*.yaml`` for annotated examples."""

    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerPaths = field(default_factory=TokenizerPaths)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.model.family == "transdiff" and self.diffusion.process != "rectified_flow":
            raise ConfigError(f"model.family=transdiff trains a flow decoder: set diffusion.process=rectified_flow "
                              f"(got {self.diffusion.process!r})")
        if self.sample.flow_sampler != "euler" and self.diffusion.process != "rectified_flow":
            raise ConfigError(f"sample.flow_sampler={self.sample.flow_sampler!r} needs diffusion.process=rectified_flow")

    @property
    def text_model_path(self) -> str:
        return self.tokenizer.text_model or str(run_text_tokenizer_path(self.train.run_dir))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def _drop_retired(tree: dict, source: str) -> dict:
    """``tree`` without the :data:`RETIRED_KEYS` it holds, each dropped with a one-line warning (``tree`` is not changed)."""
    tree = dict(tree)
    for key, why in RETIRED_KEYS.items():
        *sections, name = key.split(".")
        node = tree
        for part in sections:
            if not isinstance(node.get(part), dict):
                break
            node[part] = node = dict(node[part])
        else:
            if name in node:
                del node[name]
                log.warning("%s: ignoring retired key %r (%s)", source, key, why)
    return tree


def _resolve_image_tokenizer(tree: dict) -> dict:
    """``tree`` with a ``tokenizer.image`` that names a tokenizer.yaml (a string, e.g. the one
    ``mmtrain tokenizer train-vae`` writes) replaced by that file's section
    (:func:`mmtrain.tokenize.image.load_image_tokenizer_yaml`; a relative path in it is resolved
    against its folder), so the resolved config a run saves holds the section itself and is
    self-contained. A relative tokenizer.yaml path is resolved against the working directory, as
    every path of a config is. ``tree`` is not changed."""
    tokenizer = tree.get("tokenizer")
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("image"), str):
        return tree
    path = tokenizer["image"]
    section = load_image_tokenizer_yaml(path, "tokenizer.image")
    try:
        build_dataclass(ImageTokenizerConfig, section, "tokenizer.image")
    except ConfigError as exc:
        raise ConfigError(f"tokenizer.image={path}: {exc}") from None
    return {**tree, "tokenizer": {**tokenizer, "image": section}}


def config_from_dict(tree: dict, source: str = "<dict>") -> Config:
    """The run config of a nested dict (a loaded YAML file); errors name ``source`` and the dotted key."""
    try:
        return build_dataclass(Config, _resolve_image_tokenizer(_drop_retired(tree or {}, source)), "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply ``key.sub=value`` overrides and validate everything."""
    tree: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        if not Path(path).is_file():
            raise ConfigError(f"{source}: config file not found")
        with open(path) as fh:
            try:
                tree = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        # a tokenizer.image file is loaded before the overrides after it, so `tokenizer.image=tok.yaml
        # tokenizer.image.path=...` (or a config naming the file and such an override) sets a field of its section
        tree = _resolve_image_tokenizer(tree)
        for item in overrides or []:
            tree = _resolve_image_tokenizer(apply_overrides(tree, [item]))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config_from_dict(tree, source)


def require_run_paths(cfg: Config, source: str | os.PathLike | None) -> None:
    """Raise :class:`ConfigError` naming ``source`` and the keys when a config about to train (``mmtrain train``,
    ``launch``, the preflight, a rank) names no training data (``data.train_shards`` / ``data.sources``) or no
    ``train.run_dir``: neither has a default, so a forgotten path fails here instead of training somewhere
    nobody looks. Not checked on load: a saved run's config.yaml always has both, other configs need neither."""
    missing = []
    if not cfg.data.sources and not str(cfg.data.train_shards).strip():
        missing.append("data.train_shards (or data.sources): where the training data is, e.g. "
                       "data.train_shards=data/photos/train")
    if not str(cfg.train.run_dir).strip():
        missing.append("train.run_dir: where the run's checkpoints and logs go, e.g. train.run_dir=runs/photos")
    if missing:
        raise ConfigError(f"{source or '<defaults>'}: not set: {'; '.join(missing)} (in the file or as key=value overrides)")


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (temp file + rename, never half-written)."""
    atomic_write_text(path, yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False))
