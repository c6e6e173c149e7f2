"""Training metrics: a progress bar, a JSONL log and wandb (offline by default), rank 0 only."""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


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
    """

    log_every: int = 10
    wandb: bool = True
    wandb_mode: str = "offline"
    wandb_project: str = "mmtrain"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logging.wandb_mode: expected offline/online/disabled, got {self.wandb_mode!r}")


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
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "time")
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "samples_per_s")})
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        os.environ.pop("WANDB_MODE", None)
