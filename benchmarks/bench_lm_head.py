"""Peak memory of one training step with a large text vocabulary: the LM head on every slot
of the sequence (how mmtrain computed the text loss before) vs on the text-target slots only.

    python benchmarks/bench_lm_head.py                          # configs/small.yaml shape, B=8, CPU
    python benchmarks/bench_lm_head.py --device cuda --batch 32 # on a GPU

Each row runs in a fresh process: build the text-conditional CausalFusion of ``--config``
with a ``--vocab``-piece vocabulary (random weights), draw one micro-batch with the
trainer's ``training_inputs``, then one forward + backward. "all slots" replays the old
text loss (``lm_head`` on B x N slots, float32 logits, cross-entropy over the transposed
logits); "text targets" is the model's own ``text_loss`` (B (T - 1) gathered slots). Peak
memory: the step's high-water mark above the memory held before it (CPU: the process's
resident set, ``VmHWM`` after resetting it; CUDA: ``max_memory_allocated``). Also checks
that both give the same loss.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SPECIAL = {"pad": 0, "bos": 2, "eos": 3, "boi": 4, "eoi": 5}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def all_slot_text_loss(model, h, target, max_targets):
    """The text loss as mmtrain computed it before: logits of every slot (B, N, V)."""
    logits = model.lm_head(h).float()
    ce = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
    n_text = (target != -100).sum()
    return ce / n_text.clamp(min=1), n_text


def one_row(config: str, vocab: int, variant: str, batch: int, device: str) -> dict:
    from mmtrain.config import load_config
    from mmtrain.models.causalfusion import CausalFusion, training_inputs
    from mmtrain.models.diffusion import build_diffusion

    cfg = load_config(config)
    torch.manual_seed(0)
    latent_channels, downsample = (3, 1) if cfg.tokenizer.image.kind == "pixels" else (16, 16)
    model = CausalFusion(cfg.model, latent_channels=latent_channels, latent_size=cfg.data.image_size // downsample,
                         vocab_size=vocab, special_ids=SPECIAL).to(device).train()
    if variant == "all slots":
        model.text_loss = lambda h, target, max_targets: all_slot_text_loss(model, h, target, max_targets)
    g = torch.Generator().manual_seed(0)
    T = cfg.model.max_text_len
    text = torch.randint(6, vocab, (batch, T), generator=g)
    text[:, 0] = SPECIAL["bos"]
    text_len = torch.randint(T // 2, T + 1, (batch,), generator=g)
    tokens = torch.randn(batch, model.num_image_tokens, model.token_dim, generator=g).to(device)
    inputs = training_inputs(model, tokens, build_diffusion(cfg.diffusion), torch.Generator(device=device).manual_seed(0),
                             random.Random(0), text=text, text_len=text_len)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        held = _rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    out = model(**inputs)
    out["loss"].backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kib("VmHWM") * 1024
    return {"vocab": vocab, "variant": variant, "batch": batch, "sequence_length": out["sequence_length"], "text_slots": T,
            "text_targets": int(out["text_tokens"]), "step_peak_mb": (peak - held) / 2**20, "seconds": time.perf_counter() - start,
            "text_loss": float(out["text_loss"]), "device": device}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "small.yaml"))
    p.add_argument("--vocab", default="32000,128000", help="comma-separated vocabulary sizes")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    args = p.parse_args(argv)
    if args.row:
        vocab, variant = args.row.split(":")
        print(json.dumps(one_row(args.config, int(vocab), variant, args.batch, args.device)))
        return 0
    rows = []
    for vocab in (int(v) for v in args.vocab.split(",")):
        for variant in ("all slots", "text targets"):
            proc = subprocess.run([sys.executable, __file__, "--config", args.config, "--batch", str(args.batch),
                                   "--device", args.device, "--row", f"{vocab}:{variant}"], capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"# {Path(args.config).name}, B={args.batch}, device {args.device}: one training step (forward + backward)\n")
    print("| vocabulary | LM head on | slots | step peak MB | step s | text loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        slots = r["batch"] * (r["sequence_length"] if r["variant"] == "all slots" else r["text_slots"] - 1)
        print(f"| {r['vocab']:,} | {r['variant']} | {slots:,} | {r['step_peak_mb']:,.0f} | {r['seconds']:.1f} | {r['text_loss']:.6f} |")
    for vocab in {r["vocab"] for r in rows}:
        a, b = (r["text_loss"] for r in rows if r["vocab"] == vocab)
        if abs(a - b) > 1e-4 * max(1.0, abs(a)):
            print(f"text losses differ at vocabulary {vocab}: {a} vs {b}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
