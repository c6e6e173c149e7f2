"""Interleaved generation with CausalFusion: continue documents with text and images.

A batch of B documents (text spans and images in reading order) is read into one KV cache
(:class:`DocumentCache`) under the document layout the model trained on
(:func:`mmtrain.models.document_layout.document_runs`: given images are context images,
``<boi>`` + tokens as one bidirectional block, then ``<eoi>``). Then, in lockstep over the rows:

- **text**: one token per row from the last slot's logits (greedy or nucleus), appended to the
  cache as a text slot, until the row emits ``<boi>`` (or ``</s>``, or reaches its limits);
- **image**: once every row that is not finished has opened an image, those rows draw it with
  the multi-step AR-diffusion sampler, conditioned on the whole cached context: each AR step's
  noisy tokens attend to the cache (the context and the image's clean tokens of earlier steps)
  and to each other; its result enters the cache as clean tokens of that step. All steps'
  clean tokens stay in the cache (what follows the image reads its clean copy, as in
  training), then ``<eoi>``, and text decoding goes on. Classifier-free guidance runs the
  image's tokens a second time in a cache of their own: the image without its context (the
  training drop: ``model.cond_drop_prob`` of images saw only themselves).

Rows that idle (waiting, finished, or not drawing) append padding slots that nothing sees, so
the cache stays one rectangular tensor per layer. Shapes: B rows, L image tokens, P token dim,
D width, Nk cached slots.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from mmtrain.models.causalfusion import ROLE_PAD, TEXT, CausalFusion, even_ar_split, guidance_scale, guided
from mmtrain.models.document_layout import FIELDS, document_runs, layout_from_slots, run_slots

log = logging.getLogger("mmtrain.inference")


class DocumentCache:
    """Per-block keys/values of the slots later slots may see, which of them are real (B, Nk), and
    (LLaMA backbone) each row's next rotary position: its text slots so far
    (:meth:`~mmtrain.models.causalfusion.Layout.rope_positions`, the training rule)."""

    def __init__(self, model: CausalFusion, batch: int, device: torch.device):
        self.model = model
        self.caches = [dict() for _ in model.blocks]
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # B

    def run(self, h: torch.Tensor, valid: torch.Tensor, keep: bool, text: bool = False) -> torch.Tensor:
        """New slots ``h`` (B, n, D) that see every real cached slot and each other (one AR step,
        or one text token: ``text``); ``valid`` (B, n): real slots (a padding slot sees itself only).
        ``keep``: append them to the cache. Returns their hidden states (B, n, D)."""
        B, n = valid.shape
        own = valid[:, None, :] & valid[:, :, None] | torch.eye(n, dtype=torch.bool, device=valid.device)[None]
        mask = torch.cat([self.valid[:, None, :].expand(B, n, -1) & valid[:, :, None], own], 2)
        out = self.model.run_blocks(h, mask, self.caches, update_cache=keep, positions=self.next_pos[:, None].expand(B, n),
                                    image_slots=torch.full((B, n), not text, device=valid.device))
        if keep:
            self.valid = torch.cat([self.valid, valid], 1)
            if text:
                self.next_pos = self.next_pos + valid.sum(1)
        return out

    def read_prompt(self, lay, h: torch.Tensor) -> torch.Tensor:
        """The prompt's slots (B, N, D, laid out as ``lay``) under their own document mask, into the empty cache."""
        out = self.model.run_blocks(h, lay.attention_mask(), self.caches, update_cache=True, positions=lay.rope_positions(),
                                    image_slots=lay.image_slots())
        self.valid = lay.role != ROLE_PAD
        self.next_pos = (lay.kind == TEXT).sum(1)
        return out


@dataclass
class GenerationLimits:
    """How much a continuation may add per document.

    Args:
        max_images: images drawn at most. Default 1.
        max_text_tokens: text tokens per generated text span at most (the span then ends). Default 32.
        max_segments: generated segments (text spans and images) at most. Default 3.
        plan: the kinds of the segments to generate, in order (``("text", "image", "text")``):
            the caller decides where images go. A text span then ends where the model opens an
            image, ends the document or reaches ``max_text_tokens``, and the next planned
            segment follows (an image is opened for the model when it did not open one); the
            continuation ends with the plan. Empty: the model decides (an image where it emits
            ``<boi>``), within the limits. Default ().
    """

    max_images: int = 1
    max_text_tokens: int = 32
    max_segments: int = 3
    plan: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        bad = [k for k in self.plan if k not in ("text", "image")]
        if bad:
            raise ValueError(f"generation plan: segments are 'text' or 'image', got {bad}")
        if any(a == b == "text" for a, b in zip(self.plan, self.plan[1:])):
            raise ValueError(f"generation plan {list(self.plan)}: two text segments in a row are one span")
        if self.plan:
            self.max_segments = len(self.plan)
            self.max_images = self.plan.count("image")

    def next_kind(self, done: int, images: int) -> str | None:
        """What follows ``done`` generated segments (``images`` of them images): a planned kind, or
        without a plan "image" while the limits allow one (the model asked), else None (the end)."""
        if self.plan:
            return self.plan[done] if done < len(self.plan) else None
        return "image" if done < self.max_segments and images < self.max_images else None


@dataclass
class _Row:
    segments: list = field(default_factory=list)  # generated: ("text", [ids]) | ("image", row in images)
    state: str = "text"  # text | image (opened, waiting to draw) | done
    images: int = 0
    text_pos: int = 0  # next text position row
    span: list = field(default_factory=list)


def _pick(logits: torch.Tensor, generator: torch.Generator, top_p: float, temperature: float) -> torch.Tensor:
    """Next token per row (B,): greedy with ``top_p=0``, else nucleus sampling drawn on the generator's device."""
    logits = logits.float() / max(temperature, 1e-6)
    if top_p <= 0:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    sorted_p, sorted_i = probs.sort(-1, descending=True)
    sorted_p = sorted_p * (sorted_p.cumsum(-1) - sorted_p < top_p)
    p = (sorted_p / sorted_p.sum(-1, keepdim=True)).to(generator.device)
    choice = torch.multinomial(p, 1, generator=generator).to(logits.device)
    return sorted_i.gather(-1, choice)[:, 0]


@torch.no_grad()
def continue_documents(model: CausalFusion, diffusion, prompts: list[list], prompt_images: torch.Tensor, *,
                       generator: torch.Generator, limits: GenerationLimits, ar_steps: int, cfg_scale: float = 1.0,
                       cfg_schedule: str = "constant", cfg_interval: tuple[float, float] = (0.0, 1000.0), clip_x0: float = 0.0,
                       flow_options: dict | None = None, top_p: float = 0.0, temperature: float = 1.0) -> tuple[list[list], torch.Tensor]:
    """Continue B prompt documents. ``prompts``: per document its segments (text spans as token id
    arrays without ``<s>``, images as rows of ``prompt_images`` (M, L, P, raster order)).

    Returns per document the generated segments, ``("text", ids)`` or ``("image", k)`` with ``k``
    a row of the returned image tokens (K, L, P, raster order), in order."""
    ids, cfg = model.ids, model.cfg
    T, L, P = cfg.max_text_len, model.num_image_tokens, model.token_dim
    dev = model.x_proj.weight.device
    B = len(prompts)
    rows = [_Row() for _ in range(B)]

    # the prompt, one document per row (right-padded: padding slots are invisible keys)
    docs = []
    for b, segments in enumerate(prompts):
        n_text = 1 + sum(len(seg) for seg in segments if not isinstance(seg, (int, np.integer)))  # <s> and the spans
        if n_text > T:
            log.warning("prompt document %d has %d text tokens; model.max_text_len=%d keeps the first %d (the most it "
                        "trained on per sequence)", b, n_text, T, T)
        rows[b].text_pos = min(n_text, T)
        # the training layout, every given image a context image (its targets and draws unused here)
        runs = document_runs(segments, ids, T, L, cfg, random.Random(0), context_prob=1.0)
        docs.append(run_slots(runs, ids, T))
    N = max(len(d["kind"]) for d in docs)
    padded = {name: np.stack([np.concatenate([d[name], np.full(N - len(d[name]), FIELDS[name][1], dtype=d[name].dtype)])
                              for d in docs]) for name in docs[0]}
    lay = layout_from_slots(padded, dev)
    images = prompt_images.to(dev) if prompt_images.numel() else torch.zeros(1, L, P, device=dev)
    ctx = DocumentCache(model, B, dev)
    h = ctx.read_prompt(lay, model.embed(lay, images, None, None))
    last = torch.tensor([len(d["kind"]) - 1 for d in docs], device=dev)
    last_h = h[torch.arange(B, device=dev), last]  # B, D: the hidden state that predicts what comes next

    drawn: list[torch.Tensor] = []
    if limits.plan and limits.plan[0] == "image":  # the caller asks for an image first
        for r in rows:
            r.state = "image"
        last_h = _append_text(model, ctx, [ids["boi"]] * B, [T] * B, [True] * B, last_h)
    while True:
        if all(r.state == "done" for r in rows):
            break
        if all(r.state in ("image", "done") for r in rows):
            drawing = [r.state == "image" for r in rows]
            tokens = _draw_image(model, diffusion, ctx, drawing, generator, ar_steps, cfg_scale, cfg_schedule, cfg_interval,
                                 clip_x0, flow_options)
            again = [False] * B
            for b, r in enumerate(rows):
                if drawing[b]:
                    r.segments.append(("image", len(drawn) * B + b))
                    r.images += 1
                    after = limits.next_kind(len(r.segments), r.images) if limits.plan else \
                        ("text" if len(r.segments) < limits.max_segments else None)
                    r.state = after or "done"
                    again[b] = after == "image"
            drawn.append(tokens)
            last_h = _append_text(model, ctx, [ids["eoi"]] * B, [T + 1] * B, drawing, last_h)
            if any(again):  # the plan has two images in a row
                last_h = _append_text(model, ctx, [ids["boi"]] * B, [T] * B, again, last_h)
            continue
        # one text token for every row that is writing
        nxt = _pick(model.lm_head(last_h), generator, top_p, temperature).tolist()  # one host read per token: ids are needed
        append, pos, valid, force_boi = [ids["pad"]] * B, [0] * B, [False] * B, [False] * B
        for b, r in enumerate(rows):
            if r.state != "text":
                continue
            tok = nxt[b]
            ended = tok in (ids["boi"], ids["eos"])
            if not ended:
                append[b], pos[b], valid[b] = tok, min(r.text_pos, T - 1), True
                r.span.append(tok)
                r.text_pos += 1
                if len(r.span) < limits.max_text_tokens and r.text_pos < T:
                    continue
            # the span ends: the model opened an image or ended the document, or the span is at its limit;
            # a planned span is kept even when empty (the model went on at once), so the plan goes on
            _close_span(r, keep_empty=bool(limits.plan))
            after = limits.next_kind(len(r.segments), r.images)
            if not limits.plan and tok == ids["eos"]:
                after = None  # the model ended the document
            r.state = "image" if after == "image" else "done"
            if r.state == "image" and tok == ids["boi"]:
                append[b], pos[b], valid[b] = tok, T, True
            else:
                force_boi[b] = r.state == "image"  # the plan or the limits open the image for the model
        last_h = _append_text(model, ctx, append, pos, valid, last_h)
        if any(force_boi):
            last_h = _append_text(model, ctx, [ids["boi"]] * B, [T] * B, force_boi, last_h)
    tokens = torch.cat(drawn) if drawn else torch.zeros(0, L, P, device=dev)
    return [r.segments for r in rows], tokens


def _close_span(r: _Row, keep_empty: bool = False) -> None:
    if r.span or keep_empty:
        r.segments.append(("text", list(r.span)))
        r.span = []


def _append_text(model: CausalFusion, ctx: DocumentCache, tokens: list[int], pos: list[int], valid: list[bool],
                 last_h: torch.Tensor) -> torch.Tensor:
    """One text slot per row (``valid`` rows; the others a padding slot); returns the new last hidden state
    of the rows that appended (the others keep theirs)."""
    dev = last_h.device
    tok = torch.tensor([t if v else model.ids["pad"] for t, v in zip(tokens, valid)], device=dev)
    h = model.text_embed(tok, torch.tensor(pos, device=dev))[:, None]
    v = torch.tensor(valid, device=dev)[:, None]
    out = ctx.run(h, v, keep=True, text=True)[:, 0]
    return torch.where(v, out, last_h)


def _draw_image(model: CausalFusion, diffusion, ctx: DocumentCache, drawing: list[bool], generator: torch.Generator,
                ar_steps: int, cfg_scale: float, cfg_schedule: str, cfg_interval, clip_x0: float,
                flow_options: dict | None) -> torch.Tensor:
    """Image tokens (B, L, P, raster order) for the rows ``drawing``, after their ``<boi>``; their clean
    tokens of every AR step enter ``ctx``."""
    B, L, P = len(drawing), model.num_image_tokens, model.token_dim
    dev, dtype = ctx.valid.device, model.x_proj.weight.dtype
    valid = torch.tensor(drawing, device=dev)
    use_cfg = cfg_scale != 1.0
    alone = DocumentCache(model, B, dev) if use_cfg else None  # the image without its context
    perm = torch.argsort(torch.rand(B, L, generator=generator, device=generator.device), dim=1).to(dev)
    out = torch.zeros(B, L, P, device=dev, dtype=dtype)
    start = 0
    for size in even_ar_split(L, ar_steps):
        pos = perm[:, start:start + size]  # B, size
        progress = (start + size) / L
        step_valid = valid[:, None].expand(B, size)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            h = model.image_embed(x, pos, t)
            pred = model.diffusion_head(ctx.run(h, step_valid, keep=False)).float()
            if not use_cfg:
                return pred
            pred_alone = model.diffusion_head(alone.run(h, step_valid, keep=False)).float()
            return guided(torch.cat([pred, pred_alone]), guidance_scale(cfg_scale, cfg_schedule, progress, t, cfg_interval))

        noise = torch.randn(B, size, P, generator=generator, device=generator.device).to(dev)
        x0 = diffusion.sample(model_fn, noise, generator=generator, clip_x0=clip_x0, **(flow_options or {}))
        out.scatter_(1, pos[..., None].expand(B, size, P), x0.to(dtype))
        clean = model.image_embed(x0, pos)
        ctx.run(clean, step_valid, keep=True)  # every step, the last one too: what follows reads the clean copy
        if use_cfg:
            alone.run(clean, step_valid, keep=True)
        start += size
    return out
