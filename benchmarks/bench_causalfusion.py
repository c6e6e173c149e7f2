"""CausalFusion speed on this machine: training step time and sampling latency.

    python benchmarks/bench_causalfusion.py                       # configs/small.yaml, CPU
    python benchmarks/bench_causalfusion.py --config configs/causalfusion_xl.yaml --device cuda
    python benchmarks/bench_causalfusion.py --backbones dit,llama,llama:frozen_text   # the blocks at equal width and depth

Training: forward + backward + AdamW step of one micro-batch (text-conditional layouts
mix generate and caption rows; class configs use class tokens), with SDPA and with
FlexAttention masks. Sampling: one batch of images in S = 1, 4, 16 AR steps with
``--diffusion-steps`` steps each, with and without the KV cache. Prints a table;
single process, random weights, no data loading (see benchmarks for the loader).
``--backbones``: instead, the training step of each ``model.backbone`` (``dit``: today's blocks;
``llama``: LLaMA blocks, SwiGLU at the MLP's parameter count; ``llama:frozen_text``: with the
image copies) at the config's width and depth, SDPA.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings

import torch

from mmtrain.config import load_config
from mmtrain.models import model_class
from mmtrain.models.causalfusion import CausalFusion, sample_image_tokens, training_inputs
from mmtrain.models.diffusion import build_diffusion

SPECIAL = {"pad": 0, "bos": 2, "eos": 3, "boi": 4, "eoi": 5}


def build(cfg, attention: str, device: str):
    """Random weights of ``cfg.model.family`` (a 1024-piece text vocabulary in text mode) with a
    non-zero output layer (an untrained one outputs zeros); TransDiff takes ``attention=sdpa`` only."""
    cfg.model.attention = attention
    latent_channels, downsample = (3, 1) if cfg.tokenizer.image.kind == "pixels" else (16, 16)
    kw = {} if cfg.model.condition == "class" else dict(vocab_size=1024, special_ids=SPECIAL)
    model = model_class(cfg.model)(cfg.model, latent_channels=latent_channels, latent_size=cfg.data.image_size // downsample, **kw)
    head = model.diffusion_head if isinstance(model, CausalFusion) else model.decoder.final_layer.linear
    torch.nn.init.normal_(head.weight, std=0.02)
    return model.to(device)


def condition(cfg, B: int, device: str) -> dict:
    if cfg.model.condition == "class":
        return {"labels": torch.randint(0, cfg.model.num_classes, (B,), device=device)}
    T = cfg.model.max_text_len
    text = torch.randint(6, 1024, (B, T), device=device)
    text[:, 0] = SPECIAL["bos"]
    text_len = torch.full((B,), T * 2 // 3, device=device)
    text[torch.arange(B), text_len - 1] = SPECIAL["eos"]
    return {"text": text, "text_len": text_len}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_train(model, cfg, B: int, repeats: int, device: str, backward: bool = True) -> float:
    model.train()
    diffusion = build_diffusion(cfg.diffusion)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randn(B, model.num_image_tokens, model.token_dim, device=device)
    times = []
    for i in range(repeats + 1):  # the first call warms up (allocations, compilation)
        batch = training_inputs(model, tokens, diffusion, torch.Generator().manual_seed(i), random.Random(i), **condition(cfg, B, "cpu"))
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"), torch.set_grad_enabled(backward):
            loss = model(**batch)["loss"]
        if backward:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_sample(model, cfg, B: int, ar_steps: int, use_cache: bool, diffusion_steps: int, device: str) -> float:
    model.eval()
    diffusion = build_diffusion(cfg.diffusion, diffusion_steps)
    cond = condition(cfg, B, device)
    sync(device)
    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        sample_image_tokens(model, diffusion, ar_steps=ar_steps, generator=torch.Generator().manual_seed(0), cfg_scale=3.0,
                            use_cache=use_cache, **cond)
    sync(device)
    return time.perf_counter() - start


def compare_backbones(cfg, args) -> None:
    """One table: each backbone's parameters and training step (forward + backward + AdamW, SDPA)."""
    import dataclasses

    print(f"# {args.config}: width {cfg.model.hidden_size}, depth {cfg.model.depth}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, B={args.train_batch}, median of {args.repeats}")
    print()
    print("| backbone | parameters (trainable) | forward + backward + AdamW s | samples/s |")
    print("|---|---|---|---|")
    for name in args.backbones.split(","):
        backbone, _, training = name.partition(":")
        cfg.model = dataclasses.replace(cfg.model, backbone=backbone, backbone_training=training or "full")
        torch.manual_seed(0)
        model = build(cfg, "sdpa", args.device)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        t = time_train(model, cfg, args.train_batch, args.repeats, args.device, True)
        print(f"| {name} | {total / 1e6:.2f}M ({trainable / 1e6:.2f}M) | {t:.3f} | {args.train_batch / t:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/small.yaml")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--sample-batch", type=int, default=4)
    p.add_argument("--diffusion-steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ar-steps", default="1,4,16")
    p.add_argument("--backbones", default="", help="compare training steps of backbones, e.g. dit,llama,llama:frozen_text")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")  # eager flex on CPU is expected
    torch.manual_seed(0)
    cfg = load_config(args.config)
    if args.backbones:
        compare_backbones(cfg, args)
        return
    model = build(cfg, "sdpa", args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# {args.config}: {n_params / 1e6:.1f}M parameters, {model.num_image_tokens} image tokens, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    print()
    print(f"| training (B={args.train_batch}) | seconds | samples/s |")
    print("|---|---|---|")
    for attention in ("sdpa", "flex"):
        model.cfg.attention = attention
        for backward in (True, False):
            name = f"{attention}, {'forward + backward + AdamW' if backward else 'forward only'}"
            if attention == "flex" and backward and args.device == "cpu":
                print(f"| {name} | n/a: FlexAttention has no CPU backward | |")
                continue
            t = time_train(model, cfg, args.train_batch, args.repeats, args.device, backward)
            print(f"| {name} | {t:.3f} | {args.train_batch / t:.1f} |")
    model.cfg.attention = "sdpa"
    print()
    print(f"| sampling (B={args.sample_batch}, CFG, {args.diffusion_steps} diffusion steps per AR step) | KV cache s | no cache s | speed-up |")
    print("|---|---|---|---|")
    for S in (int(s) for s in args.ar_steps.split(",")):
        cached = time_sample(model, cfg, args.sample_batch, S, True, args.diffusion_steps, args.device)
        plain = time_sample(model, cfg, args.sample_batch, S, False, args.diffusion_steps, args.device)
        print(f"| S = {S} | {cached:.2f} | {plain:.2f} | {plain / cached:.2f}x |")


if __name__ == "__main__":
    main()
