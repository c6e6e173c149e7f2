"""Training parity with the official CausalFusion loop, step by step, through mmtrain's optimizer,
schedule and DeepSpeed engine: the guard that recipe work does not drift from the official update."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO, free_port

from mmtrain.config import load_config
from mmtrain.convert import convert_official_state

FIXTURE = Path(__file__).parent / "fixtures" / "causalfusion_official_train_trace.safetensors"
RECIPE = REPO / "configs" / "causalfusion_l.yaml"  # the official ImageNet recipe; its optimizer is the one under test


def test_the_official_recipe_states_the_traced_optimizer_settings():
    with safe_open(str(FIXTURE), "pt") as f:
        traced = json.loads(f.metadata()["optimizer"])
    optim = load_config(RECIPE).optim
    assert (traced["type"], traced["param_groups"]) == ("AdamW", "one group, every parameter")
    assert (optim.lr, list(optim.betas), optim.eps, optim.weight_decay, optim.grad_clip) == (
        traced["lr"], traced["betas"], traced["eps"], traced["weight_decay"], traced["grad_clip"])
    assert (optim.schedule, optim.warmup_start, optim.param_groups) == ("constant", "zero", "one")


def test_replaying_the_official_training_trace_matches_every_loss_and_the_final_weights(tmp_path):
    tensors = load_file(str(FIXTURE))
    with safe_open(str(FIXTURE), "pt") as f:
        traced = json.loads(f.metadata()["optimizer"])
    overrides = [f"optim.warmup_steps={traced['warmup_steps']}", "train.zero_stage=0", "train.precision=fp32",
                 f"train.micro_batch_size={tensors['step.x'].shape[1]}", "train.nproc_per_node=1", "model.attention=sdpa"]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    run = subprocess.run([sys.executable, str(Path(__file__).parent / "replay_official_trace.py"), str(FIXTURE),
                          str(RECIPE), str(tmp_path), *overrides], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    got = json.loads((tmp_path / "losses.json").read_text())
    torch.testing.assert_close(torch.tensor(got["lr"], dtype=torch.float64), tensors["step.lr"], atol=1e-12, rtol=0)
    assert got["lr"][0] == 0.0  # the official warm-up starts at 0
    torch.testing.assert_close(torch.tensor(got["loss"]), tensors["step.loss"], atol=1e-5, rtol=0)
    final = load_file(str(tmp_path / "final.safetensors"))
    official = convert_official_state({k.removeprefix("final."): v for k, v in tensors.items() if k.startswith("final.")})
    assert set(official) == set(final)
    initial = convert_official_state({k.removeprefix("init."): v for k, v in tensors.items() if k.startswith("init.")})
    moved = 0
    for key, want in official.items():
        if "k_norm.bias" in key:  # no true gradient (softmax ignores a shift shared by all keys): float noise only
            continue
        torch.testing.assert_close(final[key], want, atol=1e-5, rtol=0, msg=key)
        moved += not torch.allclose(initial[key], want)
    assert moved > len(official) // 2  # the weights did train
