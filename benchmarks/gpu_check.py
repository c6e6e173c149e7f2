"""GPU acceptance check: mmtrain end to end on one CUDA device, in one command.

    python benchmarks/gpu_check.py --out gpu_check.json      # one H100/H200: a few minutes
    python benchmarks/gpu_check.py --cpu --quick --out x.json # CPU smoke (the test suite runs it)

Sections (each reports pass/fail; a failing section does not stop the others; the exit
code is 1 when any failed):

- ``parity``: the same weights and batch, forward + backward on the CPU and on the GPU in
  fp32 (TF32 off for the section, restored after): max abs difference of the losses and of
  the gradients.
- ``host_sync``: training micro-batches (``training_inputs``: host decisions, draws on the
  device generator; layout, forward, backward) of CausalFusion with text, CausalFusion with
  class labels and packed rows, and TransDiff with MRAR, each under
  ``torch.cuda.set_sync_debug_mode("error")`` after one warm-up: a host sync in mmtrain's
  per-micro-batch path raises. On CPU the same code runs unchecked (syncs exist only on CUDA).
- ``train_resume``: real ``mmtrain train`` runs (1 rank, DeepSpeed ZeRO-3; GPU: bf16,
  ``model.attention=flex``, ``train.compile=true``) of ``configs/small.yaml`` on the
  embedded synthetic data: 2N uninterrupted steps, and N steps then a restart that resumes
  to 2N, both compiled the same way; the losses and data hashes of steps N+1..2N must match
  (losses: exactly on CPU; to 1e-3 relative on GPU, where compiled kernels, autotuning and
  the atomics of attention backward are not bitwise repeatable from one process to the next).
- ``inference``: ``mmtrain sample``, ``caption`` and ``eval generate`` (tiny random feature
  extractor: no download) of that run with ``--device`` (GPU: ``--dtype bf16``).
- ``throughput``: single-process forward + backward + AdamW of ``small`` and
  ``causalfusion_l`` (GPU: SDPA vs flex, eager vs compile; bf16 autocast): samples/s,
  tokens/s, MFU (model FLOPs / step time / the device's dense bf16 peak, ``--peak-tflops``
  overrides), peak CUDA memory; every row first runs one micro-batch per sequence bucket
  (``model.seq_buckets``) so that compiled rows are warm, then times random AR splits and
  reports the graphs compiled during warm-up and during timing (0 expected); and sampling
  images/s at S = 1 and 16 AR steps with and without the KV cache.

Prints the tables (markdown) and writes everything to ``--out`` (JSON). Nothing is
downloaded: tokenizer and data are made in a temp dir; wandb is off.

On the device machine (it reaches no package registry and brings its own Python and
torch): run ``make gpu-wheels`` here, carry ``.whl``, then there::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \\
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mmtrain.components.metrics import LoggingConfig, graphs_compiled, peak_flops  # noqa: E402
from mmtrain.config import load_config  # noqa: E402
from mmtrain.distributed import to_device  # noqa: E402
from mmtrain.models import family  # noqa: E402
from mmtrain.models.base import Condition  # noqa: E402
from mmtrain.models.causalfusion import (ar_loss_weights, clean_slot_count, sample_image_tokens,  # noqa: E402
                                         split_inputs, training_flops)
from mmtrain.models.diffusion import build_diffusion  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_causalfusion import SPECIAL, build  # noqa: E402



# --------------------------------------------------------------------------- helpers


def build_model(cfg, attention: str, seed: int = 0):
    """Random weights (seeded) of ``cfg.model.family`` with a non-zero output layer (an untrained one outputs zeros)."""
    torch.manual_seed(seed)
    return build(cfg, attention, "cpu")


def condition(cfg, B: int, gen: torch.Generator) -> dict:
    if cfg.model.max_images > 1:  # documents, as the loader gives them: 1..max_images images, each after a text span
        docs, rows = [], 0
        for _ in range(B):
            segments = []
            for _ in range(1 + int(torch.randint(0, cfg.model.max_images, (1,), generator=gen))):
                segments += [torch.randint(6, 1024, (int(torch.randint(1, 8, (1,), generator=gen)),), generator=gen).numpy(), rows]
                rows += 1
            docs.append(segments)
        return {"documents": docs, "pairs": [False] * B}
    if cfg.model.condition == "class":
        return {"labels": torch.randint(0, cfg.model.num_classes, (B,), generator=gen)}
    T = cfg.model.max_text_len
    text = torch.randint(6, 1024, (B, T), generator=gen)
    text[:, 0] = SPECIAL["bos"]
    text_len = torch.full((B,), T * 2 // 3)
    text[torch.arange(B), text_len - 1] = SPECIAL["eos"]
    return {"text": text, "text_len": text_len}


def micro_batch(model, cfg, diffusion, B: int, device: torch.device, seed: int, split: list[int] | None = None) -> dict:
    """A training batch as the trainer makes it: image tokens on ``device`` (drawn there, as the
    VAE would leave them), the loader's host text or labels, then ``training_inputs`` (host
    decisions from a seeded Random, t / noise / order on the device generator). ``split``
    forces the AR split (to warm up one sequence bucket)."""
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    cond = Condition(**condition(cfg, B, torch.Generator().manual_seed(seed)))
    # documents: the batch's images, padded to a multiple of B rows as the loader pads them
    rows = B if cond.documents is None else max(-(-sum(isinstance(s, int) for d in cond.documents for s in d) // B) * B, B)
    tokens = torch.randn(rows, model.num_image_tokens, model.token_dim, generator=dev_gen, device=device)
    batch = family(model).training_inputs(model, tokens, cond, diffusion, dev_gen, random.Random(seed))
    if split is not None:
        m = cfg.model
        batch.update(split_inputs(split, m.seq_buckets, device),
                     loss_weights=to_device(ar_loss_weights(split, m.max_ar_weight, m.min_ar_weight, m.ar_weight_schedule), device))
    return batch


def bucket_splits(num_tokens: int, buckets: int) -> list[list[int]]:
    """One AR split per sequence bucket: what a warm-up runs so that no timed step compiles."""
    edges = sorted({clean_slot_count(n, num_tokens, buckets) for n in range(num_tokens)})
    return [[num_tokens] if n == 0 else [n, num_tokens - n] for n in (min(e, num_tokens - 1) for e in edges)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_tflops(args) -> float | None:
    """Dense bf16 TFLOP/s of this GPU, as the training metrics look it up (``--peak-tflops`` overrides)."""
    if args.cpu and not args.peak_tflops:
        return None
    flops = peak_flops(LoggingConfig(peak_tflops=args.peak_tflops), "bf16")
    return flops / 1e12 if flops else None


def table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- sections


def check_parity(args, device: torch.device) -> dict:
    """fp32 forward + backward on ``device`` against a float64 reference on the CPU: the same weights
    and batch. Two different computations also on the CPU (fp32 against float64), so the check
    can fail there too; a loss or gradient off by more than fp32 rounding fails it."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        cfg = load_config(REPO / "configs" / ("tiny.yaml" if args.quick else "small.yaml"))
        model = build_model(cfg, "sdpa")
        cpu = micro_batch(model, cfg, build_diffusion(cfg.diffusion), 4, torch.device("cpu"), seed=1)
        results = []
        for dev, dtype in ((torch.device("cpu"), torch.float64), (device, torch.float32)):
            m = build_model(cfg, "sdpa").to(dev, dtype)
            batch = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) if torch.is_tensor(v) else v
                     for k, v in cpu.items()}
            out = m(**batch)
            out["loss"].backward()
            results.append((out["loss"].detach().cpu().double(),
                            torch.cat([p.grad.flatten().cpu().double() for p in m.parameters() if p.grad is not None])))
    finally:  # the later sections measure with the settings the user runs
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    loss_diff = float((results[0][0] - results[1][0]).abs())
    grad_diff = float((results[0][1] - results[1][1]).abs().max())
    grad_scale = float(results[0][1].abs().max())
    # measured on the CPU (tiny): loss 1.1e-7 relative, gradients 6e-7 of their largest; room for
    # the GPU's other kernels and summation orders, not for a weight 1e-3 off (which fails this)
    ok = loss_diff <= 1e-5 * max(1.0, float(results[0][0].abs())) and grad_diff <= 1e-4 * grad_scale
    return {"pass": ok, "loss_float64": float(results[0][0]), "loss_abs_diff": loss_diff, "grad_max_abs_diff": grad_diff,
            "grad_max_abs": grad_scale}


# the per-micro-batch paths host_sync checks: (name, overrides of configs/tiny.yaml or small.yaml)
SYNC_VARIANTS = [
    ("causalfusion text", []),
    ("causalfusion class packed", ["model.condition=class", "model.num_classes=10", "model.pack_length=1024"]),
    ("causalfusion documents", ["model.max_images=3", "model.max_text_len=48"]),
    # the LLaMA backbone: rotary positions from the layout, image copies picked per slot, packed
    ("causalfusion llama frozen_text packed", ["model.backbone=llama", "model.backbone_training=frozen_text",
                                              "model.pack_length=1024"]),
    ("transdiff text mrar", ["model.family=transdiff", "diffusion.process=rectified_flow", "model.transdiff.mrar_refs=2",
                             "model.transdiff.num_queries=16", "model.transdiff.decoder_depth=2"]),
]


def check_host_sync(args, device: torch.device) -> dict:
    """One micro-batch per variant under sync debug "error" (after a warm-up that moves tables
    and allocates), bf16 autocast as training; on CPU the same code runs without the check."""
    gpu = device.type == "cuda"
    base = REPO / "configs" / ("tiny.yaml" if args.quick else "small.yaml")
    checked, errors = [], {}
    for name, overrides in SYNC_VARIANTS:
        cfg = load_config(base, overrides)
        model = build_model(cfg, "sdpa").to(device).train()
        diffusion = build_diffusion(cfg.diffusion)  # built once: its tables move to the device at the warm-up

        def step(seed: int) -> None:
            batch = micro_batch(model, cfg, diffusion, 4, device, seed=seed)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                loss = model(**batch)["loss"]
            loss.backward()

        step(0)
        try:
            if gpu:
                torch.cuda.set_sync_debug_mode("error")
            step(1)
            checked.append(name)
        except RuntimeError as exc:
            errors[name] = {"error": str(exc).splitlines()[0], "where": traceback.format_exc(limit=-4)}
        finally:
            if gpu:
                torch.cuda.set_sync_debug_mode(0)
    # on the CPU the micro-batches ran, but nothing could catch a host sync there: n/a, not a pass
    out = {"pass": False if errors else (True if gpu else None), "variants": checked,
           **({"error": next(iter(errors.values()))["error"], "failed": errors} if errors else {})}
    if not gpu:
        out["note"] = "n/a: host syncs only exist on CUDA (the micro-batches ran unchecked)"
    return out


def make_data(root: Path, image_size: int, num: int) -> dict:
    from mmtrain.data.synthetic import write_synthetic_shards
    from mmtrain.data.sources import iter_samples
    from mmtrain.data.synthetic import SyntheticConfig
    from mmtrain.tokenize.text import TextTokenizerConfig, train_text_tokenizer

    write_synthetic_shards(root / "train", num, SyntheticConfig(seed=0, image_size=image_size), samples_per_shard=256, progress=False)
    write_synthetic_shards(root / "val", 32, SyntheticConfig(seed=1, image_size=image_size), samples_per_shard=256, progress=False)
    captions = [s["caption"] for s in iter_samples(root / "train", want_image=False)]
    tok = train_text_tokenizer(captions, root / "tok" / "text", TextTokenizerConfig(), progress=False)
    return {"train": str(root / "train"), "val": str(root / "val"), "tokenizer": str(tok.model_path)}


def _env() -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def mmtrain(*argv: str, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mmtrain.cli", *argv], capture_output=True, text=True, env=_env(),
                          cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"mmtrain {' '.join(argv[:2])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def train_runs(args, device: torch.device, root: Path) -> dict:
    quick, gpu = args.quick, device.type == "cuda"
    config = REPO / "configs" / ("tiny.yaml" if quick else "small.yaml")
    image_size = load_config(config).data.image_size
    data = make_data(root, image_size, 64 if quick else 2048)
    n = 1 if quick else args.steps // 2
    common = [f"data.train_shards={data['train']}", f"data.val_shards={data['val']}", f"tokenizer.text_model={data['tokenizer']}",
              "train.nproc_per_node=1", "train.zero_stage=3", f"train.precision={'bf16' if gpu else 'fp32'}",
              f"model.attention={'flex' if gpu else 'sdpa'}", f"train.compile={'true' if gpu else 'false'}",
              f"train.micro_batch_size={8 if quick else 32}", "optim.warmup_steps=2", "logging.log_every=1",
              "logging.progress=false", "logging.wandb=false", f"checkpoint.every_steps={n}", "checkpoint.keep_last=5",
              f"data.num_workers={0 if quick else 2}", f"data.index_cache={root / 'index'}"]
    times = {}
    straight = ("train", str(config), *common, f"train.run_dir={root / 'straight'}", f"train.steps={2 * n}")
    first_half = ("train", str(config), *common, f"train.run_dir={root / 'resumed'}", f"train.steps={n}")
    t0 = time.perf_counter()
    if gpu:  # one GPU: one run at a time, and the uninterrupted run's time is its own
        mmtrain(*straight)
        times["uninterrupted_s"] = time.perf_counter() - t0
        mmtrain(*first_half)
    else:  # the CPU smoke: two independent one-rank runs side by side on the cores
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda argv: mmtrain(*argv), (straight, first_half)))
        times["uninterrupted_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    resumed = mmtrain("train", str(config), *common, f"train.run_dir={root / 'resumed'}", f"train.steps={2 * n}")
    times["resume_s"] = time.perf_counter() - t0
    records = {}
    for name in ("straight", "resumed"):
        lines = (root / name / "metrics.jsonl").read_text().splitlines()
        records[name] = {r["step"]: r for r in map(json.loads, lines) if r["step"] > n}
    steps = sorted(records["straight"])
    diffs = [abs(records["straight"][s]["loss"] - records["resumed"][s]["loss"]) for s in steps]
    hashes = all(records["straight"][s]["data_hash"] == records["resumed"][s]["data_hash"] for s in steps)
    last = records["straight"][steps[-1]]
    # both runs use the same compile settings; on CPU they are bitwise equal. On a GPU each process
    # compiles (and autotunes) its own kernels and flex / SDPA backward accumulate with atomics, so
    # a resumed run matches to rounding, not bitwise: 1e-3 of the loss
    tolerance = 0.0 if not gpu else 1e-3 * abs(last["loss"])
    ok = steps == sorted(records["resumed"]) == list(range(n + 1, 2 * n + 1)) and hashes and max(diffs) <= tolerance
    return {"pass": ok and f"resumed from step{n:08d}" in resumed.stderr, "config": config.name, "steps": 2 * n,
            "resumed_at": n, "max_loss_diff": max(diffs), "loss_tolerance": tolerance, "data_hashes_equal": hashes,
            "last_loss": last["loss"],
            "samples_per_s": last["samples_per_s"], "tokens_per_s": last["tokens_per_s"], "mfu": last.get("mfu"),
            "peak_cuda_mb": last.get("peak_cuda_mb"), **times, "run_dir": str(root / "straight"), "data": data}


def check_inference(args, device: torch.device, run: dict) -> dict:
    gpu = device.type == "cuda"
    place = ["--device", "cuda" if gpu else "cpu", "--dtype", "bf16" if gpu else "fp32"]
    run_dir, out = run["run_dir"], Path(run["run_dir"]) / "gpu_check"
    sample_set = ["--set", "diffusion_steps=5" if args.quick else "diffusion_steps=25"]
    t0 = time.perf_counter()
    mmtrain("sample", run_dir, "--prompt", "a red circle", "--prompt", "two blue squares", "--num-per-prompt", "2",
            "--out", str(out / "samples.png"), *place, *sample_set)
    sample_s = time.perf_counter() - t0
    printed = mmtrain("caption", run_dir, "--shards", run["data"]["val"], "--num", "4", *place).stdout
    captions = [line for line in printed.splitlines() if "\t" in line]  # KEY<tab>caption
    num = 8 if args.quick else 256
    mmtrain("eval", "generate", run_dir, "--num", str(num), "--out", str(out / "eval"), *place, *sample_set,
            "--set", "eval.feature_extractor=tiny_random", "--set", "eval.metrics=[fid,isc,kid]",
            "--set", f"eval.stats_cache={out / 'stats'}", "--set", "eval.batch_size=8" if args.quick else "eval.batch_size=64")
    report = json.loads((out / "eval" / "metrics.json").read_text())
    row = report["settings"][0]
    ok = (out / "samples.png").is_file() and len(captions) == 4 and report["device"] == device.type and row["fid"] >= 0
    return {"pass": ok, "sample_cli_s": sample_s, "captions": captions, "eval_num": num, "fid_tiny_random": row["fid"],
            "eval_images_per_s": row["images_per_s"], "eval_device": report["device"], "eval_dtype": report["dtype"]}


def time_training(model, cfg, B: int, device: torch.device, repeats: int) -> dict:
    """Median seconds of forward + backward + AdamW step over random AR splits, after a warm-up
    of one micro-batch per sequence bucket; the graphs compiled in each phase."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = build_diffusion(cfg.diffusion)
    model.train()

    def step(batch: dict) -> dict:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    before = graphs_compiled()
    for i, split in enumerate(bucket_splits(model.num_image_tokens, cfg.model.seq_buckets)):
        step(micro_batch(model, cfg, diffusion, B, device, seed=1000 + i, split=split))
    sync(device)
    warm = graphs_compiled()
    times, seqs = [], []
    for i in range(repeats):
        batch = micro_batch(model, cfg, diffusion, B, device, seed=i)
        sync(device)
        start = time.perf_counter()
        out = step(batch)
        sync(device)
        times.append(time.perf_counter() - start)
        seqs.append(out["sequence_length"])
    return {"step_s": statistics.median(times), "seq": statistics.median(seqs), "graphs_warmup": warm - before,
            "graphs_timed": graphs_compiled() - warm}


def check_throughput(args, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    peak = peak_tflops(args)
    # (config, batch, overrides): today's blocks, then the LLaMA blocks at the same width and depth
    configs = [("tiny", 8, [])] if args.quick else [("small", 64, []), ("small", 64, ["model.backbone=llama"]),
                                                    ("causalfusion_l", 32, [])]
    variants = [("sdpa", False)] + ([("flex", False), ("sdpa", True), ("flex", True)] if gpu else [])
    rows = []
    for name, B, overrides in configs:
        cfg = load_config(REPO / "configs" / f"{name}.yaml", overrides)
        name = f"{name} {cfg.model.backbone}"
        for attention, compiled in variants:
            # each row compiles from scratch: rows of other configs must not use up this row's
            # recompile budget (dynamo's limit is per code object), nor hand it their graphs
            torch._dynamo.reset()
            model = build_model(cfg, attention).to(device)
            if compiled:
                for block in model.transformer_blocks():
                    block.compile()
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            try:
                timing = time_training(model, cfg, B, device, 2 if args.quick else 5)
            except Exception as exc:  # noqa: BLE001 - a variant that fails is reported, the rest still run
                rows.append({"config": name, "attention": attention, "compile": compiled, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            seconds, seq = timing["step_s"], timing["seq"]
            flops = training_flops(model, B, seq)
            rows.append({"config": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "batch": B,
                         "attention": attention, "compile": compiled, "step_s": seconds, "samples_per_s": B / seconds,
                         "tokens_per_s": B * seq / seconds, "mfu": flops / seconds / (peak * 1e12) if peak else None,
                         "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
                         "graphs_warmup": timing["graphs_warmup"], "graphs_timed": timing["graphs_timed"]})
            del model
            if gpu:
                torch.cuda.empty_cache()
    sampling = []
    cfg = load_config(REPO / "configs" / ("tiny.yaml" if args.quick else "small.yaml"))
    model = build_model(cfg, "sdpa").to(device).eval()
    B, steps = (2, 3) if args.quick else (16, 25)
    diffusion = build_diffusion(cfg.diffusion, steps)
    for S in (1, 16):
        for cache in (True, False):
            cond = {k: v.to(device) for k, v in condition(cfg, B, torch.Generator().manual_seed(0)).items()}
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                # the noise generator lives on the device: no copy per diffusion step
                sample_image_tokens(model, diffusion, ar_steps=S, generator=torch.Generator(device=device).manual_seed(0),
                                    cfg_scale=3.0, use_cache=cache, **cond)
            sync(device)
            sampling.append({"ar_steps": S, "kv_cache": cache, "batch": B, "diffusion_steps": steps,
                             "images_per_s": B / (time.perf_counter() - start)})
    # a compile while timing means a shape the warm-up did not cover: the timing is not steady state
    ok = all("error" not in r and r["graphs_timed"] == 0 for r in rows)
    return {"pass": ok, "peak_tflops": peak, "training": rows, "sampling": sampling}


# --------------------------------------------------------------------------- main


PASS_WORDS = {True: "pass", False: "FAIL", None: "n/a"}


def render(report: dict) -> str:
    def fmt(v, spec=".3g"):
        return "-" if v is None else format(v, spec)

    out = [f"# gpu_check on {report['device_name']} (torch {report['torch']}, {report['mode']})", ""]
    out.append(table("checks", ["section", "pass", "figures"], [
        [k, PASS_WORDS[v.get("pass")], v.get("error", "").splitlines()[0][:120] if "error" in v else
         ", ".join(f"{kk}={fmt(vv) if isinstance(vv, float) else vv}" for kk, vv in v.items()
                   if kk not in ("pass", "training", "sampling", "captions", "data", "run_dir", "where", "failed"))[:300]]
        for k, v in report["sections"].items()]))
    thr = report["sections"].get("throughput", {})
    if thr.get("training"):
        out.append(table("training throughput (1 process, bf16 autocast on GPU, fwd+bwd+AdamW)",
                         ["config", "params", "B", "attention", "compile", "step s", "samples/s", "tokens/s", "MFU", "peak CUDA MB",
                          "graphs warm-up / timed"],
                         [[r["config"], fmt(r.get("params_m"), ".1f") + "M", r.get("batch", "-"), r["attention"], r["compile"],
                           fmt(r.get("step_s")), fmt(r.get("samples_per_s"), ".1f"), fmt(r.get("tokens_per_s"), ".0f"),
                           fmt(100 * r["mfu"], ".1f") + "%" if r.get("mfu") else "-", fmt(r.get("peak_cuda_mb"), ".0f"),
                           f"{r['graphs_warmup']} / {r['graphs_timed']}"]
                          if "error" not in r else [r["config"], "-", "-", r["attention"], r["compile"], r["error"][:80], "", "", "", "", ""]
                          for r in thr["training"]]))
        out.append(table("sampling", ["S (AR steps)", "KV cache", "B", "diffusion steps", "images/s"],
                         [[r["ar_steps"], r["kv_cache"], r["batch"], r["diffusion_steps"], fmt(r["images_per_s"], ".2f")]
                          for r in thr["sampling"]]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on the CPU (smoke test; no GPU needed)")
    p.add_argument("--quick", action="store_true", help="tiny config, a few steps: a smoke test, not a measurement")
    p.add_argument("--steps", type=int, default=20, help="training steps of the resume check (even; half before the restart)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak for MFU (0: look the GPU up)")
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--sections", default="parity,host_sync,train_resume,inference,throughput")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --cpu for the CPU smoke test", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    wanted = args.sections.split(",")
    report = {"device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "mode": ("quick" if args.quick else "full") + (" cpu" if args.cpu else ""), "sections": {}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        run = None
        steps = [("parity", lambda: check_parity(args, device)), ("host_sync", lambda: check_host_sync(args, device)),
                 ("train_resume", lambda: train_runs(args, device, Path(tmp))),
                 ("inference", lambda: check_inference(args, device, run) if run else {"pass": False, "error": "no training run"}),
                 ("throughput", lambda: check_throughput(args, device))]
        for name, fn in steps:
            if name not in wanted:
                continue
            t0 = time.perf_counter()
            try:
                report["sections"][name] = fn()
            except Exception as exc:  # noqa: BLE001 - report and go on with the next section
                report["sections"][name] = {"pass": False, "error": f"{type(exc).__name__}: {exc}", "where": traceback.format_exc()}
            report["sections"][name]["seconds"] = round(time.perf_counter() - t0, 1)
            if name == "train_resume" and report["sections"][name].get("run_dir"):
                run = report["sections"][name]
            print(f"[gpu_check] {name}: {PASS_WORDS[report['sections'][name]['pass']]} "
                  f"({report['sections'][name]['seconds']} s)", file=sys.stderr, flush=True)
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    # a section that could not check anything here (n/a) counts neither way
    report["pass"] = all(s["pass"] for s in report["sections"].values() if s["pass"] is not None)
    text = render(report)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**report, "table": text}, indent=1, default=str))
    print(f"gpu_check: {'pass' if report['pass'] else 'FAIL'} in {report['seconds']} s; {args.out}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
