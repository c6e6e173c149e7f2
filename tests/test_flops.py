"""The MFU numerator (model FLOPs from the model's shape) against a hand count and against
torch's FLOP counter, and the MFU the metric window reports."""
from __future__ import annotations

import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmtrain.models.causalfusion import CausalFusion, training_flops, training_inputs
from mmtrain.models.config import ModelConfig
from mmtrain.models.diffusion import DiffusionConfig, build_diffusion

CFG = ModelConfig(condition="class", num_classes=10, hidden_size=128, depth=3, num_heads=4, patch_size=2)


def _model_and_batch(B: int = 4):
    torch.manual_seed(0)
    model = CausalFusion(CFG, latent_channels=4, latent_size=16)  # 8x8 = 64 tokens of 2*2*4 = 16 values
    tokens = torch.randn(B, model.num_image_tokens, model.token_dim)
    batch = training_inputs(model, tokens, build_diffusion(DiffusionConfig()), torch.Generator().manual_seed(0),
                            random.Random(0), labels=torch.arange(B))
    return model, batch


def test_training_flops_equal_a_hand_count():
    model, _ = _model_and_batch()
    N = 126  # 4 class tokens + the clean block + the noisy image tokens
    per_block = 128 * 384 + 128 * 128 + 128 * 512 + 512 * 128  # qkv, proj, fc1, fc2 weights
    per_position = 3 * per_block + 16 * 128 + 128 * 16  # blocks, x_proj, diffusion head
    attention = 3 * 12 * 128 * N * N  # QK^T and AV: 2 x 2 N^2 D forward, twice that backward, per block
    assert training_flops(model, 4, N) == 4 * (6 * per_position * N + attention) == 2_088_640_512


def test_weight_flops_match_torch_flop_counter():
    """torch counts the matrix products of one real forward + backward; without the
    attention term (SDPA is not counted here) the model's count agrees within 1%."""
    model, batch = _model_and_batch()
    with FlopCounterMode(display=False) as counter:
        out = model(**batch)
        out["loss"].backward()
    N = out["sequence_length"]
    assert N == 4 + batch["clean_slots"] + 64  # class tokens + the clean block (padded to its bucket) + noisy tokens
    counted = counter.get_total_flops()
    attention = 4 * 3 * 12 * 128 * N * N
    assert counted == pytest.approx(training_flops(model, 4, N) - attention, rel=0.01)


def test_text_mode_counts_the_lm_head_on_the_slots_it_runs_on():
    """Text mode: the LM head runs on B (T - 1) gathered slots, and the count says so; counting
    it on every position (as when the head ran on every slot) would be off by more than 10%."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=128, depth=3, num_heads=4, patch_size=2, max_text_len=16)
    model = CausalFusion(cfg, latent_channels=4, latent_size=16, vocab_size=1000, special_ids=dict(pad=0, bos=2, eos=3, boi=4, eoi=5))
    text = torch.randint(6, 1000, (4, 16))
    batch = training_inputs(model, torch.randn(4, 64, 16), build_diffusion(DiffusionConfig()), torch.Generator().manual_seed(0),
                            random.Random(0), text=text, text_len=torch.tensor([16, 9, 5, 12]))
    with FlopCounterMode(display=False) as counter:
        out = model(**batch)
        out["loss"].backward()
    N = out["sequence_length"]
    attention = 4 * 3 * 12 * 128 * N * N
    assert counter.get_total_flops() == pytest.approx(training_flops(model, 4, N) - attention, rel=0.01)
    every_position = training_flops(model, 4, N) + 6.0 * 4 * (N - 15) * 128 * 1000
    assert counter.get_total_flops() < 0.9 * (every_position - attention)


def test_window_reports_mfu_over_measured_time(monkeypatch):
    from mmtrain import train

    clock = iter([100.0, 102.0])  # the window opens at 100 s and is read at 102 s
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
    window = train.Window(torch.device("cpu"))
    out = {"loss": torch.tensor(2.0), "diffusion_loss": torch.tensor(1.5), "text_loss": torch.tensor(0.5),
           "sequence_tokens": torch.tensor(300)}
    window.add(out, flops=3e12)
    window.add({**out, "loss": torch.tensor(4.0)}, flops=3e12)
    rec = window.record(micro_batch_size=8, peak=1e13)
    assert rec["loss"] == 3.0 and rec["diffusion_loss"] == 1.5
    assert rec["samples_per_s"] == 8.0 and rec["tokens_per_s"] == 300.0
    assert rec["mfu"] == pytest.approx(6e12 / 2.0 / 1e13)
