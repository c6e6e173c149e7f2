"""The ``mmtrain`` command: prep, tokenizer, train, launch, jobs, sample, caption, edit, generate, eval, convert, export, demo.

Argument parsing and dispatch only: each ``cmd_*`` turns its arguments into calls of the library
module that owns the work and prints what it returns.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from mmtrain.config import load_config
from mmtrain.errors import ConfigError

log = logging.getLogger("mmtrain.cli")


# --------------------------------------------------------------------------- prep


def cmd_prep(args: argparse.Namespace) -> int:
    from mmtrain.data.synthetic import HOLD_OUT_DIR, write_synthetic_shards
    from mmtrain.data.synthetic import SyntheticConfig, parse_hold_out

    if args.documents or args.hold_out_changes or args.val_fraction:
        return _prep_stories(args)
    cfg = SyntheticConfig(image_size=args.image_size, seed=args.seed, min_shapes=args.min_shapes, max_shapes=args.max_shapes)
    hold_out = parse_hold_out(args.hold_out) if args.hold_out else []
    stats = write_synthetic_shards(args.out, args.num, cfg, samples_per_shard=args.samples_per_shard,
                                   image_format=args.image_format, progress=not args.quiet, hold_out=hold_out)
    print(f"wrote {stats['num_samples']} samples in {stats['num_shards']} shards to {args.out} (stats: {Path(args.out) / 'stats.json'})")
    if hold_out:
        print(f"held out {stats['held_out_samples']} samples with {', '.join(stats['hold_out'])} to "
              f"{Path(args.out) / HOLD_OUT_DIR}")
    return 0


def _prep_stories(args: argparse.Namespace) -> int:
    """``prep synthetic --documents``: shape stories (mmtrain.data.stories) as document shards."""
    from mmtrain.data.stories import StoryConfig, parse_change_kinds, write_story_shards

    if not args.documents:
        raise ValueError("--hold-out-changes and --val-fraction are options of --documents (shape stories); add --documents")
    if args.hold_out:
        raise ValueError("--hold-out holds out attribute combinations of image-caption samples; with --documents "
                         "use --hold-out-changes KIND[,KIND]")
    held = parse_change_kinds(args.hold_out_changes, "--hold-out-changes")
    stats = write_story_shards(args.out, args.num, StoryConfig(image_size=args.image_size, seed=args.seed),
                               hold_out_changes=held, val_fraction=args.val_fraction,
                               samples_per_shard=args.samples_per_shard, progress=not args.quiet)
    print(f"wrote {stats['documents']} stories ({json.dumps(stats['change_counts'])} changes) to {args.out} "
          f"(stats: {Path(args.out) / 'stats.json'})")
    if held:
        print(f"held out {stats['held_out_stories']} stories with {', '.join(held)} to {Path(args.out) / 'holdout'}")
    return 0


# --------------------------------------------------------------------------- tokenizer


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from mmtrain.tokenize.text import TextTokenizerConfig, train_text_tokenizer, training_texts

    if not args.shards and not args.text:
        raise ValueError("give --shards (webdataset or MDS) and/or --text FILE (one caption per line)")
    cfg = TextTokenizerConfig(vocab_size=args.vocab_size, model_type=args.model_type, max_sentences=args.max_sentences,
                              byte_fallback=args.byte_fallback, character_coverage=args.character_coverage, seed=args.seed)
    tok = train_text_tokenizer(training_texts(args.shards, args.text), args.out, cfg, progress=not args.quiet)
    print(f"tokenizer: {args.out}.model ({tok.vocab_size} pieces; specials {json.dumps(tok.state()['special_token_ids'])})")
    return 0


def cmd_tokenizer_estimate_scale(args: argparse.Namespace) -> int:
    """Latent scale (and shift) of an image tokenizer measured on shard images; optionally written into a YAML copy."""
    from mmtrain.tokenize.scale import estimate_scale_on_shards

    est = estimate_scale_on_shards(args.tokenizer_yaml, args.shards, num=args.num, image_size=args.image_size,
                                   with_shift=args.shift, write=args.write)
    print(json.dumps(est, indent=2))
    if args.write:
        print(f"wrote {args.write}")
    return 0


def cmd_tokenizer_train_vae(args: argparse.Namespace) -> int:
    from mmtrain.tokenize.train_vae import VAETrainConfig, train_vae

    cfg = VAETrainConfig(image_size=args.image_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         kl_weight=args.kl_weight, seed=args.seed, perceptual_weights=args.perceptual_weights,
                         perceptual_weight=args.perceptual_weight)
    report = train_vae(args.shards, args.out, cfg, progress=not args.quiet)
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in report.items()}))
    print(f"tokenizer: {Path(args.out) / 'tokenizer.yaml'} (diffusers AutoencoderKL in {Path(args.out) / 'vae'})")
    return 0


# --------------------------------------------------------------------------- train


def runs_preflight(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> bool:
    """Whether this ``mmtrain train`` process runs the preflight: not with ``--skip-preflight`` (the
    batch script ran it already), and of the ranks of one start (``--srun`` tasks, or processes
    with ``RANK`` set) only rank 0: the others wait for it at the rendezvous."""
    if args.skip_preflight:
        return False
    rank = env.get("SLURM_PROCID", "0") if args.srun else env.get("RANK", "0")
    return int(rank) == 0


def cmd_train(args: argparse.Namespace) -> int:
    from mmtrain.launch.preflight import preflight

    if args.preflight_only:
        preflight(args.config, args.overrides)
        return 0
    cfg = preflight(args.config, args.overrides) if runs_preflight(args) else load_config(args.config, args.overrides)
    if args.srun:  # one task of an srun step (slurm/train.sbatch): the rank comes from Slurm's variables
        from submitit.slurm.slurm import SlurmJobEnvironment

        from mmtrain.launch.job import rendezvous_env

        os.environ.update(rendezvous_env(SlurmJobEnvironment()))
    if "RANK" in os.environ:  # already one rank (torchrun, srun, mmtrain launch)
        from mmtrain.train import exit_rank, main as train_main

        exit_rank(train_main([args.config, *args.overrides]))
    from mmtrain.launch.local import torchrun

    return torchrun(cfg.train.nproc_per_node, ["mmtrain.train", args.config, *args.overrides])


# --------------------------------------------------------------------------- launch

# flag of `mmtrain launch` -> key of the launch section (mmtrain.launch.config.LaunchConfig)
_LAUNCH_FLAGS = ("cluster", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "partition", "account", "qos",
                 "constraint", "mem", "time", "max_timeouts", "job_name")


def cmd_launch(args: argparse.Namespace) -> int:
    from mmtrain.launch.preflight import preflight
    from mmtrain.launch.submit import fit_to_cluster, outcome, render_sbatch, run_debug, submit, tasks_per_node, wait
    from mmtrain.schema import option_overrides

    flags = {k: getattr(args, k) for k in _LAUNCH_FLAGS} | {"exclusive": True if args.exclusive else None}
    overrides = [*args.overrides, *option_overrides("launch", flags)]
    # on Slurm the ranks run on compute nodes: their disks, not this host's, bound the shard cache
    cfg = preflight(args.config, overrides, on_this_node=load_config(args.config, overrides).launch.cluster != "slurm")
    launch = cfg.launch
    for note in fit_to_cluster(launch, cfg.train.nproc_per_node, cfg.data.num_workers):
        log.info("%s", note)
    if args.dry_run:
        if launch.cluster == "slurm":
            print(render_sbatch(launch, cfg.train.run_dir, cfg.train.nproc_per_node, cfg.data.num_workers), end="")
        else:
            print(f"{launch.cluster}: 1 node x {tasks_per_node(launch, cfg.train.nproc_per_node)} ranks, "
                  f"time limit {launch.timeout_min} min, run dir {cfg.train.run_dir}")
        return 0
    job = submit(cfg, args.config)
    run_dir = cfg.train.run_dir
    print(f"submitted job {job.job_id} ({launch.cluster}: {launch.nodes} node(s) x "
          f"{tasks_per_node(launch, cfg.train.nproc_per_node)} ranks, {launch.gpus} GPU(s) per node) for {run_dir}")
    print(f"logs: {run_dir}/logs/{job.job_id}/   status: mmtrain jobs {run_dir}", flush=True)
    if launch.cluster == "debug":  # runs here, now
        finished, line = run_debug(job)
    elif args.wait:
        finished, line = outcome(wait(run_dir, job.job_id, launch.cluster, poll_s=args.poll_s,
                                      echo=lambda m: print(m, flush=True)))
    else:
        return 0
    print(line, file=sys.stdout if finished else sys.stderr, flush=True)
    return 0 if finished else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    import time

    from mmtrain.components.checkpoint import latest_tag
    from mmtrain.launch.registry import MEANINGS, job_table, registry_path

    if Path(args.run_dir).is_file() or args.print_run_dir:  # a config and its overrides: the run dir they name
        named = str(load_config(args.run_dir, args.overrides).train.run_dir).strip()
        if not named:
            raise ConfigError(f"{args.run_dir}: not set: train.run_dir (in the file or as a key=value override)")
        run_dir = Path(named)
        if args.print_run_dir:
            print(run_dir)
            return 0
    elif args.overrides:
        raise ValueError(f"{args.run_dir}: key=value overrides follow a config file, not a run directory")
    else:
        run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    rows = job_table(run_dir)
    if not rows:
        print(f"no jobs recorded in {registry_path(run_dir)} (jobs of `mmtrain launch` are recorded when submitted, "
              "those of `sbatch slurm/train.sbatch` when they start)")
    else:
        print(f"{'JOB':<12} {'CLUSTER':<8} {'STATE':<10} {'STARTS':>6} {'LAST STEP':>9}  SUBMITTED            LOGS")
        for r in rows:
            step = "-" if r["last_step"] is None else str(r["last_step"])
            # a job of slurm/train.sbatch records no submission
            submitted = r["submitted"] or ("sbatch" if r["starts"] and r["cluster"] == "slurm" else "-")
            print(f"{r['job_id']:<12} {r['cluster']:<8} {r['state']:<10} {r['starts']:>6} {step:>9}  "
                  f"{submitted:<20} {r.get('logs') or '-'}")
        for state in dict.fromkeys(r["state"] for r in rows):
            if state in MEANINGS:
                print(f"  {state}: {MEANINGS[state]}")
        for r in rows:
            if r["state"] == "FAILED" and r["error"]:
                print(f"  job {r['job_id']} failed: {r['error'].strip().splitlines()[-1][:300]}")
            if r["logged"] is not None:
                ago = time.time() - r["logged"].get("time", time.time())
                print(f"  job {r['job_id']}: last logged step {r['logged']['step']}, {_duration(ago)} ago "
                      f"({run_dir / 'metrics.jsonl'})")
    try:
        tag = latest_tag(run_dir)
    except FileNotFoundError as exc:  # a damaged `latest`: the jobs above are still worth reading
        print(f"latest checkpoint: {exc}")
        return 0
    planned = load_config(run_dir / "config.yaml").train.steps if (run_dir / "config.yaml").is_file() else None
    print(f"latest checkpoint: {tag or 'none'}" + (f" (of {planned} planned steps)" if tag and planned else ""))
    return 0


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


# --------------------------------------------------------------------------- inference


def _sample_cfg(run, overrides: list[str]):
    """The run's sample section with ``--set`` overrides (``ar_steps=8`` or ``sample.ar_steps=8``)."""
    from mmtrain.schema import override_section

    return override_section(run.cfg.sample, "sample", overrides)


def cmd_sample(args: argparse.Namespace) -> int:
    from mmtrain.inference import generate_images, image_grid, load_run

    run = load_run(args.run_dir, args.step, weights=args.weights, device=args.device, dtype=args.dtype)
    sample = _sample_cfg(run, args.overrides)
    conditions = _conditions(run, args)
    conditions = [c for c in conditions for _ in range(args.num_per_prompt)]
    images = generate_images(run, conditions, sample)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, [str(c) for c in conditions], cols=args.num_per_prompt, scale=3).save(out)
    print(f"wrote {len(images)} samples to {out} (step {run.step}, {sample.ar_steps} AR steps, cfg {sample.cfg_scale})")
    return 0


def _conditions(run, args: argparse.Namespace) -> list:
    """--prompt for text models, --class for class-conditional ones."""
    if run.cfg.model.condition == "class":
        if not args.label:
            raise ValueError("this model is class-conditional: give --class LABEL (repeatable)")
        return list(args.label)
    if not args.prompt:
        raise ValueError("give --prompt TEXT (repeatable)")
    return list(args.prompt)


def cmd_generate(args: argparse.Namespace) -> int:
    import io

    from PIL import Image

    from mmtrain.data.documents import Document, DocImage, read_document_file, write_document_file
    from mmtrain.inference import continue_documents, load_run
    from mmtrain.models.document_sampling import GenerationLimits

    for name in ("max_images", "max_text_tokens", "max_segments", "batch_size"):
        if getattr(args, name) < (0 if name == "max_images" else 1):
            raise ValueError(f"--{name.replace('_', '-')}: expected >= {0 if name == 'max_images' else 1}, got {getattr(args, name)}")
    docs = [read_document_file(path) for path in args.doc]
    run = load_run(args.run_dir, args.step, weights=args.weights, device=args.device, dtype=args.dtype)
    sample = _sample_cfg(run, args.overrides)
    prompts = [[seg if isinstance(seg, str) else Image.open(io.BytesIO(seg.data)).convert("RGB") for seg in doc.segments]
               for doc in docs]
    plan = tuple(k.strip() for k in args.plan.split(",") if k.strip()) if args.plan else ()
    limits = GenerationLimits(max_images=args.max_images, max_text_tokens=args.max_text_tokens, max_segments=args.max_segments,
                              plan=plan)
    generated = continue_documents(run, prompts, sample, limits, top_p=args.top_p, temperature=args.temperature,
                                   batch_size=args.batch_size)
    out = Path(args.out)
    names = set()
    for path, doc, new in zip(args.doc, docs, generated):
        segments = list(doc.segments)
        for seg in new:
            if isinstance(seg, str):
                segments.append(seg)
            else:
                buf = io.BytesIO()
                seg.save(buf, format="PNG")
                segments.append(DocImage(buf.getvalue(), "png", {"generated": True}))
        name = Path(path).stem
        while name in names:
            name += "_"
        names.add(name)
        meta = {**doc.meta, "prompt_segments": len(doc.segments), "checkpoint_step": run.step}
        write_document_file(Document(doc.key, segments, meta), out / f"{name}.json")
        said = " | ".join(f"<image {k}>" if not isinstance(s, str) else repr(s) for k, s in enumerate(new))
        print(f"{out / (name + '.json')}: +{len(new)} segment(s): {said}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from PIL import Image

    from mmtrain.inference import edit_image, image_grid, load_run, region_token_mask

    run = load_run(args.run_dir, args.step, weights=args.weights, device=args.device, dtype=args.dtype)
    sample = _sample_cfg(run, args.overrides)
    try:
        image = Image.open(args.image).convert("RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{args.image}: cannot read image ({exc})") from None
    box = tuple(float(v) for v in args.region.split(","))
    if len(box) != 4:
        raise ValueError(f"--region {args.region!r}: expected x0,y0,x1,y1 as fractions of the image")
    region = region_token_mask(run, box)
    if args.outpaint:
        region = ~region
    condition = _conditions(run, args)[0]
    images = edit_image(run, image, region, condition, sample, num=args.num)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = images[0].size
    image_grid([image.resize(size)] + images, ["input"] + [str(condition)] * len(images), cols=len(images) + 1, scale=3).save(out)
    kept = int((~region).sum())
    print(f"wrote {len(images)} edits to {out} ({kept}/{region.numel()} tokens kept as context, {sample.ar_steps} AR steps)")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    import itertools

    from PIL import Image

    from mmtrain.data.sources import iter_samples
    from mmtrain.inference import caption_images, load_run

    run = load_run(args.run_dir, args.step, weights=args.weights, device=args.device, dtype=args.dtype)
    sample = _sample_cfg(run, args.overrides)
    if args.shards:
        items = [(s["key"], s["image"]) for s in itertools.islice(iter_samples(args.shards), args.num)]
    else:
        items = []
        for path in args.images:
            try:
                items.append((path, Image.open(path).convert("RGB")))
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path}: cannot read image ({exc})") from None
    if not items:
        raise ValueError("nothing to caption: give image files or --shards")
    captions = caption_images(run, [im for _, im in items], sample, top_p=args.top_p)
    for (name, _), caption in zip(items, captions):
        print(f"{name}\t{caption}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from mmtrain.convert import convert_causalfusion_official, convert_transdiff_official

    common = dict(image_downsample=args.image_downsample, image_tokenizer=args.image_tokenizer, scale_factor=args.scale_factor)
    if args.source == "transdiff-official":
        out = convert_transdiff_official(args.checkpoint, args.out, num_heads=args.num_heads, buffer_size=args.buffer_size, **common)
    else:
        out = convert_causalfusion_official(args.checkpoint, args.out, patch_size=args.patch_size, **common)
    print(f"converted {args.checkpoint} -> {out}/model.safetensors + config.yaml")
    return 0


def cmd_convert_hf(args: argparse.Namespace) -> int:
    from mmtrain.config import Config
    from mmtrain.convert import convert_hf_llm

    cfg = load_config(args.config, args.overrides) if args.config else Config()
    out, done = convert_hf_llm(args.llm_dir, args.out, cfg)
    print(f"converted {args.llm_dir} -> {out}: {done['tensors']} tensors, {done['added_rows']} new token rows (mean-initialised); "
          f"model.safetensors + config.yaml + tokenizer/text_hf")
    return 0


def cmd_convert_vae(args: argparse.Namespace) -> int:
    from mmtrain.tokenize.convert_vae import KNOWN_ARCHES, load_ldm_vae, save_diffusers

    vae = load_ldm_vae(args.checkpoint, KNOWN_ARCHES[args.arch], trust_pickle=args.trust_pickle)
    print(f"converted {args.checkpoint} ({args.arch}) -> diffusers AutoencoderKL in {save_diffusers(vae, args.out)}")
    return 0


# --------------------------------------------------------------------------- eval


def _without_option(argv: list[str], option: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    """eval caption / eval generate: on --nproc ranks (torchrun), or on the ranks that started us."""
    if args.nproc > 1 and "RANK" not in os.environ:
        from mmtrain.launch.local import torchrun

        # the arguments travel in MMTRAIN_ARGV: torchrun's parser would take --num for an abbreviation of its options
        return torchrun(args.nproc, ["mmtrain.cli"], {"MMTRAIN_ARGV": json.dumps(_without_option(args.argv, "--nproc"))})
    from mmtrain.eval.ranks import init_ranks
    from mmtrain.eval.samples import open_eval_set
    from mmtrain.inference import load_run
    from mmtrain.schema import option_overrides, override_section
    from mmtrain.train import exit_rank

    ranks = init_ranks()
    run = load_run(args.run_dir, args.step, weights=args.weights, device=args.device, dtype=args.dtype)
    sample = _sample_cfg(run, [o for o in args.overrides if not o.startswith("eval.")])
    options = {"num_samples": args.num, "shards": args.shards, "cfg_scales": getattr(args, "cfg", None),
               "ar_steps": getattr(args, "ar_steps", None)}
    eval_cfg = override_section(run.cfg.eval, "eval", [*(o for o in args.overrides if o.startswith("eval.")),
                                                        *option_overrides("eval", options)])
    data = run.cfg.data

    def open_set(num: int):
        return open_eval_set(eval_cfg.shards or data.val_shards, args.coco_annotations, args.coco_images, num,
                             data.image_size, data.resize_mode)

    out = args.out or str(Path(args.run_dir) / "eval" / f"step{run.step:08d}" / args.eval_kind)
    if args.eval_kind == "caption":
        from mmtrain.eval.captioning import evaluate_captions as evaluate
    else:
        from mmtrain.eval.generation import evaluate_generation as evaluate
    report = evaluate(run, open_set, eval_cfg, sample, out, ranks, weights=args.weights)
    if report is not None:
        print(f"report: {report['files']['report']}  metrics: {report['files']['metrics']}")
    if ranks.world_size > 1:
        ranks.barrier()
        exit_rank(0)
    return 0


def cmd_eval_documents(args: argparse.Namespace) -> int:
    from mmtrain.eval.documents import evaluate_stories, table_rows
    from mmtrain.eval.report import print_table
    from mmtrain.inference import load_run

    run = load_run(args.run_dir, args.step, weights=args.weights, device=args.device, dtype=args.dtype)
    sample = _sample_cfg(run, args.overrides)
    out = args.out or str(Path(args.run_dir) / "eval" / f"step{run.step:08d}" / "documents")
    result = evaluate_stories(run, args.shards, sample, out, num=args.num, held_out=args.held_out, batch_size=args.batch_size)
    rows = table_rows(result)
    print_table(f"shape stories, step {run.step}", list(rows[0]), rows)
    print(f"metrics: {result['files']['metrics']}")
    return 0


def cmd_eval_text(args: argparse.Namespace) -> int:
    from mmtrain.eval.text import evaluate_text
    from mmtrain.inference import load_run

    run = load_run(args.run_dir, args.step, weights=args.weights, device=args.device, dtype=args.dtype)
    out = args.out or str(Path(args.run_dir) / "eval" / "text" / Path(args.file).stem)
    m = evaluate_text(run, args.file, out, max_len=args.max_len, batch_size=args.batch_size)
    print(f"text {args.file}, step {run.step}: {m['lines']} lines, {m['tokens_scored']} tokens scored, "
          f"mean NLL {m['mean_nll']:.4f} nats/token, perplexity {m['perplexity']:.3f}  metrics: {m['files']['metrics']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mmtrain.export import export_run

    if bool(args.out) == bool(args.hf):
        raise SystemExit("mmtrain export: give --out DIR (the multimodal model) or --hf DIR (its language model)")
    if args.hf:
        from mmtrain.inference import load_run
        from mmtrain.models.pretrained import export_hf

        if Path(args.hf).exists() and any(Path(args.hf).iterdir()) and not args.overwrite:
            raise FileExistsError(f"{args.hf} exists and is not empty; choose another --hf or pass --overwrite")
        run = load_run(args.run_dir, args.tag, weights=args.weights)
        out = export_hf(run.model.state_dict(), run.cfg.model, run.text_tok, args.hf)
        print(f"exported the language model of {args.run_dir} (step {run.step}, {run.checkpoint}) to {out}: config.json, "
              f"model.safetensors, tokenizer (AutoModelForCausalLM / AutoTokenizer load it)")
        return 0
    out = export_run(args.run_dir, args.out, args.tag, args.overwrite)
    info = json.loads((out / "export.json").read_text())
    print(f"exported {info['checkpoint']} (step {info['step']}) of {args.run_dir} to {out}: {', '.join(info['files'])}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mmtrain.demo import run_demo

    return run_demo(args.out, args.overrides, main)


# --------------------------------------------------------------------------- parser


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _count_or_auto(text: str):
    return "auto" if text.strip().lower() == "auto" else int(text)


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    """What every command that loads a trained model takes: sample overrides and the weights to use."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="sample (or eval.*) setting override, repeatable, e.g. --set ar_steps=8 --set eval.batch_size=32")
    parser.add_argument("--weights", choices=["auto", "ema", "model"], default="auto",
                        help="EMA or trained weights (auto: the EMA when the checkpoint has one)")
    parser.add_argument("--step", "--tag", dest="step", metavar="STEP",
                        help="the checkpoint to use, a step (100) or a tag (step00000100); default: the newest intact one")
    parser.add_argument("--device", default="auto",
                        help="where the model (and VAE, Inception, CLIP) runs: auto (this rank's GPU when CUDA is available, "
                             "else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="compute dtype; bf16/fp16 run under autocast with fp32 weights and diffusion chain")


def _add_prep_parsers(sub) -> None:
    """``mmtrain prep ...``: datasets into shards."""
    prep = sub.add_parser("prep", help="write datasets into webdataset or MDS shards")
    prep_sub = prep.add_subparsers(dest="source", required=True)
    syn = prep_sub.add_parser("synthetic", help="the embedded procedural shapes dataset (no download)")
    syn.add_argument("--out", required=True, help="output directory or URL (s3://, gs://: staged locally, then uploaded)")
    syn.add_argument("--num", type=int, required=True)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--image-size", type=int, default=32)
    syn.add_argument("--min-shapes", type=int, default=1)
    syn.add_argument("--max-shapes", type=int, default=2)
    syn.add_argument("--samples-per-shard", type=int, default=1000)
    syn.add_argument("--image-format", choices=["png", "jpg"], default="png")
    syn.add_argument("--hold-out", default="", help="attribute combinations kept out of the shards, e.g. "
                     "'red triangle,large blue circle': samples with a matching shape go to OUT/holdout instead")
    syn.add_argument("--documents", action="store_true", help="write shape stories instead: documents of 2-4 scenes "
                     "(1-3 shapes at first, --min/--max-shapes unused) with the change texts between them "
                     "(mmtrain.data.stories); always PNG")
    syn.add_argument("--hold-out-changes", default="", metavar="KIND[,KIND]", help="with --documents: stories with a "
                     "change of these kinds (move, appear, recolor, resize, disappear) go to OUT/holdout instead")
    syn.add_argument("--val-fraction", type=float, default=0.0, help="with --documents: share of stories in OUT/val")
    syn.add_argument("--quiet", action="store_true")
    from mmtrain.data.prep.cli import add_prep_subcommands, staged

    syn.set_defaults(func=staged(cmd_prep))

    add_prep_subcommands(prep_sub)  # folder, manifest, coco, wds (img2dataset), latents


def _add_tokenizer_parsers(sub) -> None:
    """``mmtrain tokenizer train | estimate-scale | train-vae``."""
    tok = sub.add_parser("tokenizer", help="train tokenizers")
    tok_sub = tok.add_subparsers(dest="what", required=True)
    tt = tok_sub.add_parser("train", help="train the sentencepiece text tokenizer on shard captions")
    tt.add_argument("--shards", action="append", default=[], help="webdataset (dir, .tar, brace pattern) or MDS dir, local or a URL; repeatable")
    tt.add_argument("--text", action="append", default=[], help="a text file with one caption per line; repeatable")
    tt.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.json")
    tt.add_argument("--vocab-size", type=int, default=256)
    tt.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    tt.add_argument("--max-sentences", type=int, default=1_000_000, help="sample cap: train on at most this many captions")
    tt.add_argument("--byte-fallback", action="store_true", help="unseen characters become UTF-8 byte pieces (vocab >= 262)")
    tt.add_argument("--character-coverage", type=float, default=1.0)
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--quiet", action="store_true")
    tt.set_defaults(func=cmd_tokenizer_train)
    es = tok_sub.add_parser("estimate-scale", help="measure an image tokenizer's latent scale (1/std) on shard images")
    es.add_argument("tokenizer_yaml", help="image tokenizer config, e.g. tokenizers/small_vae.yaml")
    es.add_argument("--shards", required=True)
    es.add_argument("--num", type=int, default=1024, help="images to encode")
    es.add_argument("--image-size", type=int, default=256)
    es.add_argument("--shift", action="store_true", help="also estimate a shift (the latent mean)")
    es.add_argument("--write", help="write a copy of the YAML with the measured scale_factor / shift_factor here")
    es.set_defaults(func=cmd_tokenizer_estimate_scale)
    tv = tok_sub.add_parser("train-vae", help="train a small KL autoencoder on your shards (reconstruction + KL)")
    tv.add_argument("--shards", required=True)
    tv.add_argument("--out", required=True, help="writes OUT/vae (diffusers) and OUT/tokenizer.yaml")
    tv.add_argument("--image-size", type=int, default=32)
    tv.add_argument("--steps", type=int, default=300)
    tv.add_argument("--batch-size", type=int, default=32)
    tv.add_argument("--lr", type=float, default=1e-3)
    tv.add_argument("--kl-weight", type=float, default=1e-6)
    tv.add_argument("--seed", type=int, default=0)
    tv.add_argument("--perceptual-weights", default="", help="local torchvision vgg16 state_dict for a perceptual term")
    tv.add_argument("--perceptual-weight", type=float, default=1.0)
    tv.add_argument("--quiet", action="store_true")
    tv.set_defaults(func=cmd_tokenizer_train_vae)


def _add_training_parsers(sub) -> None:
    """``mmtrain train``, ``launch`` and ``jobs``."""
    tr = sub.add_parser("train", help="train with DeepSpeed on this node's ranks (resumes from the run dir)")
    tr.add_argument("config")
    tr.add_argument("overrides", nargs="*", help="key.sub=value")
    tr.add_argument("--srun", action="store_true",
                    help="this process is one rank of an srun step (slurm/train.sbatch): rendezvous from SLURM_* variables; "
                         "only SLURM_PROCID 0 runs the preflight, the others wait for it at the rendezvous "
                         "(at most train.dist_timeout_s)")
    tr.add_argument("--preflight-only", action="store_true",
                    help="check config, data sources and tokenizer, then exit (slurm/train.sbatch runs this once per job)")
    tr.add_argument("--skip-preflight", action="store_true",
                    help="do not check again what --preflight-only checked (the tasks of slurm/train.sbatch)")
    tr.set_defaults(func=cmd_train)

    la = sub.add_parser("launch", help="submit training through submitit: Slurm, this machine (local) or in-process (debug)")
    la.add_argument("config")
    la.add_argument("overrides", nargs="*", help="key.sub=value")
    la.add_argument("--cluster", choices=["slurm", "local", "debug"])
    la.add_argument("--nodes", type=int)
    la.add_argument("--gpus-per-node", type=_count_or_auto,
                    help="GPUs per node, 0 = none; default auto: what the partition's nodes have (sinfo)")
    la.add_argument("--tasks-per-node", type=int, help="ranks per node (default: GPUs per node, or train.nproc_per_node)")
    la.add_argument("--cpus-per-task", type=int)
    la.add_argument("--partition")
    la.add_argument("--time", help="time limit per run of the job: HH:MM (hours:minutes), HH:MM:SS, D-HH:MM")
    la.add_argument("--account")
    la.add_argument("--qos")
    la.add_argument("--constraint")
    la.add_argument("--mem", help="memory per node, e.g. 400G")
    la.add_argument("--exclusive", action="store_true")
    la.add_argument("--max-timeouts", type=int, help="requeues after hitting the time limit (default 3)")
    la.add_argument("--job-name")
    la.add_argument("--dry-run", action="store_true", help="print the sbatch script (or the local plan); submit nothing")
    la.add_argument("--wait", action="store_true",
                    help="wait until the job runs no more, requeues included; exit 0 if it finished training "
                         "(debug always runs in this process)")
    la.add_argument("--poll-s", type=float, default=10.0, help="with --wait: seconds between looks at the job")
    la.set_defaults(func=cmd_launch)

    jo = sub.add_parser("jobs", help="a run's jobs (`mmtrain launch` and `sbatch slurm/train.sbatch`): id, state and what "
                                     "it means, starts, last step; latest checkpoint")
    jo.add_argument("run_dir", help="a run directory, or a config file with its key=value overrides (their train.run_dir)")
    jo.add_argument("overrides", nargs="*", help="key.sub=value, after a config file")
    jo.add_argument("--print-run-dir", action="store_true",
                    help="print the run directory of the config and overrides, and exit (slurm/train.sbatch)")
    jo.set_defaults(func=cmd_jobs)


def _add_inference_parsers(sub) -> None:
    """``mmtrain sample``, ``caption`` and ``edit``: commands on a trained model."""
    sa = sub.add_parser("sample", help="prompts (or class labels) -> PNG grid of generated images")
    sa.add_argument("run_dir", help="a training run directory or a converted model directory")
    sa.add_argument("--prompt", action="append", default=[])
    sa.add_argument("--class", dest="label", type=int, action="append", default=[], help="class label (class-conditional models)")
    sa.add_argument("--num-per-prompt", type=int, default=4)
    sa.add_argument("--out", default="samples.png")
    _add_inference_options(sa)
    sa.set_defaults(func=cmd_sample)

    ca = sub.add_parser("caption", help="images -> captions")
    ca.add_argument("run_dir")
    ca.add_argument("images", nargs="*")
    ca.add_argument("--shards", help="caption the first --num samples of these shards instead")
    ca.add_argument("--num", type=int, default=8)
    ca.add_argument("--top-p", type=float, default=0.0, help="0 = greedy")
    _add_inference_options(ca)
    ca.set_defaults(func=cmd_caption)

    ed = sub.add_parser("edit", help="zero-shot in-context editing: regenerate a region of an image under a new prompt/class")
    ed.add_argument("run_dir")
    ed.add_argument("image")
    ed.add_argument("--region", required=True, help="x0,y0,x1,y1 as fractions of the image, e.g. 0.5,0,1,1 = right half")
    ed.add_argument("--outpaint", action="store_true", help="regenerate everything outside the region instead")
    ed.add_argument("--prompt", action="append", default=[])
    ed.add_argument("--class", dest="label", type=int, action="append", default=[])
    ed.add_argument("--num", type=int, default=4, help="edits to draw")
    ed.add_argument("--out", default="edit.png")
    _add_inference_options(ed)
    ed.set_defaults(func=cmd_edit)

    ge = sub.add_parser("generate", help="interleaved generation: continue documents (text and images in; text and images out)")
    ge.add_argument("run_dir")
    ge.add_argument("--doc", action="append", required=True, metavar="DOC.json",
                    help="a document to continue, repeatable (one batch): {\"texts\": [...], \"images\": [...]} parallel "
                         "lists, one non-null per segment, images as paths relative to the JSON")
    ge.add_argument("--out", required=True, help="directory: one NAME.json per document (prompt + continuation) and its images")
    ge.add_argument("--max-images", type=int, default=1, help="images drawn per document at most (default 1)")
    ge.add_argument("--max-text-tokens", type=int, default=32, help="tokens per generated text span at most (default 32)")
    ge.add_argument("--max-segments", type=int, default=3, help="generated text spans and images per document at most (default 3)")
    ge.add_argument("--plan", default="", metavar="KIND[,KIND]",
                    help="the segments to generate, e.g. text,image,text or image (the caller decides where images go; "
                         "--max-images/--max-segments then follow it); default: the model decides, within the limits")
    ge.add_argument("--top-p", type=float, default=0.0, help="text: nucleus sampling mass, 0 = greedy")
    ge.add_argument("--temperature", type=float, default=1.0)
    ge.add_argument("--batch-size", type=int, default=8, help="documents per KV-cached batch")
    _add_inference_options(ge)
    ge.set_defaults(func=cmd_generate)


def _add_convert_parsers(sub) -> None:
    """``mmtrain convert ...``: checkpoints of other code bases."""
    cv = sub.add_parser("convert", help="import checkpoints from other code bases")
    cv_sub = cv.add_subparsers(dest="source", required=True)
    cfo = cv_sub.add_parser("causalfusion-official", help="official CausalFusion .pt (state_dict or training dict with 'ema')")
    cfo.add_argument("checkpoint")
    cfo.add_argument("out", help="output model directory (model.safetensors + config.yaml)")
    cfo.add_argument("--patch-size", type=int, default=1, help="latent patch size (released models: 1)")
    cfo.add_argument("--image-downsample", type=int, default=16, help="image pixels per latent pixel (MAR KL-16: 16)")
    cfo.add_argument("--image-tokenizer", default="mar_kl16", help="tokenizer.image.kind written into config.yaml")
    cfo.add_argument("--scale-factor", type=float, default=0.2325, help="latent scale (official sampler: 0.2325)")
    cfo.set_defaults(func=cmd_convert)
    tdo = cv_sub.add_parser("transdiff-official", help="official TransDiff .pth ({'model': state_dict}, e.g. zhendch/Transdiff)")
    tdo.add_argument("checkpoint")
    tdo.add_argument("out", help="output model directory (model.safetensors + config.yaml)")
    tdo.add_argument("--num-heads", type=int, default=0, help="attention heads; 0 = the released sizes' (B 12, L 16, H 16)")
    tdo.add_argument("--buffer-size", type=int, default=64, help="class buffer slots of an MRAR model (official 64)")
    tdo.add_argument("--image-downsample", type=int, default=16, help="image pixels per latent pixel (MAR KL-16: 16)")
    tdo.add_argument("--image-tokenizer", default="mar_kl16", help="tokenizer.image.kind written into config.yaml")
    tdo.add_argument("--scale-factor", type=float, default=0.2325, help="latent scale (official sampler: 0.2325)")
    tdo.set_defaults(func=cmd_convert)
    chf = cv_sub.add_parser("hf", help="a local Hugging Face LLaMA / Mistral / Qwen2 / Qwen3 checkpoint -> CausalFusion "
                                        "on the LLaMA backbone (model dir)")
    chf.add_argument("llm_dir", help="a local directory: config.json, *.safetensors, the tokenizer (nothing is downloaded)")
    chf.add_argument("out", help="output model directory (model.safetensors + config.yaml + tokenizer/text_hf)")
    chf.add_argument("--config", default="", help="a run config for the image side (data.image_size, tokenizer.image, "
                                                  "model.patch_size ...); default: mmtrain's defaults")
    chf.add_argument("overrides", nargs="*", help="key.sub=value overrides of --config")
    chf.set_defaults(func=cmd_convert_hf)
    cvv = cv_sub.add_parser("vae", help="original LDM / MAR KL-VAE checkpoint -> diffusers AutoencoderKL folder")
    cvv.add_argument("checkpoint", help=".ckpt / .pt / .pth / .safetensors")
    cvv.add_argument("out", help="output folder (use it as tokenizer.image.path)")
    cvv.add_argument("--arch", choices=["mar_kl16", "sd_vae"], required=True)
    cvv.add_argument("--trust-pickle", action="store_true", help="allow non-tensor pickled objects in the checkpoint")
    cvv.set_defaults(func=cmd_convert_vae)


def _add_eval_parsers(sub) -> None:
    """``mmtrain eval caption | generate | documents | text``."""
    ev = sub.add_parser("eval", help="evaluate captioning or generation: metrics.json + report.html")
    ev_sub = ev.add_subparsers(dest="eval_kind", required=True)
    evc = ev_sub.add_parser("caption", help="BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap); attribute accuracy on synthetic data")
    evg = ev_sub.add_parser("generate", help="FID/sFID, IS, KID, precision/recall, CLIP score, attribute accuracy; CFG x AR-steps sweep")
    for p_ in (evc, evg):
        p_.add_argument("run_dir", help="a run directory or a model directory (mmtrain export / convert)")
        p_.add_argument("--shards", help="eval shards, webdataset or MDS, local or a URL (default: eval.shards, else data.val_shards)")
        p_.add_argument("--coco-annotations", default="", help="COCO captions_*.json instead of shards")
        p_.add_argument("--coco-images", default="", help="the folder of the images --coco-annotations names")
        p_.add_argument("--num", type=int, help="samples to evaluate (eval.num_samples)")
        p_.add_argument("--out", help="report directory (default: RUN_DIR/eval/stepN/caption|generate)")
        p_.add_argument("--nproc", type=int, default=1, help="ranks on this machine (torchrun); batches are split across them")
        _add_inference_options(p_)
        p_.set_defaults(func=cmd_eval)
    evd = ev_sub.add_parser("documents", help="shape stories: draw the next scene from a change, tell the change from two "
                                               "scenes; per k and change kind, held-out kinds apart")
    evd.add_argument("run_dir", help="a run directory or a model directory")
    evd.add_argument("--shards", required=True, help="story shards (`mmtrain prep synthetic --documents`), e.g. OUT/val")
    evd.add_argument("--held-out", default="", help="the held-out stories (OUT/holdout/train), scored apart")
    evd.add_argument("--num", type=int, default=0, help="stories per split at most (0 = all)")
    evd.add_argument("--batch-size", type=int, default=16, help="documents per KV-cached batch")
    evd.add_argument("--out", help="report directory (default: RUN_DIR/eval/stepN/documents)")
    _add_inference_options(evd)
    evd.set_defaults(func=cmd_eval_documents)
    evt = ev_sub.add_parser("text", help="negative log-likelihood and perplexity of a text file (one document per line)")
    evt.add_argument("run_dir", help="a run directory or a model directory")
    evt.add_argument("--file", required=True, help="UTF-8 text, one document per line (blank lines skipped)")
    evt.add_argument("--out", help="report directory (default: RUN_DIR/eval/text/<file stem>)")
    evt.add_argument("--max-len", type=int, help="tokens per window at most (default and cap: the model's text positions)")
    evt.add_argument("--batch-size", type=int, default=16, help="windows per forward")
    evt.add_argument("--weights", choices=["auto", "ema", "model"], default="auto",
                     help="EMA or trained weights (auto: the EMA when the checkpoint has one)")
    evt.add_argument("--step", "--tag", dest="step", metavar="STEP",
                     help="the checkpoint to use, a step (100) or a tag (step00000100); default: the newest intact one")
    evt.add_argument("--device", default="auto", help="auto (this rank's GPU when CUDA is available, else cpu), cpu, cuda, cuda:N")
    evt.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="compute dtype (autocast; weights stay fp32)")
    evt.set_defaults(func=cmd_eval_text)
    evg.add_argument("--cfg", type=_float_list, help="CFG scales to sweep, e.g. 1,2,4 (eval.cfg_scales)")
    evg.add_argument("--ar-steps", type=_int_list, help="AR step counts to sweep, e.g. 1,4,16 (eval.ar_steps)")


def _add_export_and_demo_parsers(sub) -> None:
    """``mmtrain export`` and ``demo``."""
    ex = sub.add_parser("export", help="a run's ZeRO checkpoint -> model dir (model/EMA safetensors + config + tokenizer)")
    ex.add_argument("run_dir")
    ex.add_argument("--out", help="output model directory")
    ex.add_argument("--hf", help="instead: write the language model (model.backbone=llama) as a Hugging Face checkpoint here")
    ex.add_argument("--weights", choices=["auto", "ema", "model"], default="auto",
                    help="--hf: EMA or trained weights (auto: the EMA when the checkpoint has one)")
    ex.add_argument("--step", "--tag", dest="tag", metavar="STEP",
                    help="checkpoint to export, a step (1000) or a tag (step00001000); default: the newest intact one")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ex.set_defaults(func=cmd_export)

    de = sub.add_parser("demo", help="data -> tokenizer -> train -> sample/caption -> eval, on the embedded dataset")
    de.add_argument("--out", default="demo_out")
    de.add_argument("overrides", nargs="*", help="config overrides for the demo run")
    de.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmtrain", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_prep_parsers, _add_tokenizer_parsers, _add_training_parsers, _add_inference_parsers, _add_convert_parsers,
                _add_eval_parsers, _add_export_and_demo_parsers):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s")
    if argv is None and len(sys.argv) == 1 and "MMTRAIN_ARGV" in os.environ:  # a rank started by cmd_eval through _torchrun
        argv = json.loads(os.environ.pop("MMTRAIN_ARGV"))
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if extra:
        # `launch CONFIG --nodes 2 key=value`: overrides may follow the options
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from mmtrain.data.cache import CacheFullError
    from mmtrain.data.storage import TransientIOError
    from mmtrain.launch.submit import SubmissionError

    try:
        return int(args.func(args) or 0)
    # TokenizerMismatchError is a ValueError; PermissionError / TransientIOError: a store refused or kept failing
    except (ConfigError, FileNotFoundError, FileExistsError, PermissionError, TransientIOError, CacheFullError,
            SubmissionError, ValueError) as exc:
        print(f"mmtrain {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
