"""``mmtrain eval text``: how well a model predicts plain text (negative log-likelihood, perplexity).

Each non-blank line of a UTF-8 text file is one document: tokenized with the run's own text
tokenizer as ``bos + text + eos`` and cut into windows of at most ``max_len`` tokens
(``min(--max-len, model.max_text_positions)``). Windows overlap by one token: each starts with the
last token of the one before, which is its context and is not scored again, so every token of a
line but its bos is scored exactly once (the scored tokens are every token but each window's first).
The model's text path (``model.text_logits``: a causal, text-only forward) gives the next-token
logits; the NLL of a token is ``-log_softmax(logits)`` at it, in nats.

Writes ``metrics.json`` (lines, tokens scored, mean NLL per token over all of them, perplexity =
exp(mean NLL), each line's mean NLL) and ``tokens.jsonl`` (per line: its line number in the file,
the scored token ids and their NLLs).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from mmtrain.atomic import atomic_write_text

log = logging.getLogger("mmtrain.eval")


def read_lines(path: str | Path) -> list[tuple[int, str]]:
    """The non-blank lines of ``path`` with their 1-based line numbers; a missing file or one without a
    non-blank line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--file {path}: no such file (give a UTF-8 text file, one document per line)")
    with open(path, encoding="utf-8") as fh:
        lines = [(i, line.rstrip("\r\n")) for i, line in enumerate(fh, 1)]
    kept = [(i, line) for i, line in lines if line.strip()]
    if not kept:
        raise ValueError(f"--file {path}: no text in it ({len(lines)} line(s), all blank); give one document per line")
    return kept


def windows(ids: list[int], size: int) -> list[list[int]]:
    """``ids`` cut into windows of at most ``size`` (>= 2) tokens, each starting with the last token of the
    one before; their tokens but the first cover ``ids[1:]`` once."""
    if size < 2:
        raise ValueError(f"window size must be >= 2 tokens (one of context, one scored), got {size}")
    out, start = [], 0
    while start < len(ids) - 1:
        out.append(ids[start:start + size])
        start += size - 1
    return out


def text_capability(run) -> None:
    """Raise unless the run's model has a text path to score text with."""
    from mmtrain.models import captioning_families, family

    fam = family(run.model)
    if not fam.captions or not hasattr(run.model, "text_logits"):
        raise ValueError(f"model.family={fam.name} has no text path (its family does not predict text: captions capability "
                         f"is {fam.captions}); `mmtrain eval text` needs a family that does: {captioning_families()}")
    if run.text_tok is None:
        raise ValueError(f"model.condition={run.cfg.model.condition} of {run.checkpoint}: no text tokenizer and no text path; "
                         "`mmtrain eval text` needs a model.condition=text run")


@torch.no_grad()
def score_windows(run, batch: list[list[int]]) -> list[list[float]]:
    """Per window of ``batch``: the NLL (nats) of each of its tokens but the first, given those before it."""
    pad = run.text_tok.pad_id
    n = max(len(w) for w in batch)
    ids = torch.full((len(batch), n), pad, dtype=torch.long)  # B, N
    for row, w in enumerate(batch):
        ids[row, : len(w)] = torch.tensor(w, dtype=torch.long)
    text_len = torch.tensor([len(w) for w in batch], dtype=torch.long)  # B
    ids, text_len = ids.to(run.device), text_len.to(run.device)
    with run.autocast():
        logits = run.model.text_logits(ids, text_len)  # B, N, V
    out = []
    for row, w in enumerate(batch):  # a row at a time: one (N, V) temporary, not (B, N, V), for large vocabularies
        lg = logits[row, : len(w) - 1].float()  # N-1, V: position t predicts token t+1
        nll = torch.logsumexp(lg, dim=-1) - lg.gather(-1, ids[row, 1 : len(w), None]).squeeze(-1)  # -log_softmax at it
        out.append(nll.cpu().tolist())
    return out


def evaluate_text(run, file: str | Path, out: str | Path, max_len: int | None = None, batch_size: int = 16) -> dict[str, Any]:
    """Score the lines of ``file`` with ``run`` (a :class:`~mmtrain.inference.LoadedRun`); writes ``out/metrics.json``
    and ``out/tokens.jsonl`` and returns the metrics (with ``files``)."""
    text_capability(run)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    positions = int(run.model.max_text_positions)
    if max_len is not None and max_len < 2:
        raise ValueError(f"--max-len must be >= 2 (one token of context, one scored), got {max_len}")
    size = positions if max_len is None else min(max_len, positions)
    if size < 2:
        raise ValueError(f"the model's text path takes {positions} token(s) per forward (model.max_text_positions); "
                         "scoring text needs >= 2")
    lines = read_lines(file)
    tok = run.text_tok
    t0 = time.perf_counter()
    # every window of every line, remembered by line; batched in that order
    wins: list[tuple[int, list[int]]] = []
    for k, (_, text) in enumerate(lines):
        wins.extend((k, w) for w in windows(tok.encode(text, bos=True, eos=True), size))
    per_line: list[list[float]] = [[] for _ in lines]
    ids_per_line: list[list[int]] = [[] for _ in lines]
    run.model.eval()
    for start in range(0, len(wins), batch_size):
        chunk = wins[start:start + batch_size]
        for (k, w), nll in zip(chunk, score_windows(run, [w for _, w in chunk])):
            per_line[k].extend(nll)
            ids_per_line[k].extend(w[1:])
    total = sum(len(v) for v in per_line)
    mean_nll = sum(sum(v) for v in per_line) / total
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {
        "file": str(Path(file)),
        "checkpoint": run.checkpoint,
        "step": run.step,
        **run.placement(),
        "tokenizer_sha256": tok.fingerprint,
        "window": size,
        "lines": len(lines),
        "tokens_scored": total,
        "mean_nll": mean_nll,
        "perplexity": math.exp(mean_nll),
        "per_line_mean_nll": [sum(v) / len(v) for v in per_line],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_text(out / "tokens.jsonl", "".join(
        json.dumps({"line": number, "ids": ids, "nll": nll}) + "\n"
        for (number, _), ids, nll in zip(lines, ids_per_line, per_line)))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    metrics["files"] = {"metrics": str(out / "metrics.json"), "tokens": str(out / "tokens.jsonl")}
    return metrics
