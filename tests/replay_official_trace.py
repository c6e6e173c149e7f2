"""Replay the official CausalFusion training trace through mmtrain's own training path on one rank.

    python tests/replay_official_trace.py FIXTURE CONFIG OUT [key=value ...]

FIXTURE holds 30 steps of the official training loop (see its metadata notes). The model is
built from the trace's initial weights (official key names, converted), the optimizer and
schedule by ``build_optimizer`` from CONFIG's ``optim`` section, and both are handed to a
DeepSpeed engine configured by ``deepspeed_config`` (ZeRO-0, fp32: gradient clipping lives
there), as ``mmtrain.train`` does. Every step feeds the trace's batch, timesteps, AR split,
noise, token order and label drop. Writes OUT/losses.json (loss before each update, the
learning rate each update used) and OUT/final.safetensors (weights after the last update,
mmtrain key names). Run it under a launcher's environment (RANK, WORLD_SIZE, MASTER_*).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmtrain import distributed
from mmtrain.components.optimizer import build_optimizer, deepspeed_config
from mmtrain.config import load_config
from mmtrain.models.causalfusion import CausalFusion, ar_loss_weights, split_inputs
from mmtrain.convert import convert_official_state, official_model_config
from mmtrain.models.diffusion import build_diffusion
from mmtrain.tokenize.image import patchify


def main(fixture: str, config: str, out: str, overrides: list[str]) -> None:
    import deepspeed

    tensors = load_file(fixture)
    with safe_open(fixture, "pt") as f:
        meta = f.metadata()
    official = json.loads(meta["config"])
    splits = json.loads(meta["splits"])
    steps = len(splits)
    cfg = load_config(config, overrides)
    init = {k.removeprefix("init."): v for k, v in tensors.items() if k.startswith("init.")}
    model_cfg, channels, size = official_model_config(init, patch_size=official["patch_size"],
                                                      trainable_pos=official["trainable_pos"])
    for knob in ("ar_step_decay", "max_ar_weight", "min_ar_weight", "ar_weight_schedule", "attention", "seq_buckets"):
        setattr(model_cfg, knob, getattr(cfg.model, knob))  # the recipe's loss knobs, the trace's shape
    model = CausalFusion(model_cfg, latent_channels=channels, latent_size=size)
    model.load_state_dict(convert_official_state(init))
    distributed.init(60, with_deepspeed=True)
    opt, sched = build_optimizer(model, cfg.optim, steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(cfg.optim, cfg.train, model_cfg.hidden_size))
    diffusion = build_diffusion(cfg.diffusion)
    losses, lrs = [], []
    for s in range(steps):
        x, noise = patchify(tensors["step.x"][s], 1), patchify(tensors["step.noise"][s], 1)  # B, L, C
        t = tensors["step.t"][s]
        labels = torch.where(tensors["step.drop"][s].bool(), model_cfg.num_classes, tensors["step.y"][s])
        weights = ar_loss_weights(splits[s], model_cfg.max_ar_weight, model_cfg.min_ar_weight, model_cfg.ar_weight_schedule)
        lrs.append(engine.get_lr()[0])
        result = engine(latents_tokens=x, noisy_tokens=diffusion.q_sample(x, t, noise), t=diffusion.model_time(t),
                        target=diffusion.target(x, noise), order=tensors["step.order"][s],
                        **split_inputs(splits[s], model_cfg.seq_buckets),
                        loss_weights=weights, labels=labels)
        losses.append(float(result["loss"]))
        engine.backward(result["loss"])
        engine.step()
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "losses.json").write_text(json.dumps({"loss": losses, "lr": lrs}))
    save_file({k: v.detach().contiguous() for k, v in engine.module.state_dict().items()}, str(Path(out) / "final.safetensors"))
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
