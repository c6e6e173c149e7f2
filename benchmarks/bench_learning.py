"""Learning curves: train with the real `mmtrain train`, evaluate every K steps with the real `mmtrain eval`.

    python benchmarks/bench_learning.py configs/demo.yaml data.train_shards=data/demo/train data.val_shards=data/demo/val \
        tokenizer.text_model=data/demo/tokenizer/text.model --run-dir runs/demo_curve --eval-every 200
    python benchmarks/bench_learning.py configs/shapes.yaml data.train_shards=data/shapes/train data.val_shards=data/shapes/val \
        tokenizer.text_model=data/shapes/tokenizer/text.model --run-dir runs/shapes --eval-every 1000 --eval-num 512

For each evaluation point ``K, 2K, ..., train.steps`` (``--steps`` overrides the config's):
trains up to that step (``mmtrain train CONFIG train.stop_at=STEP``: the first launch starts the
run, every later one resumes it from its checkpoint; the learning-rate schedule follows the last
step, so the curve is that of one uninterrupted run), then runs ``mmtrain eval caption`` and
``mmtrain eval generate --ar-steps S1,S2`` (no FID: attribute accuracy of the synthetic data,
scored by the pixel analyser) on ``--eval-num`` samples of the run's validation shards
(``--eval-shards`` for others, e.g. a hold-out split). Prints the learning-curve table
(step, training wall time, loss, caption exact/kind/colour/size/count, image
exact/kind/colour/size/count per AR step count; seen / unseen combinations too when the
training data was made with ``--hold-out``; the kind of small and large shapes apart when the
evals report it; a model that does not write text, e.g.
``model.family=transdiff``, gets no caption evaluation and ``-`` in those columns) and
writes next to the run:
``RUN/learning/curve.json``, ``curve.md`` (the table) and ``curve.png`` (one line per
attribute, one panel per task).

Resumable: a point already in ``curve.json`` is not redone, and training continues from the
run's last checkpoint, so a stopped benchmark picks up where it was. Extra ``key=value``
arguments are training overrides. Runs on any number of ranks (``train.nproc_per_node``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path

ATTRIBUTES = ("exact", "kind", "color", "size", "count")


def run_cli(args: list[str], log: Path) -> float:
    """``mmtrain ARGS`` (the CLI's own entry point, in this process: imports are paid once); the command
    line goes to ``log``; returns the wall time (raises on failure)."""
    from mmtrain import cli

    with open(log, "a") as fh:
        fh.write(f"$ mmtrain {' '.join(args)}\n")
    t0 = time.perf_counter()
    code = cli.main(args)
    if code:
        raise SystemExit(f"mmtrain {' '.join(args[:3])} ... failed with exit code {code}")
    return time.perf_counter() - t0


def train_loss(run_dir: Path, step: int) -> float | None:
    """The logged training loss at ``step`` (the last record at or before it)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    before = [r for r in records if r["step"] <= step]
    return before[-1]["loss"] if before else None


def evaluate(run_dir: Path, step: int, args, log: Path, captions: bool) -> dict:
    """``captions``: the model also writes text (CausalFusion with text conditions); the
    caption columns of the others stay empty."""
    out = run_dir / "learning" / f"step{step:08d}"
    shards = ["--shards", args.eval_shards] if args.eval_shards else []
    common = [*shards, "--num", str(args.eval_num), "--nproc", str(args.eval_nproc)]
    point: dict = {"caption": {}}
    t = 0.0
    if captions:
        t += run_cli(["eval", "caption", str(run_dir), *common, "--out", str(out / "caption")], log)
        point["caption"] = json.loads((out / "caption" / "metrics.json").read_text())["scores"]
    t += run_cli(["eval", "generate", str(run_dir), *common, "--out", str(out / "generate"), "--ar-steps", args.ar_steps,
                  "--set", "eval.metrics=[]"], log)
    report = json.loads((out / "generate" / "metrics.json").read_text())
    point["generate"] = {str(row["ar_steps"]): row for row in report["settings"]}
    point["eval_wall_s"] = t
    return point


DOCUMENT_METRICS = ("draw_attribute", "draw_consistency", "draw_consistency_color", "draw_exact", "tell_kind", "tell_exact")


def evaluate_documents(run_dir: Path, step: int, args, log: Path) -> dict:
    """``mmtrain eval documents`` (shape stories, --task documents): per split the overall means and the means per k."""
    out = run_dir / "learning" / f"step{step:08d}" / "documents"
    shards = args.eval_shards or str(Path(load_val_shards(args)))
    held = ["--held-out", args.held_out] if args.held_out else []
    t = run_cli(["eval", "documents", str(run_dir), "--shards", shards, *held, "--num", str(args.eval_num), "--out", str(out),
                 *(f"--set={o}" for o in args.sample)], log)
    report = json.loads((out / "metrics.json").read_text())
    return {"documents": {split: {"overall": r["overall"], "by_k": r["by_k"]} for split, r in report["splits"].items()},
            "eval_wall_s": t}


def load_val_shards(args) -> str:
    from mmtrain.config import load_config

    shards = load_config(args.config, args.overrides).data.val_shards
    if not shards:
        raise SystemExit("--task documents: give --eval-shards (story shards) or set data.val_shards")
    return shards


def table_documents(points: list[dict]) -> str:
    splits = sorted({s for p in points for s in p["documents"]})
    ks = sorted({k for p in points for s in p["documents"].values() for k in s["by_k"]}, key=int)
    head = ["step", "train wall s", "loss"]
    for split in splits:
        head += [f"{split} {m}" for m in DOCUMENT_METRICS] + [f"{split} draw consistency k={k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for p in points:
        row = [str(p["step"]), f"{p['train_wall_s']:.0f}", "-" if p["loss"] is None else f"{p['loss']:.4f}"]
        for split in splits:
            d = p["documents"].get(split, {"overall": {}, "by_k": {}})
            row += [fmt(d["overall"].get(m)) for m in DOCUMENT_METRICS]
            row += [fmt(d["by_k"].get(k, {}).get("draw_consistency")) for k in ks]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` under a temp name, then rename (a stopped benchmark leaves no half PNG)."""
    import matplotlib.pyplot as plt

    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def plot_documents(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = sorted({s for p in points for s in p["documents"]})
    fig, axes = plt.subplots(1, len(splits), figsize=(4.6 * len(splits), 3.4), sharey=True, squeeze=False)
    steps = [p["step"] for p in points]
    for ax, split in zip(axes[0], splits):
        for m in DOCUMENT_METRICS:
            ax.plot(steps, [p["documents"].get(split, {}).get("overall", {}).get(m, float("nan")) for p in points],
                    marker="o", label=m)
        ax.set_title(f"shape stories: {split}")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(textwrap.fill(title, 45 * len(splits)), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def scores(d: dict, suffix: str = "") -> list[str]:
    return [f"{d[f'attr_{a}{suffix}']:.2f}" if f"attr_{a}{suffix}" in d else "-" for a in ATTRIBUTES]


def table(points: list[dict], ar_steps: list[str]) -> str:
    tasks = lambda p: [p["caption"], *p["generate"].values()]  # noqa: E731
    split = any("attr_exact_unseen" in d for p in points for d in tasks(p))
    by_size = any("attr_kind_small" in d for p in points for d in tasks(p))
    head = ["step", "train wall s", "loss", *(f"caption {a}" for a in ATTRIBUTES)]
    for s in ar_steps:
        head += [f"image S={s} {a}" for a in ATTRIBUTES]
    if split:
        head += ["caption exact seen / unseen", *(f"image S={s} exact seen / unseen" for s in ar_steps)]
    if by_size:
        head += ["caption kind small / large", *(f"image S={s} kind small / large" for s in ar_steps)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for p in points:
        row = [str(p["step"]), f"{p['train_wall_s']:.0f}", "-" if p["loss"] is None else f"{p['loss']:.4f}",
               *scores(p["caption"])]
        for s in ar_steps:
            row += scores(p["generate"][s])
        if split:
            row.append(" / ".join(scores(p["caption"], f"_{n}")[0] for n in ("seen", "unseen")))
            row += [" / ".join(scores(p["generate"][s], f"_{n}")[0] for n in ("seen", "unseen")) for s in ar_steps]
        if by_size:
            row += [" / ".join(f"{d[f'attr_kind_{n}']:.2f}" if f"attr_kind_{n}" in d else "-" for n in ("small", "large"))
                    for d in (p["caption"], *(p["generate"][s] for s in ar_steps))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(points: list[dict], ar_steps: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("caption", lambda p: p["caption"])] + [(f"image, S={s}", lambda p, s=s: p["generate"][s]) for s in ar_steps]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), sharey=True)
    steps = [p["step"] for p in points]
    for ax, (name, get) in zip(axes, panels):
        for a in ATTRIBUTES:
            ax.plot(steps, [get(p).get(f"attr_{a}", float("nan")) for p in points], marker="o", label=a)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("attribute accuracy")
    axes[-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(textwrap.fill(title, 40 * len(panels)), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="training config (YAML)")
    ap.add_argument("overrides", nargs="*", help="training overrides key=value")
    ap.add_argument("--run-dir", required=True, help="the run (created, or resumed)")
    ap.add_argument("--eval-every", type=int, required=True, help="evaluate every K steps")
    ap.add_argument("--steps", type=int, default=0, help="last step (default: the config's train.steps)")
    ap.add_argument("--eval-num", type=int, default=128, help="samples per evaluation (default 128)")
    ap.add_argument("--eval-shards", default="", help="evaluation shards (default: the run's data.val_shards)")
    ap.add_argument("--ar-steps", default="1,4", help="AR step counts of the image evaluation (default 1,4)")
    ap.add_argument("--eval-nproc", type=int, default=1, help="ranks of each evaluation (default 1)")
    ap.add_argument("--task", choices=["captions", "documents"], default="captions",
                    help="captions: eval caption + eval generate; documents: eval documents (shape stories) (default captions)")
    ap.add_argument("--held-out", default="", help="--task documents: held-out story shards, scored apart")
    ap.add_argument("--sample", action="append", default=[], metavar="KEY=VALUE",
                    help="--task documents: sample setting for the evaluation, e.g. diffusion_steps=50 (repeatable)")
    args = ap.parse_args(argv)
    from mmtrain.components.checkpoint import latest_tag
    from mmtrain.config import load_config

    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps else [])
    cfg = load_config(args.config, overrides)
    last = cfg.train.steps  # --steps is one of the overrides
    captions = cfg.model.family == "causalfusion" and cfg.model.condition == "text"
    if args.eval_every < 1 or last < args.eval_every:
        raise SystemExit(f"--eval-every {args.eval_every} must be between 1 and the last step {last}")
    run_dir = Path(args.run_dir).resolve()
    (run_dir / "learning").mkdir(parents=True, exist_ok=True)
    curve_path, log = run_dir / "learning" / "curve.json", run_dir / "learning" / "log.txt"
    state = json.loads(curve_path.read_text()) if curve_path.is_file() else {"points": [], "train_wall_s": 0.0}
    ar_steps = [s.strip() for s in args.ar_steps.split(",") if s.strip()]
    targets = list(range(args.eval_every, last + 1, args.eval_every)) + ([last] if last % args.eval_every else [])
    done = {p["step"] for p in state["points"]}
    for step in targets:
        if step in done:
            continue
        tag = latest_tag(run_dir)
        if tag is None or int(tag.removeprefix("step")) < step:
            state["train_wall_s"] += run_cli(["train", args.config, *overrides, f"train.run_dir={run_dir}",
                                              f"train.stop_at={step}", f"checkpoint.every_steps={args.eval_every}"], log)
        scored = evaluate_documents(run_dir, step, args, log) if args.task == "documents" else \
            evaluate(run_dir, step, args, log, captions)
        point = {"step": step, "train_wall_s": state["train_wall_s"], "loss": train_loss(run_dir, step), **scored}
        state["points"] = sorted([*state["points"], point], key=lambda p: p["step"])
        tmp = curve_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, curve_path)
        if args.task == "documents":
            said = ", ".join(f"{split} {m} {d['overall'].get(m, float('nan')):.2f}" for split, d in point["documents"].items()
                             for m in DOCUMENT_METRICS)
        else:
            said = (f"caption exact {point['caption'].get('attr_exact', float('nan')):.2f}, "
                    + ", ".join(f"image S={s} exact {point['generate'][s].get('attr_exact', float('nan')):.2f}" for s in ar_steps))
        print(f"step {step}: loss {point['loss']}, {said} (train {state['train_wall_s']:.0f} s so far)", flush=True)
    header = (f"{args.config} {' '.join(overrides)}: {args.eval_num} eval {'stories' if args.task == 'documents' else 'samples'} "
              f"per point, {state['train_wall_s']:.0f} s of training (wall, launches included)")
    if args.task == "documents":
        text = table_documents(state["points"])
        plot_documents(state["points"], run_dir / "learning" / "curve.png", header)
    else:
        text = table(state["points"], ar_steps)
        plot(state["points"], ar_steps, run_dir / "learning" / "curve.png", header)
    (run_dir / "learning" / "curve.md").write_text(f"{header}\n\n{text}\n")
    print(f"\n{header}\n\n{text}\n\nplot: {run_dir / 'learning' / 'curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
