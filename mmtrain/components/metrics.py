"""Training metrics: a progress bar, a JSONL log and wandb (offline by default), rank 0 only."""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mmtrain.errors import ConfigError

log = logging.getLogger("mmtrain.metrics")


@dataclass
class LoggingConfig:
    """Where metrics go.

    Args:
        log_every: steps between log lines. Default 10.
        wandb: log to Weights & Biases. Default true.
        wandb_mode: ``offline`` (files under ``<run_dir>/wandb``), ``online`` or ``disabled``.
            Default ``offline``: nothing leaves the machine unless asked.
        wandb_project: project name. Default ``mmtrain``.
        progress: show a progress bar. Default true.
        sample_every: every N steps generate images from prompts of the current batch
            (class labels in class mode) with the ``sample`` settings, save them as
            ``<run_dir>/samples/step00000N.png`` and log them to wandb; 0 = never. Every
            rank takes part (ZeRO-3 gathers weights collectively). Default 0.
        sample_count: images per periodic sample grid. Default 4.
        peak_tflops: the accelerator's dense peak TFLOP/s for the model-FLOPs utilisation
            (``mfu``) metric; 0 = look the GPU up in a small table (H100/H200/A100 bf16),
            no MFU on CPU or unknown GPUs. Default 0.
    """

    log_every: int = 10
    wandb: bool = True
    wandb_mode: str = "offline"
    wandb_project: str = "mmtrain"
    progress: bool = True
    sample_every: int = 0
    sample_count: int = 4
    peak_tflops: float = 0.0

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logging.wandb_mode: expected offline/online/disabled, got {self.wandb_mode!r}")


# dense (no sparsity) peak TFLOP/s per GPU, by precision
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 67.0}, "H200": {"bf16": 989.0, "fp32": 67.0},
               "A100": {"bf16": 312.0, "fp32": 19.5}}


def graphs_compiled() -> int:
    """Graphs torch.compile (dynamo) has compiled in this process so far: a host counter, no sync."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def peak_flops(cfg: LoggingConfig, precision: str) -> float | None:
    """FLOP/s the MFU metric divides by, or None when unknown (CPU, an unlisted GPU)."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table[precision] * 1e12
    return None


class MetricsLogger:
    """Rank-0 sink. The wandb run id is stored in the run directory so resumes append to it."""

    def __init__(self, cfg: LoggingConfig, run_dir: str, total_steps: int, start_step: int, config_dict: dict, enabled: bool):
        self.cfg, self.enabled = cfg, enabled
        self.run_dir = Path(run_dir)
        self.bar = None
        self.wandb_run = None
        if not enabled:
            return
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        if cfg.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if cfg.wandb and cfg.wandb_mode != "disabled":
            import wandb

            id_file = self.run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.wandb_run = wandb.init(project=cfg.wandb_project, id=run_id, resume="allow", dir=str(self.run_dir),
                                        mode=cfg.wandb_mode, config=config_dict, settings=wandb.Settings(silent=True))
        self._t0 = time.perf_counter()

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self._wandb(lambda run: run.log(metrics, step=step))
        # the data/* counters are all in metrics.jsonl and wandb; the console shows the ones that moved
        line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                        if k != "time" and not (k.startswith("data/") and not v))
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "samples_per_s")})
            self.bar.write(line)
        else:
            print(line, flush=True)

    def log_image(self, step: int, path: Path, caption: str) -> None:
        if self.enabled and self.wandb_run is not None:
            import wandb

            self._wandb(lambda run: run.log({"samples": wandb.Image(str(path), caption=caption)}, step=step))

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        self._wandb(lambda run: run.finish())
        self.wandb_run = None
        os.environ.pop("WANDB_MODE", None)

    def _wandb(self, call) -> None:
        """wandb runs a service process beside this one. Slurm's TERM at a preemption reaches every
        process of the job, that service included, while training still has a checkpoint to save:
        a wandb that stopped answering must not end the run. metrics.jsonl keeps every record."""
        if self.wandb_run is None:
            return
        try:
            call(self.wandb_run)
        except Exception as exc:  # noqa: BLE001 - whatever broke in wandb, training goes on without it
            log.warning("wandb stopped working (%s: %s): it logs no more in this run; %s has every record",
                        type(exc).__name__, exc, self.run_dir / "metrics.jsonl")
            self.wandb_run = None
