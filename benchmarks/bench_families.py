"""TransDiff, TransDiff+MRAR and CausalFusion (S = 1 and S > 1) on the same data and budget.

    python benchmarks/bench_families.py                 # the table in docs/transdiff.md (CPU, ~20 min)
    python benchmarks/bench_families.py --steps 50 --eval 36   # a quick look

Data: the embedded synthetic set with one shape per 32x32 image, class-conditional on
its 18 classes (kind x colour, :func:`mmtrain.data.synthetic.synthetic_class`), pixels as
"latents", 8x8 tokens of 4x4 pixels. Every model is sized to about the same parameter
count, trained single-process for the same steps and batch on the same sample stream
with the same rectified-flow objective (logit-normal t; the network predicts x0, or the
velocity with ``--prediction eps``) and AdamW, then
samples ``--eval`` images (classes round-robin) with Euler (``--diffusion-steps`` per
image, CFG ``--cfg``). Accuracy (:func:`accuracy`): what the pixel analyser
(:func:`estimate_shapes`) finds against the class's kind and colour. Latency: wall time per image
of one batch of ``--eval`` images after a warm-up batch.
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from mmtrain.data.attributes import estimate_shapes
from mmtrain.data.synthetic import COLORS, KINDS, SyntheticConfig, generate_sample, synthetic_class
from mmtrain.models import causalfusion, transdiff
from mmtrain.models.config import ModelConfig, TransDiffConfig
from mmtrain.models.diffusion import DiffusionConfig, build_diffusion
from mmtrain.tokenize.image import patchify, pil_to_tensor, tensor_to_pil, unpatchify

NUM_CLASSES = len(KINDS) * len(COLORS)
SIZE, PATCH = 32, 4


def models(width: int) -> dict[str, tuple]:
    """name -> (family module, ModelConfig); depths chosen for about equal parameter counts."""
    common = dict(hidden_size=width, num_heads=4, patch_size=PATCH, condition="class", num_classes=NUM_CLASSES, cond_drop_prob=0.1)
    td = dict(decoder_depth=3, buffer_size=4)
    return {
        "CausalFusion": (causalfusion, ModelConfig(depth=9, num_cond_tokens=4, **common)),
        "TransDiff": (transdiff, ModelConfig(depth=4, family="transdiff", transdiff=TransDiffConfig(**td), **common)),
        "TransDiff+MRAR": (transdiff, ModelConfig(depth=4, family="transdiff",
                                                  transdiff=TransDiffConfig(mrar_refs=3, ref_patch=2, **td), **common)),
    }


def dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = SyntheticConfig(image_size=SIZE, min_shapes=1, max_shapes=1, seed=seed)
    samples = [generate_sample(i, cfg) for i in range(n)]
    images = pil_to_tensor([s["image"] for s in samples])  # n, 3, 32, 32 in [-1, 1]
    labels = torch.tensor([synthetic_class(s["attributes"]["shapes"][0]) for s in samples])
    return patchify(images, PATCH), labels


def flow(prediction: str, steps: int | None = None):
    return build_diffusion(DiffusionConfig(process="rectified_flow", prediction=prediction), steps)


def train(family, model, tokens, labels, steps: int, batch: int, lr: float, seed: int, prediction: str) -> float:
    diffusion = flow(prediction)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    gen, rng = torch.Generator(), random.Random()
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(tokens), (batch,), generator=order)
        gen.manual_seed(seed * 100_003 + step)
        rng.seed(step)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50)
        out = model(**family.training_inputs(model, tokens[idx], diffusion, gen, rng, labels=labels[idx]))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"  step {step + 1}/{steps} loss {float(out['loss'].detach()):.4f} ({(step + 1) / (time.perf_counter() - start):.1f} steps/s)",
                  flush=True)
    model.eval()
    return time.perf_counter() - start


def to_images(tokens: torch.Tensor) -> list:
    return tensor_to_pil(unpatchify(tokens.float().clamp(-1, 1), PATCH, SIZE, SIZE))


def accuracy(tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Fractions of images where the analyser finds: ``exact`` one shape, of the class's kind
    and colour; ``match`` some shape of the class's kind and colour; ``colour`` some shape of
    its colour; ``one`` exactly one shape."""
    hits = {"exact": 0, "match": 0, "colour": 0, "one": 0}
    images = to_images(tokens)
    for im, label in zip(images, labels.tolist()):
        found = estimate_shapes(im)
        kind, color = KINDS[label // len(COLORS)], COLORS[label % len(COLORS)]
        match = any(f["kind"] == kind and f["color"] == color for f in found)
        hits["exact"] += len(found) == 1 and match
        hits["match"] += match
        hits["colour"] += any(f["color"] == color for f in found)
        hits["one"] += len(found) == 1
    return {k: v / len(images) for k, v in hits.items()}


def sample(family, model, labels: torch.Tensor, ar_steps: int, diffusion_steps: int, cfg: float, seed: int,
           prediction: str) -> tuple[torch.Tensor, float]:
    process = flow(prediction, diffusion_steps)
    kw = dict(ar_steps=ar_steps, cfg_scale=cfg, clip_x0=1.0, generator=torch.Generator().manual_seed(seed), labels=labels)
    family.sample_image_tokens(model, process, **{**kw, "labels": labels[:4]})  # warm-up
    start = time.perf_counter()
    tokens = family.sample_image_tokens(model, process, **kw)
    return tokens, (time.perf_counter() - start) / len(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--train-samples", type=int, default=4000)
    ap.add_argument("--eval", type=int, default=144, help="images per setting (classes round-robin)")
    ap.add_argument("--diffusion-steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--cf-steps", type=int, default=8, help="CausalFusion's S > 1")
    ap.add_argument("--prediction", default="x0", choices=["x0", "eps"],
                    help="network output: x0, or eps = the velocity (official TransDiff); x0 learns this data within minutes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grids", default="", help="folder for a PNG grid of each setting's first 36 images")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    tokens, labels = dataset(args.train_samples, args.seed)
    ceiling = accuracy(tokens[:args.eval], labels[:args.eval])["exact"]
    eval_labels = torch.arange(args.eval) % NUM_CLASSES
    rows = []
    for name, (family, cfg) in models(args.width).items():
        torch.manual_seed(args.seed)
        cls = causalfusion.CausalFusion if family is causalfusion else transdiff.TransDiff
        model = cls(cfg, latent_channels=3, latent_size=SIZE)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params / 1e6:.2f}M parameters, training {args.steps} steps x {args.batch}", flush=True)
        seconds = train(family, model, tokens, labels, args.steps, args.batch, args.lr, args.seed, args.prediction)
        settings = [1, args.cf_steps] if family is causalfusion else [model.max_images]
        for s in settings:
            with torch.no_grad():
                out, latency = sample(family, model, eval_labels, s, args.diffusion_steps, args.cfg, args.seed, args.prediction)
            label = f"{name} S={s}" if family is causalfusion else name
            rows.append((label, params, seconds, s, latency, accuracy(out, eval_labels)))
            print(f"  {label}: {latency * 1000:.1f} ms/image, accuracy {rows[-1][-1]}", flush=True)
            if args.grids:
                from pathlib import Path

                from mmtrain.inference import image_grid

                Path(args.grids).mkdir(parents=True, exist_ok=True)
                names = [f"{KINDS[c // len(COLORS)]} {COLORS[c % len(COLORS)]}" for c in eval_labels[:36].tolist()]
                image_grid(to_images(out[:36]), names, cols=9, scale=3).save(
                    Path(args.grids) / f"{label.lower().replace(' ', '_').replace('+', '_').replace('=', '')}.png")

    print(f"\nsame data (synthetic, 1 shape, {NUM_CLASSES} classes), {args.steps} steps x {args.batch}, "
          f"flow with {args.prediction} prediction, Euler {args.diffusion_steps} steps per image, CFG {args.cfg}, {args.eval} images; "
          f"analyser on real images: {ceiling:.3f}")
    print("| model | params | train s | AR steps / chain images | ms / image | exact | kind+colour | colour | one shape |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, params, seconds, s, latency, acc in rows:
        print(f"| {label} | {params / 1e6:.2f}M | {seconds:.0f} | {s} | {latency * 1000:.1f} | {acc['exact']:.3f} | "
              f"{acc['match']:.3f} | {acc['colour']:.3f} | {acc['one']:.3f} |")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
