"""The document layout of CausalFusion: text spans and several images in one sequence.

A document (a web page, a story, an image-caption pair) is laid out in reading order as
*runs* of slots, built on the host from what the loader knows (token ids, image count,
lengths) and the host's random draws, then copied to the device once per micro-batch:

- a text run: the text tokens, each with the next token of the document's text stream as
  its target (next-token cross-entropy);
- an image run, ``<boi>``, the image, ``<eoi>``. A *generated* image is one CausalFusion
  block with its own random token order, AR split and (on the device) timestep: a clean
  copy of all L tokens (CLEAN, AR level = the step of each token) then L noisy tokens
  (NOISY, diffusion loss weighted per AR step). Its noisy tokens see the context before
  the image, the clean tokens of earlier AR steps of the same image and the noisy tokens
  of their own step; nothing else sees them. What follows the image sees its clean copy,
  so no noisy image leaks into the rest of the document (:func:`attention_allowed`, the
  one rule, with ``seg`` = the image's block id). A *context* image (the image -> text
  direction, ``model.caption_prob`` of images) is ``<boi>`` + its L tokens as one
  bidirectional block, no diffusion loss, as a caption row has always been.

The document's text stream is ``<s> span <boi> [image] <eoi> span ... </s>``: a span's last
token learns to open an image (``<boi>``) where one follows, ``<eoi>`` learns what comes
after the image, the last slot learns ``</s>``. ``<boi>`` predicts nothing (the image
follows). Text positions count the stream's text slots (``<s>`` = 0); ``<boi>`` and
``<eoi>`` take rows ``T`` and ``T + 1`` of the text position table, as in the pair layouts.

Losses, as stated in the README: the diffusion loss is the mean over every noisy token of
the micro-batch of its AR-step-weighted squared error (every image has L tokens, so every
image weighs the same, whichever document it is in); the text loss is the mean
cross-entropy over every text target of the micro-batch (a document weighs by its text).
Classifier-free guidance drops *all* of an image's context with ``model.cond_drop_prob``:
that image's slots see only their own block (``alone``), the text around it is unchanged.

The one-image layouts of :meth:`CausalFusion.layout` are special cases: :func:`pair_runs`
writes them as runs, and the losses are the same (tests/test_document_layout.py).

Documents of a micro-batch are packed first-fit into rows of a static length
(:func:`pack_plan`, samples in one row never see each other) and the row count is rounded
up to a multiple of ``ceil(B / model.seq_buckets)``: a bounded set of shapes, no padding to
the longest document. Shapes: B documents, M images, L tokens per image, R rows, N slots.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from mmtrain.distributed import to_device
from mmtrain.models.causalfusion import (CLEAN, NOISY, PAD, ROLE_BIDIR, ROLE_CAUSAL, ROLE_CLEAN, ROLE_NOISY, ROLE_PAD, TEXT,
                                         Layout, ar_loss_weights, draw_ar_split, pack_plan)

IGNORE = -100  # no target

# field -> (numpy dtype, pad value); the Layout's fields plus the document ones
FIELDS: dict[str, tuple[type, float]] = {
    "kind": (np.int64, PAD), "token": (np.int64, 0), "pos": (np.int64, 0), "img_idx": (np.int64, -1),
    "role": (np.int64, ROLE_PAD), "level": (np.int64, 0), "target": (np.int64, IGNORE), "loss_weight": (np.float32, 0.0),
    "seg": (np.int64, -1), "alone": (np.bool_, False), "image": (np.int64, -1),
}


@dataclass
class TextRun:
    """Text slots: ``ids`` (n,), their next-token ``targets`` (IGNORE where none) and text positions ``pos``."""

    ids: np.ndarray
    targets: np.ndarray
    pos: np.ndarray


@dataclass
class ImageRun:
    """One image of a document: ``<boi>``, its slots, and ``<eoi>`` when ``eoi_target`` is not None.

    ``image``: its row in the batch's image tensors (M, L, P). ``order``: the raster indices in
    AR order (L,); ``split``: the AR step sizes (a generated image; None = a context image,
    one bidirectional block with its ``<boi>``). ``keep_last_clean``: lay out the clean copy of
    the last AR step too (what follows the image sees it; a pair's image, which nothing
    follows, leaves it out as the one-image layout does). ``alone``: context dropped (CFG).
    """

    image: int
    order: np.ndarray
    split: list[int] | None
    loss_weights: np.ndarray | None = None
    keep_last_clean: bool = True
    alone: bool = False
    eoi_target: int | None = None


def _slots(n: int, **values) -> dict[str, np.ndarray]:
    out = {name: np.full(n, pad, dtype=dtype) for name, (dtype, pad) in FIELDS.items()}
    for name, v in values.items():
        out[name][:] = v
    return out


def run_slots(runs: list[TextRun | ImageRun], ids: dict, text_len: int) -> dict[str, np.ndarray]:
    """The slot descriptors (N,) of one document from its runs. ``ids``: the special token ids;
    ``text_len``: T, the text position table's text rows (``<boi>`` = T, ``<eoi>`` = T + 1)."""
    parts, seg = [], 0
    for run in runs:
        if isinstance(run, TextRun):
            n = len(run.ids)
            parts.append(_slots(n, kind=TEXT, token=run.ids, pos=run.pos, role=ROLE_CAUSAL, target=run.targets))
            continue
        L = len(run.order)
        if run.split is None:  # context image: [<boi> | L tokens] one bidirectional block
            boi = _slots(1, kind=TEXT, token=ids["boi"], pos=text_len, role=ROLE_BIDIR, seg=seg)
            body = _slots(L, kind=CLEAN, img_idx=np.arange(L), role=ROLE_BIDIR, seg=seg, image=run.image)
            parts += [boi, body]
        else:
            step = np.repeat(np.arange(1, len(run.split) + 1), run.split)  # L: AR step of each order position
            n_clean = L if run.keep_last_clean else L - run.split[-1]
            parts.append(_slots(1, kind=TEXT, token=ids["boi"], pos=text_len, role=ROLE_CAUSAL))
            parts.append(_slots(n_clean, kind=CLEAN, img_idx=run.order[:n_clean], role=ROLE_CLEAN, level=step[:n_clean],
                                seg=seg, alone=run.alone, image=run.image))
            parts.append(_slots(L, kind=NOISY, img_idx=run.order, role=ROLE_NOISY, level=step, loss_weight=run.loss_weights,
                                seg=seg, alone=run.alone, image=run.image))
        if run.eoi_target is not None:
            parts.append(_slots(1, kind=TEXT, token=ids["eoi"], pos=text_len + 1, role=ROLE_CAUSAL, target=run.eoi_target))
        seg += 1
    return {name: np.concatenate([p[name] for p in parts]) for name in FIELDS}


def next_token_targets(ids: np.ndarray) -> np.ndarray:
    """Each token's target is the one after it; the last has none (a caption's ``</s>``)."""
    return np.append(ids[1:], IGNORE).astype(np.int64)


def pair_runs(text_ids: np.ndarray, caption_row: bool, image: int, order: np.ndarray, split: list[int],
              loss_weights: np.ndarray, ids: dict, text_len: int) -> list[TextRun | ImageRun]:
    """Today's one-image layouts as runs: ``[text | <boi> | image]`` to draw (the last AR
    step's clean copy left out: nothing follows it) or ``[<boi> | image | <eoi> | text]`` to
    caption. ``text_ids``: the caption as the loader encodes it (``<s> ... </s>``)."""
    text = TextRun(text_ids, next_token_targets(text_ids), np.arange(len(text_ids)))
    if caption_row:
        return [ImageRun(image, order, None, eoi_target=IGNORE), text]
    return [text, ImageRun(image, order, split, loss_weights, keep_last_clean=False)]


def document_runs(segments: list, ids: dict, text_len: int, image_tokens: int, cfg, rng: random.Random,
                  context_prob: float | None = None) -> list[TextRun | ImageRun]:
    """A document's runs. ``segments``: in reading order, a text span as an int array of its
    token ids (no ``<s>``/``</s>``) or an image as its row (int) in the batch's images.

    Per image, drawn with ``rng``: context image with ``context_prob`` (default
    ``cfg.caption_prob``), else generated
    with its own AR split (``cfg.ar_step_decay``, weights per step) and token order, its
    context dropped with ``cfg.cond_drop_prob``. The text stream is cut to ``text_len`` slots
    (the loader cuts documents to the budget first, so this only guards)."""
    items: list[tuple[str, int]] = [("text", ids["bos"])]  # the document in reading order, text cut to the budget
    n_text = 1
    for seg in segments:
        if isinstance(seg, (int, np.integer)):
            items.append(("image", int(seg)))
        else:
            room = max(text_len - n_text, 0)
            items += [("text", int(t)) for t in seg[:room]]
            n_text += min(len(seg), room)
    # what each item is followed by, as a text target: a token, <boi> before an image, </s> at the end
    follows = [ids["boi"] if kind == "image" else value for kind, value in items[1:]] + [ids["eos"]]
    runs: list[TextRun | ImageRun] = []
    text_ids: list[int] = []
    text_targets: list[int] = []
    text_pos = 0

    def close_text() -> None:
        nonlocal text_pos
        if text_ids:
            n = len(text_ids)
            runs.append(TextRun(np.array(text_ids, dtype=np.int64), np.array(text_targets, dtype=np.int64),
                                np.arange(text_pos, text_pos + n)))
            text_pos += n
            text_ids.clear()
            text_targets.clear()

    for (kind, value), nxt in zip(items, follows):
        if kind == "text":
            text_ids.append(value)
            text_targets.append(nxt)
            continue
        close_text()
        order = np.array(rng.sample(range(image_tokens), image_tokens), dtype=np.int64)
        if rng.random() < (cfg.caption_prob if context_prob is None else context_prob):
            runs.append(ImageRun(value, np.arange(image_tokens), None, eoi_target=nxt))
        else:
            split = draw_ar_split(image_tokens, cfg.ar_step_decay, rng)
            weights = ar_loss_weights(split, cfg.max_ar_weight, cfg.min_ar_weight, cfg.ar_weight_schedule).numpy()
            runs.append(ImageRun(value, order, split, weights, keep_last_clean=True,
                                 alone=rng.random() < cfg.cond_drop_prob, eoi_target=nxt))
    close_text()
    return runs


def pack_documents(docs: list[dict[str, np.ndarray]], length: int, row_multiple: int) -> dict[str, np.ndarray]:
    """Pack the documents' slots into R rows of ``length`` (first-fit, :func:`pack_plan`),
    each slot tagged with its document (``sample``); empty slots padded."""
    sizes = [len(d["kind"]) for d in docs]
    sample, offset = (t.numpy() for t in pack_plan(sizes, length, row_multiple))
    starts = np.cumsum([0] + sizes[:-1])
    flat = {name: np.concatenate([d[name] for d in docs]) for name in FIELDS}
    valid = sample >= 0
    at = np.where(valid, starts[np.maximum(sample, 0)] + np.maximum(offset, 0), 0)
    out = {name: np.where(valid, flat[name][at], FIELDS[name][1]).astype(FIELDS[name][0]) for name in FIELDS}
    out["sample"] = sample
    return out


def layout_from_slots(slots: dict[str, np.ndarray], device: torch.device | str) -> Layout:
    """Host slot arrays (R, N) -> a device :class:`Layout` (non-blocking copies, nothing read back)."""
    dev = torch.device(device)
    t = {name: to_device(torch.from_numpy(np.ascontiguousarray(v)), dev) for name, v in slots.items()}
    return Layout(kind=t["kind"], token=t["token"], pos=t["pos"], img_idx=t["img_idx"], role=t["role"], level=t["level"],
                  target=t["target"], loss_weight=t["loss_weight"], sample=t.get("sample"), seg=t["seg"], alone=t["alone"],
                  image=t["image"])


def document_slots_length(cfg, image_tokens: int) -> int:
    """The longest document the budget allows: ``max_text_len`` text slots and
    ``max_images`` generated images (``<boi>``, 2L tokens, ``<eoi>`` each): the default row length."""
    return cfg.max_text_len + cfg.max_images * (2 * image_tokens + 2)


def document_rows(docs_slots: list[dict[str, np.ndarray]], cfg, image_tokens: int) -> dict[str, np.ndarray]:
    """Pack a micro-batch of B documents into rows: ``model.pack_length`` slots per row (0 = the
    budget's longest document, :func:`document_slots_length`), the row count rounded up to a
    multiple of ``ceil(B / model.seq_buckets)`` (static shapes)."""
    B = len(docs_slots)
    length = cfg.pack_length or document_slots_length(cfg, image_tokens)
    multiple = -(-B // cfg.seq_buckets) if cfg.seq_buckets else 1
    return pack_documents(docs_slots, length, multiple)


def document_training_inputs(model, latent_tokens: torch.Tensor, documents: list[list], pairs: list[bool], diffusion,
                             gen: torch.Generator, rng: random.Random) -> dict:
    """The forward's inputs for a micro-batch of B documents (:class:`mmtrain.components.data.Batch`'s
    ``documents``): everything about the layout drawn on the host with ``rng`` (pair direction,
    context images, AR splits, token orders, CFG drops, packing), one copy to the device; t and
    noise per image with ``gen`` on its device. ``latent_tokens``: M, L, P (raster order); rows no
    document names (the batch's padding) carry no loss.

    A pair (``pairs[b]``) is laid out ``[image (context) | caption]`` with ``model.caption_prob``
    (it learns to caption) else ``[caption | image (generated)]``, as pair batches are."""
    cfg = model.cfg
    M, L, _ = latent_tokens.shape
    dev = latent_tokens.device
    T = cfg.max_text_len
    slots = []
    for segments, pair in zip(documents, pairs):
        context_prob = None
        if pair:
            caption_first = rng.random() >= cfg.caption_prob
            texts = [s for s in segments if not isinstance(s, (int, np.integer))]
            images = [s for s in segments if isinstance(s, (int, np.integer))]
            segments = texts + images if caption_first else images + texts
            context_prob = 0.0 if caption_first else 1.0
        slots.append(run_slots(document_runs(segments, model.ids, T, L, cfg, rng, context_prob), model.ids, T))
    rows = document_rows(slots, cfg, L)
    t = diffusion.sample_train_t(M, gen).to(dev)
    noise = torch.randn(latent_tokens.shape, generator=gen, device=gen.device).to(dev)  # float32
    x0 = latent_tokens.float()
    return {"latents_tokens": latent_tokens, "noisy_tokens": diffusion.q_sample(x0, t, noise), "t": diffusion.model_time(t),
            "target": diffusion.target(x0, noise), "layout": layout_from_slots(rows, dev),
            "max_text_targets": len(documents) * (T + cfg.max_images)}  # text slots and <eoi>s
