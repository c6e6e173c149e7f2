"""DeepSpeed checkpoints of a run: save, keep-last-K, resume (also on another world size),
and consolidated loading on one process.

Layout of ``<run_dir>/checkpoints/``::

    step00000100/                  one complete checkpoint
        *_model_states.pt, *_optim_states.pt   DeepSpeed's sharded files (+ our client state)
        ema/rank00000.safetensors  this rank's EMA shard (see mmtrain.components.ema)
        rng/rank00000.pt           torch / numpy / python (/ CUDA) RNG states of each rank
        meta.json                  step, samples seen, world size, ZeRO stage, loader state
        manifest.json              every file above with its size, written last (see verify)
        config.yaml, tokenizer/    the resolved config and the run's tokenizer files
    latest                         names the newest complete checkpoint
    universal-step00000100/        DeepSpeed universal checkpoint, made when resuming on
                                   another world size (by rank 0, before the ranks join the
                                   process group; see make_universal)

``latest`` is written by rank 0 only after every rank finished writing (DeepSpeed's own
``latest`` can be written before other ranks are done) and is replaced atomically, so a
process killed mid-save leaves it naming the previous checkpoint; the next start deletes
the unfinished directory.

A checkpoint damaged later (a file deleted or cut short, ``meta.json`` gone, the folder named
by ``latest`` gone) is found by :func:`verify` against its manifest; :func:`select_checkpoint`
then resumes (or samples, exports) from the newest intact one, and :func:`set_aside` moves the
damaged ones to ``checkpoints/damaged/`` before the run saves that step again.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmtrain import distributed
from mmtrain.atomic import atomic_write_bytes, atomic_write_text
from mmtrain.errors import ConfigError

log = logging.getLogger("mmtrain.checkpoint")

UNIVERSAL_PREFIX = "universal-"


@dataclass
class CheckpointConfig:
    """When to checkpoint and what to keep.

    Args:
        every_steps: save every N optimizer steps (and always at the end). Default 100.
        keep_last: complete checkpoints kept; older ones are deleted. Default 3.
    """

    every_steps: int = 100
    keep_last: int = 3

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.keep_last < 1:
            raise ConfigError("checkpoint.every_steps and checkpoint.keep_last must be >= 1")


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    return int(tag[len("step"):])


def latest_tag(run_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint's tag, or None for a fresh run."""
    path = checkpoint_root(run_dir) / "latest"
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (checkpoint_root(run_dir) / tag).is_dir():
        raise FileNotFoundError(f"{path} names checkpoint {tag!r}, but {checkpoint_root(run_dir) / tag} is missing")
    return tag


def _rank_world() -> tuple[int, int]:
    return distributed.rank(), distributed.world_size()



# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save


def save(engine, run_dir: str | os.PathLike, step: int, state: dict, keep_last: int, ema=None) -> str:
    """Collective: every rank must call it. ``state`` (step, samples_seen, config, loader,
    ...) is stored as DeepSpeed client state under the ``mmtrain`` key and as ``meta.json``."""
    rank, world = _rank_world()
    root = checkpoint_root(run_dir)
    tag = tag_for_step(step)
    ckpt = root / tag
    engine.save_checkpoint(str(root), tag=tag, client_state={"mmtrain": state}, save_latest=False)
    (ckpt / "rng").mkdir(exist_ok=True)
    tmp = ckpt / "rng" / f".rank{rank:05d}.pt.tmp"
    torch.save(rng_state(), tmp)
    os.replace(tmp, ckpt / "rng" / f"rank{rank:05d}.pt")
    if ema is not None:
        ema.save(ckpt)
    if rank == 0:
        _copy_run_files(Path(run_dir), ckpt)
        meta = {k: state[k] for k in ("step", "samples_seen", "world_size", "zero_stage", "loader") if k in state}
        atomic_write_text(ckpt / "meta.json", json.dumps(meta, indent=1))
    distributed.barrier()  # every rank's files are on disk
    # each rank lists what it sees: its own files with their true sizes, also where another node's view is stale (NFS)
    seen = distributed.gather_objects(file_sizes(ckpt))
    if rank == 0:
        write_manifest(ckpt, seen)
        atomic_write_text(root / "latest", tag)
        _prune(root, keep_last)
    distributed.barrier()
    return tag


def _copy_run_files(run_dir: Path, ckpt: Path) -> None:
    """The resolved config and the tokenizer travel with each checkpoint."""
    if (run_dir / "config.yaml").is_file():
        atomic_write_bytes(ckpt / "config.yaml", (run_dir / "config.yaml").read_bytes())
    if (run_dir / "tokenizer").is_dir():
        # its files, and those of its folders (a Hugging Face tokenizer is tokenizer/text_hf/)
        for file in sorted((run_dir / "tokenizer").rglob("*")):
            if file.is_file() and not file.name.startswith("."):
                atomic_write_bytes(ckpt / file.relative_to(run_dir), file.read_bytes())


def _prune(root: Path, keep_last: int) -> None:
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
    for old in tags[:-keep_last]:
        shutil.rmtree(root / old, ignore_errors=True)
    for uni in root.glob(UNIVERSAL_PREFIX + "*"):
        if uni.name[len(UNIVERSAL_PREFIX):] not in tags[-keep_last:]:
            shutil.rmtree(uni, ignore_errors=True)


def discard_incomplete(run_dir: str | os.PathLike) -> list[str]:
    """Delete checkpoint directories newer than ``latest``: saves that a killed process left
    unfinished. Rank 0 only, before any rank reads checkpoints."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    latest = latest_tag(run_dir)
    newest_complete = step_of(latest) if latest else -1
    removed = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and d.name.startswith("step") and d.name[4:].isdigit() and step_of(d.name) > newest_complete:
            shutil.rmtree(d)
            removed.append(d.name)
    for leftover in root.glob(f".{UNIVERSAL_PREFIX}*"):  # an interrupted universal conversion
        shutil.rmtree(leftover, ignore_errors=True)
    if removed:
        log.warning("removed unfinished checkpoint(s) %s (a save was interrupted); resuming from %s", removed, latest)
    return removed


# --------------------------------------------------------------------------- damage: verify, choose, set aside

MANIFEST = "manifest.json"
DAMAGED_DIR = "damaged"
SET_ASIDE_DIR = "set_aside"
_APPLIED = "resume_from.applied"


class CheckpointError(ValueError):
    """No checkpoint to use (none intact, or the requested one is missing or damaged); the message
    is one line that says what to do. A ``ValueError``: the commands print it without a traceback."""


def file_sizes(ckpt: Path) -> dict[str, int]:
    return {str(f.relative_to(ckpt)): f.stat().st_size for f in sorted(ckpt.rglob("*"))
            if f.is_file() and f.name != MANIFEST and not f.name.endswith(".tmp")}


def write_manifest(ckpt: Path, seen: list[dict[str, int]] | None = None) -> None:
    """Rank 0, once every rank's files are on disk: every file of the checkpoint with its size, from
    what each rank saw (``seen``; a file's writer sees its full size, so the largest is taken)."""
    files: dict[str, int] = {}
    for sizes in seen or [file_sizes(ckpt)]:
        for name, size in sizes.items():
            files[name] = max(size, files.get(name, 0))
    atomic_write_text(ckpt / MANIFEST, json.dumps({"files": dict(sorted(files.items()))}, indent=1))


def _expected_deepspeed_files(ckpt: Path, meta: dict) -> list[str]:
    """What a checkpoint without a manifest (saved before manifests existed) must hold."""
    world, stage = int(meta.get("world_size", 1)), int(meta.get("zero_stage", 0))
    missing = []
    if stage == 3:
        have = {_rank_of_optim_file(f) for f in ckpt.glob("zero_pp_rank_*_mp_rank_*_model_states.pt")}
        missing += [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world) if r not in have]
    elif not (ckpt / "mp_rank_00_model_states.pt").is_file():
        missing.append("mp_rank_00_model_states.pt")
    if stage > 0:
        have = {_rank_of_optim_file(f) for f in ckpt.glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt")}
        missing += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world) if r not in have]
    return missing


def verify(ckpt_dir: str | os.PathLike) -> str:
    """What is wrong with a checkpoint folder, in a few words; "" when it is intact: every file its
    manifest lists is there with its size (or, saved before manifests, ``meta.json`` and the
    DeepSpeed files of its world size and ZeRO stage are there)."""
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        return "its folder is missing"
    if not (ckpt / "meta.json").is_file():
        return "meta.json is missing"
    manifest = ckpt / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MANIFEST} is unreadable"
        missing = [name for name in files if not (ckpt / name).is_file()]
        if missing:
            return _missing(missing)
        for name, size in files.items():
            if (ckpt / name).stat().st_size != size:
                return f"{name} has {(ckpt / name).stat().st_size} bytes, {size} were written"
        return ""
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except ValueError:
        return "meta.json is unreadable"
    missing = _expected_deepspeed_files(ckpt, meta)
    return _missing(missing) if missing else ""


def _missing(names: list[str]) -> str:
    more = f" and {len(names) - 3} more files" if len(names) > 3 else ""
    return f"{', '.join(names[:3])}{more} missing"


def parse_step(value: str | int | None, option: str = "--step ") -> str | None:
    """``20``, ``"20"`` or ``"step00000020"`` -> ``"step00000020"``; None or "" -> None (the newest intact)."""
    if value is None or value == "":
        return None
    text = str(value).strip()
    digits = text[len("step"):] if text.startswith("step") else text
    if not digits.isdigit():
        raise CheckpointError(f"{option}{value}: expected a step number (e.g. 100) or a checkpoint tag (e.g. step00000100)")
    return tag_for_step(int(digits))


@dataclass
class Selection:
    """The checkpoint to use (None: the run has none yet), the damaged checkpoints newer than it
    (tag -> what is wrong) and, when an older step was asked for, the intact ones newer than it."""

    tag: str | None
    damaged: dict
    newer: list
    requested: bool = False

    def warning(self, option: str) -> str:
        """One line naming each damaged checkpoint newer than the one used, or "" when there is none."""
        if not self.damaged:
            return ""
        bad = "; ".join(f"{tag} is damaged ({why})" for tag, why in self.damaged.items())
        if self.requested:
            return f"{bad}; using {self.tag} ({option}{step_of(self.tag)})"
        return f"{bad}: using {self.tag}, the newest intact checkpoint (choose one with {option}N)"


def _listed(run_dir: str | os.PathLike) -> tuple[str | None, list[str]]:
    """``latest``'s tag (None when there is no ``latest``) and the finished checkpoints' tags, oldest
    first: those not newer than ``latest`` (newer ones are unfinished saves), ``latest``'s own tag
    included even when its folder is gone."""
    root = checkpoint_root(run_dir)
    path = root / "latest"
    steps = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step") and d.name[4:].isdigit()]
    latest = path.read_text().strip() if path.is_file() else ""
    if not (latest.startswith("step") and latest[4:].isdigit()):
        # `latest` deleted (or garbled): a folder with a manifest was saved completely (the manifest is written last)
        complete = sorted(d.name for d in steps if (d / MANIFEST).is_file())
        if not complete:
            return None, []
        latest = complete[-1]
    newest = step_of(latest)
    tags = {d.name for d in steps if step_of(d.name) <= newest}
    return latest, sorted(tags | {latest})


def select_checkpoint(run_dir: str | os.PathLike, requested: str | int | None = None, option: str = "--step ",
                      fresh_hint: str = "") -> Selection:
    """Read only, so every rank of a start makes the same choice. ``requested`` (a step or tag, see
    :func:`parse_step`; ``option`` names where it came from in messages): that checkpoint, which must
    be intact; otherwise the newest intact one. Raises :class:`CheckpointError` (one line, with
    ``fresh_hint``) when the run has checkpoints but none is intact, or the requested one is not."""
    root = checkpoint_root(run_dir)
    latest, tags = _listed(run_dir) if root.is_dir() else (None, [])
    if latest is None:
        if requested not in (None, ""):
            raise CheckpointError(f"{option}{requested}: {root} has no checkpoint yet")
        return Selection(None, {}, [])
    want = parse_step(requested, option)
    problems = {}

    def intact(tag: str) -> bool:
        problems[tag] = verify(root / tag)
        return not problems[tag]

    if want is not None:
        applied = root / _APPLIED
        if applied.is_file() and applied.read_text().strip() == want and step_of(tags[-1]) > step_of(want):
            log.info("%s%s was applied by an earlier start, which set aside the newer checkpoints; resuming from "
                     "the newest intact one", option, step_of(want))
            want = None
    if want is not None:
        if want not in tags or not intact(want):
            good = [t for t in reversed(tags) if t != want and intact(t)]
            what = f"is damaged ({problems[want]})" if want in problems else "does not exist"
            choose = (f"intact: step {', '.join(str(step_of(t)) for t in good)} (e.g. {option}{step_of(good[0])})" if good
                      else "no checkpoint is intact")
            raise CheckpointError(f"{option}{step_of(want)}: checkpoint {root / want} {what}; {choose}")
        newer = [t for t in reversed(tags) if step_of(t) > step_of(want)]
        return Selection(want, {t: problems[t] for t in newer if not intact(t)}, [t for t in reversed(newer) if not problems[t]],
                         requested=True)
    for tag in reversed(tags):
        if intact(tag):
            return Selection(tag, {t: problems[t] for t in reversed(tags) if step_of(t) > step_of(tag)}, [])
    bad = "; ".join(f"{t}: {problems[t]}" for t in reversed(tags))
    raise CheckpointError(f"no intact checkpoint in {root} ({bad}){'; ' + fresh_hint if fresh_hint else ''}")


def resolve_tag(run_dir: str | os.PathLike, step: str | int | None = None) -> str:
    """For the commands that read a run (sample, caption, edit, eval, export): the tag of ``--step``
    (``100`` or ``step00000100``), which must be intact, or the newest intact checkpoint, with a
    warning naming each damaged newer one. Raises one line (:class:`CheckpointError`, or
    FileNotFoundError for a run that has none)."""
    selection = select_checkpoint(run_dir, step, option="--step ")
    if selection.tag is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_root(run_dir)} (expected a 'latest' file; has the run trained and saved?)")
    if selection.damaged and not selection.requested:  # a step asked for: the newer ones do not matter here
        log.warning(selection.warning("--step "))
    return selection.tag


def start_fresh_hint(run_dir: str | os.PathLike) -> str:
    return (f"to start this run from scratch, move {checkpoint_root(run_dir)} away (or set a new train.run_dir)")


def set_aside(run_dir: str | os.PathLike, selection: Selection, requested: str | int | None = None) -> list[Path]:
    """Rank 0 (or the preflight), before any save: move the damaged checkpoints newer than
    ``selection.tag`` to ``checkpoints/damaged/`` (and the intact ones newer than a requested older
    step to ``checkpoints/set_aside/``), so that the run's next saves of those steps do not meet
    them, and point ``latest`` at ``selection.tag``. Nothing is deleted. Returns where they went."""
    root = checkpoint_root(run_dir)
    latest = root / "latest"
    if selection.tag is None or (latest.is_file() and latest.read_text().strip() == selection.tag
                                 and not (selection.damaged or selection.newer)):
        return []
    if not latest.is_file() or latest.read_text().strip() != selection.tag and not (selection.damaged or selection.newer):
        log.warning("%s is missing or unreadable; the newest complete checkpoint is %s", latest, selection.tag)
    moved = []
    for tags, folder in ((list(selection.damaged), DAMAGED_DIR), (selection.newer, SET_ASIDE_DIR)):
        for tag in tags:
            for name in (tag, UNIVERSAL_PREFIX + tag):
                src = root / name
                if not src.is_dir():
                    continue
                dst = root / folder / name
                n = 1
                while dst.exists():
                    dst, n = root / folder / f"{name}.{n}", n + 1
                dst.parent.mkdir(exist_ok=True)
                os.replace(src, dst)
                if name == tag:
                    moved.append(dst)
                    log.warning("moved %s checkpoint %s to %s", "damaged" if folder == DAMAGED_DIR else "newer", tag, dst)
    if selection.newer and requested not in (None, ""):
        atomic_write_text(root / _APPLIED, selection.tag)
    atomic_write_text(latest, selection.tag)
    log.info("%s now names %s", latest, selection.tag)
    return moved



# --------------------------------------------------------------------------- resume


@dataclass
class ResumePoint:
    """Where a restart continues: ``tag`` is the checkpoint, ``load_tag`` what DeepSpeed
    loads (the universal conversion of ``tag`` when the world size changed), ``world_size``
    the number of ranks resuming."""

    tag: str
    meta: dict
    load_tag: str
    world_changed: bool
    world_size: int
    selection: Selection | None = None

    @property
    def universal(self) -> bool:
        return self.load_tag != self.tag


def read_meta(ckpt_dir: Path) -> dict:
    path = ckpt_dir / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {ckpt_dir} was not written by this version of mmtrain's checkpointing")
    return json.loads(path.read_text())


def choose_resume(run_dir: str | os.PathLike, resume_from: str | int | None = "", announce: bool = True) -> Selection:
    """The checkpoint a start of training resumes from: ``train.resume_from`` (a step or tag) or the
    newest intact one (:func:`select_checkpoint`); raises :class:`CheckpointError` (one line, how to
    start fresh) when the run has checkpoints but none is intact. ``announce``: log the damaged ones
    skipped (rank 0 and the preflight; the other ranks choose the same in silence)."""
    selection = select_checkpoint(run_dir, resume_from, option="train.resume_from=", fresh_hint=start_fresh_hint(run_dir))
    if announce and selection.damaged:
        log.warning(selection.warning("train.resume_from="))
    if announce and selection.newer:
        log.warning("train.resume_from=%s: resuming from %s; the newer intact checkpoint(s) %s move to %s", resume_from,
                    selection.tag, ", ".join(selection.newer), checkpoint_root(run_dir) / SET_ASIDE_DIR)
    return selection


def plan_resume(run_dir: str | os.PathLike, world_size: int, zero_stage: int, resume_from: str | int | None = "",
                announce: bool = True) -> ResumePoint | None:
    """Decide how to resume; raises with instructions when it cannot. Reads only, so every rank
    can call it before the process group exists and all choose the same checkpoint
    (:func:`choose_resume`); rank 0 then moves damaged newer ones aside (:func:`set_aside`)."""
    selection = choose_resume(run_dir, resume_from, announce)
    tag = selection.tag
    if tag is None:
        return None
    ckpt = checkpoint_root(run_dir) / tag
    meta = read_meta(ckpt)
    saved_world, saved_stage = meta["world_size"], meta["zero_stage"]
    if saved_stage != zero_stage:
        raise ValueError(
            f"{ckpt} was saved with train.zero_stage={saved_stage}, this run asks for {zero_stage}: DeepSpeed cannot "
            f"load optimizer state across ZeRO stages. Resume with train.zero_stage={saved_stage}, or start a new run "
            f"from its weights: `mmtrain export {run_dir} --out DIR` then train.init_from=DIR (optimizer state is lost).")
    world_changed = saved_world != world_size
    # ZeRO-0 keeps full optimizer state on every rank and loads on any world size as is
    universal = world_changed and zero_stage > 0
    return ResumePoint(tag, meta, UNIVERSAL_PREFIX + tag if universal else tag, world_changed, world_size, selection)


def make_universal(run_dir: str | os.PathLike, point: ResumePoint, rank: int, timeout_s: float) -> None:
    """Every rank calls it before joining the process group: rank 0 converts ``point.tag`` with
    DeepSpeed's ``ds_to_universal`` (written under a temporary name, then renamed), the others
    wait for the renamed directory on the filesystem for up to ``timeout_s``
    (``train.convert_timeout_s``). No collective is pending meanwhile, so a conversion longer
    than ``train.dist_timeout_s`` (hours for a large model) cannot time the job out. If rank 0
    fails it raises and the launcher ends the job (torchrun; srun and submitit with
    ``--kill-on-bad-exit=1``)."""
    root = checkpoint_root(run_dir)
    final = root / point.load_tag
    if rank != 0:
        distributed.wait_for_path(final, timeout_s, f"rank 0 to convert {root / point.tag} to a universal checkpoint "
                                                    f"(train.convert_timeout_s={timeout_s:g})")
        return
    if final.is_dir():
        return
    tmp = root / f".{point.load_tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("world size changed (%d -> %d ranks): converting %s to a DeepSpeed universal checkpoint",
             point.meta["world_size"], point.world_size, point.tag)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(root / point.tag),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "2", "--num_merge_workers", "1"]
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as output:  # a file, not a pipe: a long conversion's output never blocks it
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, preexec_fn=_killed_with_parent())
        try:
            while True:
                try:
                    code = proc.wait(timeout=60)
                    break
                except subprocess.TimeoutExpired:
                    log.info("still converting %s (%.0f s)", point.tag, time.monotonic() - t0)
        finally:
            if proc.poll() is None:
                proc.kill()
        if code != 0:
            output.seek(0)
            tail = output.read()[-2000:].decode(errors="replace")
            raise RuntimeError(
                f"converting {root / point.tag} to a universal checkpoint failed (exit {code}); resume on "
                f"{point.meta['world_size']} ranks instead, or convert by hand:\n  {' '.join(cmd)}\n"
                f"then rename {tmp} to {final}.\n{tail}")
    # the universal folder loads with the original's client state; keep our extras next to it
    for extra in ("meta.json", "config.yaml"):
        if (root / point.tag / extra).is_file():
            shutil.copy2(root / point.tag / extra, tmp / extra)
    os.replace(tmp, final)
    log.info("converted %s in %.0f s", point.tag, time.monotonic() - t0)


def _killed_with_parent():
    """``preexec_fn`` that has Linux SIGKILL the conversion when the rank that started it dies,
    so a conversion orphaned by a killed job cannot go on writing into the temporary directory
    that the next job's conversion of the same checkpoint uses. libc is looked up here, in the
    parent: the child may not import after fork."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, sigkill = ctypes.CDLL(None, use_errno=True).prctl, int(signal.SIGKILL)
    return lambda: prctl(1, sigkill)  # 1 = PR_SET_PDEATHSIG


def resume(engine, run_dir: str | os.PathLike, point: ResumePoint, ema=None) -> dict:
    """Load ``point`` into the engine (model, optimizer, LR schedule), the EMA and, when the
    world size is unchanged, this rank's RNG states. Returns our client state."""
    rank, _ = _rank_world()
    root = checkpoint_root(run_dir)
    _, client_state = engine.load_checkpoint(str(root), tag=point.load_tag)
    if client_state is None or "mmtrain" not in client_state:
        raise RuntimeError(f"failed to load checkpoint {root / point.load_tag} (no mmtrain client state)")
    if point.universal:
        _unshare_step_counters(engine)
    ckpt = root / point.tag
    if ema is not None:
        from mmtrain.components.ema import has_ema

        if has_ema(ckpt):
            ema.load(ckpt)
        else:
            log.warning("%s has no EMA (saved with ema.decay=0); the EMA starts from the current weights", ckpt)
    rng_file = ckpt / "rng" / f"rank{rank:05d}.pt"
    if not point.world_changed and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state["mmtrain"]


def _unshare_step_counters(engine) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal loader puts one ``step`` tensor object into the
    state of every param group; torch's Adam increments it in place once per group, so
    with two groups (decay / no decay) the bias correction would run twice as fast after
    the resume. Give each group its own copy."""
    inner = getattr(engine.optimizer, "optimizer", None)
    seen: set[int] = set()
    for state in getattr(inner, "state", {}).values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))


# --------------------------------------------------------------------------- offline loading


def load_model_state(run_dir: str | os.PathLike, tag: str | None = None) -> tuple[dict, dict]:
    """Consolidated fp32 model state dict and client_state, on one process, no DeepSpeed init.

    The weights are the fp32 master weights the optimizer updates, also after bf16 training,
    where the module's own copy is only their bf16 rounding: at ZeRO-1/2/3 gathered from the
    optimizer partitions of every rank, at ZeRO-0 the full fp32 copies DeepSpeed's
    mixed-precision optimizer keeps. Parameters no optimizer holds (frozen ones) come from
    the module state, upcast.
    """
    root = checkpoint_root(run_dir)
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {root} (expected a 'latest' file; has the run trained and saved?)")
    ckpt_dir = root / tag
    zero3_files = sorted(ckpt_dir.glob("zero_pp_rank_*_mp_rank_*_model_states.pt"))
    plain_files = sorted(ckpt_dir.glob("mp_rank_*_model_states.pt"))
    # ZeRO-1/2 partitions: zero_pp_rank_* (fp32) or bf16_zero_pp_rank_* (bf16) optimizer files
    zero12_optim = sorted(ckpt_dir.glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt")) if not zero3_files else []
    if not (zero3_files or plain_files):
        raise FileNotFoundError(f"{ckpt_dir}: no DeepSpeed *model_states.pt file")
    meta = torch.load((zero3_files or plain_files)[0], map_location="cpu", weights_only=False)
    if "mmtrain" not in meta:
        raise ValueError(f"{ckpt_dir}: not an mmtrain checkpoint (no 'mmtrain' client state)")
    # ZeRO-3's module state holds placeholders: every weight comes from the partitions
    state = {} if zero3_files else {k: v.detach().float() for k, v in meta["module"].items()}
    if zero12_optim and _is_bf16_optimizer_file(zero12_optim[0]):
        masters = _bf16_optimizer_masters(meta, zero12_optim)
    elif zero3_files or zero12_optim:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # its progress lines are not the caller's output
            masters = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:
        masters = _zero0_fp32_masters(meta, ckpt_dir)
    state.update({k: v.detach().float() for k, v in masters.items()})
    return state, meta["mmtrain"]


def _rank_of_optim_file(path: Path) -> int:
    return int(path.name.split("zero_pp_rank_")[1].split("_")[0])


def _is_bf16_optimizer_file(path: Path) -> bool:
    """DeepSpeed's BF16_Optimizer (ZeRO-1 with bf16 weights and fp32 gradient accumulation)
    saves its fp32 partitions without the ``zero_stage`` key that DeepSpeed's zero_to_fp32
    requires ("... is not a zero checkpoint")."""
    optim = torch.load(path, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
    return "zero_stage" not in optim and "single_partition_of_fp32_groups" in optim


def _bf16_optimizer_masters(meta: dict, optim_files: list[Path]) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a BF16_Optimizer checkpoint: per parameter group, rank r's
    file holds piece r of equal pieces of one flat fp32 vector, the group's parameters one after
    the other in the order of ``param_shapes`` (padding only at the end)."""
    files = sorted(optim_files, key=_rank_of_optim_file)
    pieces = [torch.load(f, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
              ["single_partition_of_fp32_groups"] for f in files]
    masters = {}
    for group, shapes in enumerate(meta["param_shapes"]):
        flat = torch.cat([rank_pieces[group] for rank_pieces in pieces])
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            if offset + numel > flat.numel():
                raise ValueError(f"{files[0].parent}: the fp32 partitions of group {group} end before parameter {name}")
            masters[name] = flat[offset:offset + numel].view(tuple(shape)).clone()
            offset += numel
    return masters


def _zero0_fp32_masters(meta: dict, ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """ZeRO-0 in bf16/fp16: DeepSpeed's unfused optimizer saves one fp32 copy per parameter,
    group by group, in the order of the optimizer's parameter groups, which the training
    loop records by name (``param_group_names``). fp32 ZeRO-0 keeps none: the module is fp32."""
    groups = (meta.get("optimizer") or {}).get("fp32_groups")
    if not groups:
        return {}
    names = meta["mmtrain"].get("param_group_names")
    if names is None:
        log.warning("%s: no parameter names for the fp32 master weights (saved by an older mmtrain); "
                    "using the module's %s weights", ckpt_dir, next(iter(meta["module"].values())).dtype)
        return {}
    if [len(g) for g in names] != [len(g) for g in groups]:
        raise ValueError(f"{ckpt_dir}: {sum(map(len, groups))} fp32 master tensors in {len(groups)} groups do not match "
                         f"the {sum(map(len, names))} recorded parameter names")
    return {name: tensor for name_group, group in zip(names, groups) for name, tensor in zip(name_group, group)}
