"""CausalFusion: one decoder-only transformer over a condition and image latent tokens.

Deng et al. 2024, "Causal Diffusion Transformers". One set of weights, three layouts:

* **generate** (condition -> image):
  ``[condition | clean image tokens of AR steps 1..S-1 | noisy image tokens (L)]``.
  The condition is either a text prompt ``[text (T) | <boi>]`` (next-token cross-entropy)
  or ``num_cond_tokens`` class tokens (the official class-conditional model). Image tokens
  are put in a random order per sample (clean and noisy share it) and the order is cut
  into S AR steps; the noisy tokens carry the diffusion loss, weighted per AR step.
* **caption** (image -> text, text mode only):
  ``[<boi> | clean image tokens (L) | <eoi> | text (T)]`` with next-token cross-entropy.

Every slot has an attention *role* and a *level*; one rule (:func:`attention_allowed`)
turns them into the generalized causal mask, either as a boolean matrix for SDPA or as
a FlexAttention block mask. Condition tokens see the condition (text causally, class
tokens bidirectionally); clean tokens of step i see the condition and clean tokens of
steps <= i; noisy tokens of step i see the condition, clean tokens of steps < i and the
noisy tokens of step i.

Parameter names follow the official code (``x_proj``, ``t_embedder``, ``pos_embed``,
``cond_pos_embed``, ``blocks.N.attn.qkv`` ...), so :mod:`mmtrain.convert` is a
short key map.

Shapes: B batch, T text slots, L image tokens, N sequence, D width, P = p*p*C token dim.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mmtrain.distributed import to_device
from mmtrain.models.attention import flex_attention_call as _flex_attention
from mmtrain.models.base import ImageTokenModel, gathered
from mmtrain.models.config import ModelConfig
from mmtrain.models.llama import DecoderBlock, DecoderSpec, ModalityBlock, RMSNorm, Rotary

# what a slot embeds
PAD, TEXT, CLASS, CLEAN, NOISY = 0, 1, 2, 3, 4
# how a slot attends (see attention_allowed)
ROLE_PAD, ROLE_BIDIR, ROLE_CAUSAL, ROLE_CLEAN, ROLE_NOISY = 0, 1, 2, 3, 4


# --------------------------------------------------------------------------- AR split


def draw_ar_split(num_tokens: int, decay: float, rng: random.Random) -> list[int]:
    """Step sizes of a random AR split: P(S = k) ~ decay^(k-1), cut points uniform."""
    if decay == 1.0:
        steps = rng.randint(1, num_tokens)
    else:
        weights = [decay**k for k in range(num_tokens)]
        steps = rng.choices(range(1, num_tokens + 1), weights, k=1)[0]
    cuts = [0] + sorted(rng.sample(range(1, num_tokens), steps - 1)) + [num_tokens]
    return [b - a for a, b in zip(cuts[:-1], cuts[1:])]


def even_ar_split(num_tokens: int, steps: int) -> list[int]:
    """S nearly equal steps (used at inference)."""
    if not 1 <= steps <= num_tokens:
        raise ValueError(f"ar_steps must be in [1, {num_tokens}], got {steps}")
    cuts = [round(i * num_tokens / steps) for i in range(steps + 1)]
    return [b - a for a, b in zip(cuts[:-1], cuts[1:])]


def ar_loss_weights(split: list[int], max_w: float, min_w: float, schedule: str) -> torch.Tensor:
    """Per-token (in AR order) diffusion-loss weight: max_w at the first step down to min_w."""
    total = sum(split)
    starts = np.cumsum([0] + split[:-1])
    out = []
    for size, start in zip(split, starts):
        frac = start / total
        if schedule == "cosine":
            w = math.cos(math.pi * frac) * (max_w - min_w) / 2 + (max_w + min_w) / 2
        else:
            w = max_w - (max_w - min_w) * frac
        out += [w] * size
    return torch.tensor(out, dtype=torch.float32)


def clean_slot_count(n_clean: int, num_tokens: int, buckets: int) -> int:
    """Slots of the clean block of a training sequence with ``n_clean`` clean tokens: the next
    bucket edge ``ceil(k * L / buckets)`` (k = 1..buckets, so at most ``buckets`` lengths
    and always >= 1), or ``n_clean`` itself when ``buckets`` is 0 (no padding)."""
    if buckets <= 0:
        return n_clean
    return next(e for e in (math.ceil(k * num_tokens / buckets) for k in range(1, buckets + 1)) if e >= max(n_clean, 1))


def split_inputs(split: list[int], buckets: int, device: torch.device | str = "cpu") -> dict:
    """What the training forward takes of an AR split (a host list): ``ar_step`` (L,) the
    1-based AR step of each position of the AR order, on ``device``, and ``clean_slots``
    (:func:`clean_slot_count`), a Python int: the only shape the split decides."""
    L = sum(split)
    step = torch.repeat_interleave(torch.arange(1, len(split) + 1), torch.tensor(split))  # host: no device read
    return {"ar_step": to_device(step, torch.device(device)), "clean_slots": clean_slot_count(L - split[-1], L, buckets)}


# --------------------------------------------------------------------------- masks


def attention_allowed(role_q, level_q, idx_q, seg_q, alone_q, role_k, level_k, idx_k, seg_k, same_sample=True):
    """The generalized causal rule on slot descriptors (broadcasting tensors).

    A sequence is a run of segments: text slots (CAUSAL, ``seg`` -1) and image blocks, each
    block its own ``seg`` id. Within a block the single-image rule holds: BIDIR slots (class
    tokens; ``<boi>`` + image of an image that is context only, as when captioning) see their
    block; CLEAN of AR level i sees CLEAN of levels <= i; NOISY of level i sees CLEAN of
    levels < i and NOISY of level i. Across segments a slot sees what comes before it
    (text causally) except NOISY slots: an image's noisy tokens are seen only by its own
    noisy tokens, so what follows an image sees its clean copy and never a noisy one.
    ``alone_q``: the slot's image had its context dropped (classifier-free guidance) and sees
    only its own block. Pads are invisible; every slot sees itself so softmax stays finite.
    ``same_sample``: False where query and key belong to different samples (documents)
    packed into one sequence, which never see each other.
    """
    same_seg = seg_k == seg_q
    context = ((role_k != ROLE_NOISY) & (idx_k < idx_q) & (~same_seg | (role_q == ROLE_CAUSAL)) & ~alone_q)
    allowed = (
        context
        | ((role_q == ROLE_BIDIR) & (role_k == ROLE_BIDIR) & same_seg)
        | ((role_q == ROLE_CLEAN) & (role_k == ROLE_CLEAN) & same_seg & (level_k <= level_q))
        | ((role_q == ROLE_NOISY) & same_seg & (((role_k == ROLE_CLEAN) & (level_k < level_q))
                                                | ((role_k == ROLE_NOISY) & (level_k == level_q))))
    )
    return (allowed & (role_k != ROLE_PAD) & same_sample) | (idx_q == idx_k)


def default_segments(role: torch.Tensor) -> torch.Tensor:
    """``seg`` of a one-image layout (B, N): 0 for the image's CLEAN / NOISY slots, -1 for the
    condition (text, class tokens, and the BIDIR ``<boi>`` + image of a caption row, the only
    BIDIR block there)."""
    return torch.where((role == ROLE_CLEAN) | (role == ROLE_NOISY), 0, -1)


def dense_mask(role: torch.Tensor, level: torch.Tensor, sample: torch.Tensor | None = None,
               seg: torch.Tensor | None = None, alone: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean allowed-attention matrix (B, N, N) for slots described by role/level (and sample,
    when packed; seg and alone, for documents: see :func:`attention_allowed`) (B, N)."""
    idx = torch.arange(role.shape[1], device=role.device)
    same = True if sample is None else sample[:, :, None] == sample[:, None, :]
    seg = default_segments(role) if seg is None else seg
    alone = torch.zeros_like(role, dtype=torch.bool) if alone is None else alone
    return attention_allowed(role[:, :, None], level[:, :, None], idx[None, :, None], seg[:, :, None], alone[:, :, None],
                             role[:, None, :], level[:, None, :], idx[None, None, :], seg[:, None, :], same)


_flex_ok: bool | None = None


def flex_available() -> bool:
    """FlexAttention is in this torch; without it ``model.attention=flex`` falls back to SDPA
    (the same rule as a dense mask), with one warning."""
    global _flex_ok
    if _flex_ok is None:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401

            _flex_ok = True
        except ImportError as exc:
            import warnings

            warnings.warn(f"model.attention=flex: FlexAttention is not available in torch {torch.__version__} ({exc}); "
                          "using SDPA with a dense mask", stacklevel=2)
            _flex_ok = False
    return _flex_ok


_compiled_create_block_mask = None


def flex_block_mask(role: torch.Tensor, level: torch.Tensor, sample: torch.Tensor | None = None,
                    seg: torch.Tensor | None = None, alone: torch.Tensor | None = None):
    """The same rule as a FlexAttention BlockMask, built on the slots' device.

    On CUDA ``create_block_mask`` runs compiled (fused, block by block: no B x N x N
    tensor, cheap enough per micro-batch; one compile per sequence shape, see
    ``model.seq_buckets``); inside an already compiled region it is traced with the rest.
    Eager on CPU (tests, smoke runs), where it evaluates the rule on the full grid.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if sample is None:
        sample = torch.zeros_like(role)
    seg = default_segments(role) if seg is None else seg
    alone = torch.zeros_like(role, dtype=torch.bool) if alone is None else alone

    def mask_mod(b, h, q, k):
        return attention_allowed(role[b, q], level[b, q], q, seg[b, q], alone[b, q], role[b, k], level[b, k], k, seg[b, k],
                                 sample[b, q] == sample[b, k])

    B, N = role.shape
    build = create_block_mask
    if role.device.type == "cuda" and not torch.compiler.is_compiling():
        global _compiled_create_block_mask
        if _compiled_create_block_mask is None:
            _compiled_create_block_mask = torch.compile(create_block_mask, dynamic=False)
        build = _compiled_create_block_mask
    return build(mask_mod, B, None, N, N, device=role.device)


def generate_mask(cond_len: int, split: list[int], cond_causal: bool = True) -> torch.Tensor:
    """Reference: allowed mask for ``[cond | clean 1..S-1 | noisy]`` written from the paper's rules."""
    L = sum(split)
    n_clean = L - split[-1]
    N = cond_len + n_clean + L
    step = torch.repeat_interleave(torch.arange(len(split)), torch.tensor(split))  # L
    kind = torch.cat([torch.zeros(cond_len, dtype=torch.long), torch.ones(n_clean, dtype=torch.long), 2 * torch.ones(L, dtype=torch.long)])
    st = torch.cat([torch.full((cond_len,), -1), step[:n_clean], step])
    q_kind, k_kind = kind[:, None], kind[None, :]
    q_st, k_st = st[:, None], st[None, :]
    idx = torch.arange(N)
    cond_rule = idx[None, :] <= idx[:, None] if cond_causal else torch.ones(N, N, dtype=torch.bool)
    return (
        ((q_kind == 0) & (k_kind == 0) & cond_rule)
        | ((q_kind > 0) & (k_kind == 0))
        | ((q_kind == 1) & (k_kind == 1) & (k_st <= q_st))
        | ((q_kind == 2) & (k_kind == 1) & (k_st < q_st))
        | ((q_kind == 2) & (k_kind == 2) & (k_st == q_st))
    )


def caption_mask(image_len: int, text_len: int) -> torch.Tensor:
    """Reference: ``[<boi> | image (L) | <eoi> | text]``, image block bidirectional, text causal."""
    ctx = 1 + image_len
    N = ctx + 1 + text_len
    idx = torch.arange(N)
    allowed = idx[None, :] <= idx[:, None]
    allowed[:ctx, :ctx] = True
    return allowed


# --------------------------------------------------------------------------- layers


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (grid*grid, dim), rows in raster order.

    The first half encodes the column and the second the row, as the official code
    (MAE / DiT lineage) does, so a fresh model starts where an official one did.
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")

    def emb(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([emb(cols), emb(rows)], dim=1).float()


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # B -> B, D
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head attention with qk-norm; a boolean mask or a FlexAttention block mask; optional KV cache."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = nn.LayerNorm(self.head_dim)
        self.k_norm = nn.LayerNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask, cache: dict | None = None, update_cache: bool = False) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # B, H, N, d
        q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            if update_cache:
                cache["k"], cache["v"] = k, v
        if isinstance(mask, torch.Tensor):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])  # mask: B, N, Nk
        else:
            out = _flex_attention(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, mask, cache=None, update_cache=False):
        x = x + self.attn(self.norm1(x), mask, cache, update_cache)
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------- model


@dataclass
class Layout:
    """A batch laid out as one sequence per sample (all tensors B, N)."""

    kind: torch.Tensor  # PAD / TEXT / CLASS / CLEAN / NOISY: what the slot embeds
    token: torch.Tensor  # text id of TEXT slots
    pos: torch.Tensor  # text position row (TEXT) or condition token index (CLASS)
    img_idx: torch.Tensor  # raster index of the image token of CLEAN / NOISY slots, -1 elsewhere
    role: torch.Tensor  # ROLE_*: how the slot attends
    level: torch.Tensor  # AR step (1-based) of CLEAN / NOISY slots, 0 elsewhere
    target: torch.Tensor | None = None  # next-token target of TEXT slots, -100 elsewhere
    loss_weight: torch.Tensor | None = None  # diffusion loss weight of NOISY slots, 0 elsewhere
    noisy_start: int = 0  # first noisy slot of generation rows (unpacked layouts)
    sample: torch.Tensor | None = None  # batch row of the sample (document) a slot belongs to; set when packed
    # documents (mmtrain.models.document_layout), None in one-image layouts:
    seg: torch.Tensor | None = None  # image block id of image slots, -1 for text (see attention_allowed)
    alone: torch.Tensor | None = None  # bool: the slot's image had its context dropped (CFG)
    image: torch.Tensor | None = None  # row of the batch's image tensors (M, L, P) an image slot reads, -1 elsewhere

    def attention_mask(self, backend: str = "sdpa"):
        if backend == "flex" and flex_available():
            return flex_block_mask(self.role, self.level, self.sample, self.seg, self.alone)
        return dense_mask(self.role, self.level, self.sample, self.seg, self.alone)

    def rope_positions(self) -> torch.Tensor:
        """B, N: each slot's rotary position (``model.backbone=llama``): how many text slots come
        before it in its sample. Text counts up as in a plain language model (``<s>`` = 0);
        ``<boi>`` and ``<eoi>`` are text; every token of an image, clean or noisy, at every AR
        step, shares one position, the one after its ``<boi>`` (the 2-D sin-cos embedding carries
        where a token is in the image), and ``<eoi>`` takes it too, so the text after an image
        continues one past it. Padding slots get what precedes them (they attend to nothing)."""
        is_text = ((self.kind == TEXT) | (self.kind == CLASS)).long()
        before = torch.cumsum(is_text, 1) - is_text  # B, N: text slots before, in the row
        if self.sample is None:
            return before
        # packed rows: count from the first slot of each slot's sample
        B, N = self.kind.shape
        idx = torch.arange(N, device=self.kind.device).expand(B, N)
        first = torch.cat([torch.ones_like(self.sample[:, :1], dtype=torch.bool), self.sample[:, 1:] != self.sample[:, :-1]], 1)
        start = torch.where(first, idx, 0).cummax(1).values  # B, N
        return before - before.gather(1, start)

    def image_slots(self) -> torch.Tensor:
        """B, N bool: the slots that hold an image token (clean or noisy)."""
        return (self.kind == CLEAN) | (self.kind == NOISY)

    def sample_rows(self) -> torch.Tensor:
        """B, N: which row of the image tensors (image, timestep) and labels each slot reads."""
        if self.image is not None:
            return self.image.clamp(min=0)
        if self.sample is not None:
            return self.sample.clamp(min=0)
        B, N = self.kind.shape
        return torch.arange(B, device=self.kind.device)[:, None].expand(B, N)

    def pack(self, sample: torch.Tensor, offset: torch.Tensor) -> Layout:
        """Gather the slots of a :func:`pack_plan` (``sample``, ``offset``: R, P long, -1 in
        empty slots) into R packed rows of P slots: slot ``(r, j)`` takes the ``offset``-th
        non-pad slot of batch row ``sample``. All on the device; nothing is read back."""
        # B, N: each row's non-pad slots first, in sequence order
        first = torch.argsort((self.kind == PAD).to(torch.int32), dim=1, stable=True)
        valid = sample >= 0
        b = sample.clamp(min=0)
        slot = first[b, offset.clamp(min=0)]  # R, P
        fields = {name: torch.where(valid, getattr(self, name)[b, slot], _PAD_VALUES[name])
                  for name in _PAD_VALUES if name != "sample"}
        return Layout(**fields, sample=torch.where(valid, sample, -1))


_PAD_VALUES = dict(kind=PAD, token=0, pos=0, img_idx=-1, role=ROLE_PAD, level=0, target=-100, loss_weight=0.0, sample=-1)


def sample_sizes(cfg: ModelConfig, num_tokens: int, n_clean: int, text_len: list[int] | None = None,
                 caption_rows: list[bool] | None = None, batch: int = 0) -> list[int]:
    """Non-pad slots of each row of a training layout, from what the host knows (the loader's
    text lengths after the CFG drop, the host-drawn caption rows and AR split): the sizes
    :func:`pack_plan` packs. Must agree with :meth:`CausalFusion.layout` (tested)."""
    L = num_tokens
    if cfg.condition == "class":
        return [cfg.num_cond_tokens + n_clean + L] * batch
    return [1 + L + 1 + n if cap else n + 1 + n_clean + L for n, cap in zip(text_len, caption_rows)]


def pack_plan(sizes: list[int], length: int, row_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Host-side packing of samples of ``sizes`` slots into rows of ``length``: first-fit,
    longest sample first. Returns ``sample`` and ``offset`` (R, length) long (-1 where a row
    is empty), R rounded up to a multiple of ``row_multiple`` (static shapes: see
    ``model.seq_buckets``). Computed from host values only, so no device read."""
    if max(sizes) > length:
        raise ValueError(f"model.pack_length={length} is shorter than the longest sample ({max(sizes)} slots)")
    bins: list[list[int]] = []
    room: list[int] = []
    for b in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for j, free in enumerate(room):
            if sizes[b] <= free:
                bins[j].append(b)
                room[j] -= sizes[b]
                break
        else:
            bins.append([b])
            room.append(length - sizes[b])
    rows = -(-len(bins) // row_multiple) * row_multiple
    sample = np.full((rows, length), -1, dtype=np.int64)
    offset = np.full((rows, length), -1, dtype=np.int64)
    for r, members in enumerate(bins):
        at = 0
        for b in members:
            sample[r, at:at + sizes[b]] = b
            offset[r, at:at + sizes[b]] = np.arange(sizes[b])
            at += sizes[b]
    return torch.from_numpy(sample), torch.from_numpy(offset)


class CausalFusion(ImageTokenModel):
    """The decoder. ``forward`` returns the training losses."""

    def __init__(self, cfg: ModelConfig, latent_channels: int, latent_size: int, vocab_size: int = 0, special_ids: dict | None = None):
        super().__init__(cfg, latent_channels, latent_size, vocab_size, special_ids)
        D = cfg.hidden_size
        self.llama = cfg.backbone == "llama"
        if cfg.backbone_training != "full" and not self.llama:  # checked here: train.init_from may set the backbone
            raise ValueError(f"model.backbone_training={cfg.backbone_training} freezes pretrained LLaMA weights: it needs "
                             "model.backbone=llama (or train.init_from a Hugging Face checkpoint)")
        if self.llama:  # a checkpoint's table may be padded past its tokenizer: keep its rows
            self.vocab_size = vocab_size = max(vocab_size, cfg.llama.vocab_size)

        self.x_proj = nn.Linear(self.token_dim, D)
        self.t_embedder = TimestepEmbedder(D)
        self.pos_embed = nn.Parameter(sincos_2d(D, self.grid)[None], requires_grad=cfg.trainable_pos)  # 1, L, D
        if cfg.condition == "text":
            self.tok_embed = nn.Embedding(vocab_size, D)
            if not self.llama:  # LLaMA text positions are rotary
                self.text_pos = nn.Parameter(torch.zeros(cfg.max_text_len + 2, D))  # + rows for <boi>, <eoi>
        else:
            self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.num_cond_tokens * D)  # last row: null class
            self.cond_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_cond_tokens, D))
        if self.llama:
            # the names of a Hugging Face LLaMA without its "model." prefix, under CausalFusion's
            # (tok_embed = embed_tokens, blocks = layers, final_norm = norm): mmtrain.models.pretrained maps them
            self.spec = DecoderSpec.from_model_config(cfg, vocab_size)
            block = ModalityBlock if cfg.backbone_training == "frozen_text" else DecoderBlock
            self.blocks = nn.ModuleList(block(self.spec) for _ in range(cfg.depth))
            self.rotary = Rotary(self.spec.head_dim, self.spec.rope_theta, self.spec.rope_scaling)
            self.final_norm = RMSNorm(D, self.spec.rms_norm_eps)
        else:
            self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
            self.final_norm = nn.LayerNorm(D)
        self.diffusion_head = nn.Linear(D, self.token_dim)
        if cfg.condition == "text":
            self.lm_head = nn.Linear(D, vocab_size, bias=False)
            if self.llama and self.spec.tie_word_embeddings:
                self.lm_head.weight = self.tok_embed.weight
        if cfg.attention == "flex":
            flex_available()  # decided (and warned about) once, here: never inside a compiled forward
        self._init_weights()

    def _init_weights(self) -> None:
        # each init under `gathered`: a model built partitioned (ZeRO-3, mmtrain.models.pretrained) sees full tensors
        self._init_linear_layers()
        if self.cfg.condition == "text":
            normal = [self.tok_embed.weight] + ([] if self.llama else [self.text_pos])
            if self.lm_head.weight is not self.tok_embed.weight:
                normal.append(self.lm_head.weight)
        else:
            normal = [self.class_embed.weight, self.cond_pos_embed]
        for p in normal:
            with gathered([p]):
                nn.init.normal_(p, std=0.02)
        with gathered([self.diffusion_head.weight, self.diffusion_head.bias]):
            nn.init.zeros_(self.diffusion_head.weight)
            nn.init.zeros_(self.diffusion_head.bias)
        self.copy_text_weights_to_image()
        self.freeze_for_training()

    # ---------------------------------------------------------------- LLaMA backbone

    @torch.no_grad()
    def copy_text_weights_to_image(self) -> None:
        """``frozen_text``: each block's image weights start as its text (pretrained) weights."""
        for block in self.blocks:
            if isinstance(block, ModalityBlock):
                with gathered(list(block.parameters())):  # one block at a time
                    text = dict(block.named_parameters())
                    for name, p in block.image.named_parameters():
                        p.data.copy_(text[name].data)

    def pretrained_parameter_names(self) -> set[str]:
        """The parameters a Hugging Face language model provides (``model.backbone=llama``): the
        text embedding, each block's text weights, the final norm and the LM head. Empty for DiT."""
        if not self.llama:
            return set()
        return {name for name, _ in self.named_parameters(remove_duplicate=False)
                if name.startswith(("tok_embed.", "final_norm.", "lm_head.")) or
                (name.startswith("blocks.") and ".image." not in name)}

    def freeze_for_training(self) -> None:
        """``model.backbone_training``: ``frozen_text`` and ``new_only`` freeze the pretrained weights
        (``new_only`` also the image copies, which it does not have)."""
        if self.cfg.backbone_training == "full":
            return
        frozen = self.pretrained_parameter_names()
        for name, p in self.named_parameters(remove_duplicate=False):
            if name in frozen:
                p.requires_grad_(False)

    @property
    def max_text_positions(self) -> int:
        """How many text tokens one forward of :meth:`text_logits` can take."""
        return self.cfg.llama.max_position_embeddings if self.llama else self.cfg.max_text_len

    def text_embed(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Text ids at text-position rows ``pos`` (DiT's learned table; LLaMA's positions are rotary) -> ..., D."""
        h = self.tok_embed(token)
        return h if self.llama else h + self.text_pos[pos]

    def text_logits(self, ids: torch.Tensor, text_len: torch.Tensor) -> torch.Tensor:
        """Text only: ids (B, N, right-padded) with lengths (B,) -> next-token logits (B, N, V) in
        float32, causal, positions 0..N-1 (the language model alone; ``mmtrain eval text``)."""
        B, N = ids.shape
        if N > self.max_text_positions:
            raise ValueError(f"text_logits: {N} tokens, more than the model's {self.max_text_positions} text positions")
        ar = torch.arange(N, device=ids.device)
        valid = ar[None] < text_len[:, None]  # B, N
        mask = (ar[None, :, None] >= ar[None, None, :]) & valid[:, None, :]
        mask = mask | torch.eye(N, dtype=torch.bool, device=ids.device)[None]  # padding sees itself
        h = self.text_embed(ids.masked_fill(~valid, self.ids["pad"]), ar.expand(B, N))
        h = self.run_blocks(h, mask, positions=ar.expand(B, N))
        return self.lm_head(h).float()

    # ---------------------------------------------------------------- embedding

    def class_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels (B,) -> condition tokens (B, num_cond_tokens, D); label num_classes is the null class."""
        n, D = self.cfg.num_cond_tokens, self.cfg.hidden_size
        return self.class_embed(labels).view(-1, n, D) + self.cond_pos_embed

    def image_embed(self, tokens: torch.Tensor, idx: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Image tokens (B, n, P) at raster positions ``idx`` (B, n) -> B, n, D; with ``t``: noisy tokens."""
        h = self.x_proj(tokens.to(self.x_proj.weight.dtype)) + self.pos_embed[0][idx]
        return h if t is None else h + self.t_embedder(t)[:, None]

    def embed(self, lay: Layout, clean: torch.Tensor, noisy: torch.Tensor | None, t: torch.Tensor | None,
              labels: torch.Tensor | None = None) -> torch.Tensor:
        """Slot embeddings (B, N, D). ``clean``/``noisy``: B, L, P in raster order."""
        rows = lay.sample_rows()  # B, N
        idx = lay.img_idx.clamp(min=0)
        src = clean[rows, idx]  # B, N, P
        if noisy is not None:
            src = torch.where((lay.kind == NOISY)[..., None], noisy[rows, idx], src)
        h = self.x_proj(src.to(self.x_proj.weight.dtype)) + self.pos_embed[0][idx]
        if t is not None:
            h = h + (lay.kind == NOISY)[..., None] * self.t_embedder(t)[rows]
        if self.cfg.condition == "text":
            text = self.text_embed(lay.token, lay.pos)
            h = torch.where((lay.kind == TEXT)[..., None], text, h)
        else:
            cls = self.class_tokens(labels)[rows, lay.pos.clamp(max=self.cfg.num_cond_tokens - 1)]
            h = torch.where((lay.kind == CLASS)[..., None], cls, h)
        return torch.where((lay.kind == PAD)[..., None], torch.zeros_like(h), h)

    def transformer_blocks(self) -> list[nn.Module]:
        """The blocks ``train.compile`` compiles one by one."""
        return list(self.blocks)

    def run_blocks(self, h: torch.Tensor, mask, caches: list | None = None, update_cache: bool = False,
                   positions: torch.Tensor | None = None, image_slots: torch.Tensor | None = None) -> torch.Tensor:
        """Transformer blocks then the final norm. ``mask``: bool (B, N, Nk) or a flex BlockMask.
        LLaMA backbone: ``positions`` (B, N) the slots' rotary positions (:meth:`Layout.rope_positions`),
        ``image_slots`` (B, N) which slots hold image tokens (their own weights in ``frozen_text``)."""
        if self.llama:
            if positions is None:
                raise ValueError("model.backbone=llama: run_blocks needs the slots' rotary positions")
            extra = (self.rotary(positions),)  # cos, sin: B, N, d
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            if self.llama:
                args = (h, mask, *extra, cache, update_cache, image_slots)
            else:
                args = (h, mask, cache, update_cache)
            if self.cfg.grad_checkpoint and self.training and cache is None:
                h = checkpoint(block, *args, use_reentrant=False)
            else:
                h = block(*args)
        return self.final_norm(h)

    # ---------------------------------------------------------------- layout

    def layout(self, order: torch.Tensor, ar_step: torch.Tensor, clean_slots: int, loss_weights: torch.Tensor,
               text: torch.Tensor | None = None, text_len: torch.Tensor | None = None,
               caption_rows: torch.Tensor | None = None) -> Layout:
        """Lay out a training batch: device tensors in, device tensors out, shapes fixed by
        ``clean_slots`` (see :func:`split_inputs`), nothing read back.

        ``order``: B, L random token order; ``ar_step``: L, the AR step of each order
        position; ``clean_slots``: the clean block's length C (>= the clean tokens, i.e. the
        positions not in the last step; the rest of the block is padding); ``text``: B, T ids.
        """
        B, L = order.shape
        dev = order.device
        C = clean_slots
        zeros = lambda n: torch.zeros(B, n, dtype=torch.long, device=dev)  # noqa: E731
        full = lambda n, v: torch.full((B, n), v, dtype=torch.long, device=dev)  # noqa: E731
        # the clean block [clean tokens of steps 1..S-1 | padding]: position j of the AR order
        # is clean when its step is not the last one
        step_c = ar_step[:C]  # C
        is_clean = step_c < ar_step[L - 1:]  # C
        img_kind = torch.cat([torch.where(is_clean, CLEAN, PAD), torch.full((L,), NOISY, device=dev)]).expand(B, -1)
        img_role = torch.cat([torch.where(is_clean, ROLE_CLEAN, ROLE_PAD), torch.full((L,), ROLE_NOISY, device=dev)]).expand(B, -1)
        img_level = torch.cat([torch.where(is_clean, step_c, 0), ar_step]).expand(B, -1)
        img_idx = torch.cat([torch.where(is_clean, order[:, :C], -1), order], 1)
        img_w = torch.cat([torch.zeros(B, C, device=dev), loss_weights.to(dev).float().expand(B, L)], 1)

        if self.cfg.condition == "class":
            n = self.cfg.num_cond_tokens
            return Layout(
                kind=torch.cat([full(n, CLASS), img_kind], 1), token=zeros(n + C + L),
                pos=torch.cat([torch.arange(n, device=dev).expand(B, n), zeros(C + L)], 1),
                img_idx=torch.cat([full(n, -1), img_idx], 1), role=torch.cat([full(n, ROLE_BIDIR), img_role], 1),
                level=torch.cat([zeros(n), img_level], 1), target=full(n + C + L, -100),
                loss_weight=torch.cat([torch.zeros(B, n, device=dev), img_w], 1), noisy_start=n + C)

        T = text.shape[1]
        ar = torch.arange(T, device=dev)
        valid = ar[None] < text_len[:, None]  # B, T
        tok = text.masked_fill(~valid, self.ids["pad"])
        next_tok = torch.where(ar[None] + 1 < text_len[:, None], F.pad(text, (0, 1))[:, 1:], torch.full_like(text, -100))
        text_kind = torch.where(valid, TEXT, PAD)
        text_role = torch.where(valid, ROLE_CAUSAL, ROLE_PAD)

        # generate: [text | <boi> | clean | noisy]
        gen = dict(
            kind=torch.cat([text_kind, full(1, TEXT), img_kind], 1),
            token=torch.cat([tok, full(1, self.ids["boi"]), zeros(C + L)], 1),
            pos=torch.cat([ar.expand(B, T), full(1, T), zeros(C + L)], 1),
            img_idx=torch.cat([full(T + 1, -1), img_idx], 1),
            role=torch.cat([text_role, full(1, ROLE_CAUSAL), img_role], 1),
            level=torch.cat([zeros(T + 1), img_level], 1),
            target=torch.cat([next_tok, full(1 + C + L, -100)], 1),
            loss_weight=torch.cat([torch.zeros(B, T + 1, device=dev), img_w], 1),
        )
        # caption: [<boi> | image | <eoi> | text]
        cap = dict(
            kind=torch.cat([full(1, TEXT), full(L, CLEAN), full(1, TEXT), text_kind], 1),
            token=torch.cat([full(1, self.ids["boi"]), zeros(L), full(1, self.ids["eoi"]), tok], 1),
            pos=torch.cat([full(1, T), zeros(L), full(1, T + 1), ar.expand(B, T)], 1),
            img_idx=torch.cat([full(1, -1), torch.arange(L, device=dev).expand(B, L), full(1 + T, -1)], 1),
            role=torch.cat([full(1 + L, ROLE_BIDIR), full(1, ROLE_CAUSAL), text_role], 1),
            level=zeros(L + 2 + T),
            target=torch.cat([full(L + 2, -100), next_tok], 1),
            loss_weight=torch.zeros(B, L + 2 + T, device=dev),
        )
        N = max(T + 1 + C + L, L + 2 + T)
        rows = caption_rows if caption_rows is not None else torch.zeros(B, dtype=torch.bool, device=dev)
        fields = {}
        for name, v in _PAD_VALUES.items():
            if name == "sample":
                continue
            g = F.pad(gen[name], (0, N - gen[name].shape[1]), value=v)
            c = F.pad(cap[name], (0, N - cap[name].shape[1]), value=v)
            fields[name] = torch.where(rows[:, None], c, g)
        return Layout(**fields, noisy_start=T + 1 + C)

    # ---------------------------------------------------------------- training

    def forward(self, *, latents_tokens, noisy_tokens, t, target, order=None, ar_step=None, clean_slots=0, loss_weights=None,
                text=None, text_len=None, caption_rows=None, labels=None, pack_sample=None, pack_offset=None,
                layout: Layout | None = None, max_text_targets: int = 0, return_pred: bool = False) -> dict:
        """Training losses. Every tensor lives on the model's device; the only host values
        are ``clean_slots`` and the shapes, so the forward compiles to one graph per
        sequence shape (``model.seq_buckets``) and reads nothing back.

        Args:
            latents_tokens: B, L, P clean tokens (raster order); noisy_tokens: the same noised
                to model-time ``t`` (B,) (float32: cast once, to the weights' dtype, where
                embedded); target: what the diffusion head regresses (eps, x0 or velocity,
                per the diffusion process), raster order.
            order: B, L random AR order; ar_step, clean_slots: the AR split
                (:func:`split_inputs`); loss_weights: L (AR order).
            text, text_len, caption_rows: text mode: B, T ids (prompt already dropped for
                CFG where chosen), lengths, True = image -> text layout.
            labels: class mode: B labels (num_classes = dropped).
            pack_sample, pack_offset: with ``model.pack_length``, the host's :func:`pack_plan`
                (R, pack_length each), as :func:`training_inputs` makes it.
            layout, max_text_targets: documents (:mod:`mmtrain.models.document_layout`): the
                laid-out rows, built on the host, with ``image`` naming the row of
                ``latents_tokens`` / ``noisy_tokens`` / ``t`` / ``target`` (M images) each image
                slot reads, and a static bound on the text targets; the one-image arguments
                (order ... pack_offset) are then unused.
            return_pred: also return ``pred`` (B, L, P): the diffusion head on the noisy
                tokens of generation rows, in AR order.
        """
        if layout is not None:
            lay = layout
        else:
            lay = self.layout(order, ar_step, clean_slots, loss_weights, text, text_len, caption_rows)
            max_text_targets = latents_tokens.shape[0] * (text.shape[1] - 1) if text is not None else 0
        if layout is None and self.cfg.pack_length:
            if return_pred:
                raise ValueError("return_pred needs an unpacked batch (model.pack_length=0)")
            if pack_sample is None:
                raise ValueError("model.pack_length is set: the forward needs the packing plan of training_inputs "
                                 "(pack_sample, pack_offset)")
            lay = lay.pack(pack_sample, pack_offset)
        h = self.embed(lay, latents_tokens, noisy_tokens, t, labels)
        h = self.run_blocks(h, lay.attention_mask(self.cfg.attention), positions=lay.rope_positions() if self.llama else None,
                            image_slots=lay.image_slots())  # B, N, D

        pred = self.diffusion_head(h).float()  # B, N, P
        tgt = target[lay.sample_rows(), lay.img_idx.clamp(min=0)]
        per_tok = ((pred - tgt.float()) ** 2).mean(-1)
        is_noisy = lay.kind == NOISY
        diff_loss = (per_tok * lay.loss_weight * is_noisy).sum() / is_noisy.sum().clamp(min=1)
        if self.cfg.condition == "text":
            text_loss, n_text = self.text_loss(h, lay.target, max_targets=max_text_targets)
        else:
            n_text, text_loss = torch.zeros((), dtype=torch.long, device=h.device), torch.zeros((), device=h.device)
        loss = diff_loss + self.cfg.text_loss_weight * text_loss
        out = {"loss": loss, "diffusion_loss": diff_loss.detach(), "text_loss": text_loss.detach(),
               "text_tokens": n_text.detach(), "image_tokens": is_noisy.sum().detach(),
               "sequence_tokens": (lay.kind != PAD).sum().detach(), "sequence_length": h.shape[1], "sequence_rows": h.shape[0]}
        if return_pred:
            if layout is not None:
                raise ValueError("return_pred needs a one-image layout")
            out["pred"] = pred[:, lay.noisy_start:lay.noisy_start + order.shape[1]]
        return out

    def text_loss(self, h: torch.Tensor, target: torch.Tensor, max_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean next-token cross-entropy (fp32) over the slots with a target, and their count.

        The LM head runs on those slots only: a fixed ``max_targets`` (B (T - 1): no sample
        has more) gathered on the device, targets first; at a 32k-150k vocabulary the logits
        of every slot would be gigabytes. Static size, so no read back and no new shape.
        """
        flat_target = target.flatten()  # B N
        k = min(max_targets, flat_target.numel())
        idx = torch.argsort((flat_target == -100).to(torch.int32), stable=True)[:k]  # slots with a target first
        logits = self.lm_head(h.flatten(0, 1)[idx]).float()  # k, V
        ce = F.cross_entropy(logits, flat_target[idx], ignore_index=-100, reduction="sum")
        n_text = (flat_target != -100).sum()
        return ce / n_text.clamp(min=1), n_text


def training_flops(model: CausalFusion, batch_size: int, seq_len: int) -> float:
    """Model FLOPs of one training forward + backward over ``batch_size`` sequences of
    ``seq_len`` positions (as run: padding included), from the model shape (the MFU
    numerator): 6 x (weights applied per position) per position, plus 12 x depth x D x
    seq_len^2 per sequence for attention scores and values (dense, as is the convention; the
    causal mask's skipped blocks are not subtracted). The LM head counts on the T - 1 slots
    per sequence it runs on (:meth:`CausalFusion.text_loss`), not on every position."""
    cfg, D = model.cfg, model.cfg.hidden_size
    if model.llama:  # q, k, v, o + gate, up, down (one modality's weights per slot)
        s = model.spec
        per_block = 2 * D * s.num_attention_heads * s.head_dim + 2 * D * s.num_key_value_heads * s.head_dim + 3 * D * s.intermediate_size
    else:
        per_block = 4 * D * D + 2 * D * int(D * cfg.mlp_ratio)  # qkv + proj, fc1 + fc2
    per_position = cfg.depth * per_block + 2 * D * model.token_dim
    lm_head = D * model.vocab_size * (cfg.max_text_len - 1) if cfg.condition == "text" else 0
    return batch_size * (6.0 * (per_position * seq_len + lm_head) + 12.0 * cfg.depth * D * seq_len**2)


# --------------------------------------------------------------------------- training inputs


def training_inputs(model: CausalFusion, latent_tokens: torch.Tensor, diffusion, gen: torch.Generator, rng: random.Random,
                    text: torch.Tensor | None = None, text_len: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> dict:
    """Draw everything random about one training batch: direction, CFG drop, t, noise, order, split.

    ``latent_tokens``: B, L, P clean tokens in raster order, on the model's device;
    ``text``/``text_len`` (text mode) or ``labels`` (class mode) as the loader gives them
    (host tensors). The host decisions (caption rows, prompt drop, AR split, packing) are
    drawn with ``rng`` (a seeded ``random.Random``) from what the host has; tensors (t,
    noise, order) with ``gen`` on its device. Host tensors reach the device with
    non-blocking copies: nothing here waits for the device. The noising runs in float32
    whatever ``latent_tokens``' dtype (the model casts ``noisy_tokens`` once).
    """
    cfg = model.cfg
    B, L, _ = latent_tokens.shape
    dev = latent_tokens.device
    g = gen.device  # draws happen on the generator's device (the rank's GPU in training): nothing to copy
    cond, lengths, caption = {}, None, None
    if cfg.condition == "text":
        caption = [rng.random() < cfg.caption_prob for _ in range(B)]
        # classifier-free guidance: a dropped prompt becomes the empty caption "<s></s>"
        drop = [not c and rng.random() < cfg.cond_drop_prob for c in caption]
        if cfg.pack_length:  # host lengths for the packing plan: the loader's, after the drop
            lengths = [2 if d else n for d, n in zip(drop, text_len.tolist())]
        dropped = to_device(torch.tensor(drop), text.device)
        null = null_condition(model, text=text, text_len=text_len)
        text = torch.where(dropped[:, None], null["text"], text)
        text_len = torch.where(dropped, null["text_len"], text_len)
        cond = {"text": to_device(text, dev), "text_len": to_device(text_len, dev),
                "caption_rows": to_device(torch.tensor(caption), dev)}
    else:
        if labels is None:
            raise ValueError("model.condition=class needs class labels in the batch (the shards' 'cls' field)")
        drop = to_device(torch.tensor([rng.random() < cfg.cond_drop_prob for _ in range(B)]), labels.device)
        cond = {"labels": to_device(torch.where(drop, cfg.num_classes, labels.long()), dev)}
    split = draw_ar_split(L, cfg.ar_step_decay, rng)
    weights = ar_loss_weights(split, cfg.max_ar_weight, cfg.min_ar_weight, cfg.ar_weight_schedule)
    ar = split_inputs(split, cfg.seq_buckets, dev)
    if cfg.pack_length:
        # packed rows drop every pad, so the unpacked layout takes one shape (the longest clean
        # block) and the row count is what is bucketed
        ar["clean_slots"] = L
        sizes = sample_sizes(cfg, L, L - split[-1], lengths, caption, B)
        sample, offset = pack_plan(sizes, cfg.pack_length, -(-B // cfg.seq_buckets) if cfg.seq_buckets else 1)
        ar.update(pack_sample=to_device(sample, dev), pack_offset=to_device(offset, dev))

    t = diffusion.sample_train_t(B, gen).to(dev)
    noise = torch.randn(latent_tokens.shape, generator=gen, device=g).to(dev)  # float32
    order = torch.argsort(torch.rand(B, L, generator=gen, device=g), dim=1).to(dev)
    x0 = latent_tokens.float()
    return {
        **cond, "latents_tokens": latent_tokens, "noisy_tokens": diffusion.q_sample(x0, t, noise),
        "t": diffusion.model_time(t), "target": diffusion.target(x0, noise), "order": order,
        **ar, "loss_weights": to_device(weights, dev),
    }


# --------------------------------------------------------------------------- inference


def condition_prefix(model: CausalFusion, text: torch.Tensor | None = None, text_len: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (B, C, D) and roles (B, C) of the condition: ``[text | <boi>]`` or the class tokens."""
    if model.cfg.condition == "class":
        h = model.class_tokens(labels)
        return h, torch.full(h.shape[:2], ROLE_BIDIR, device=h.device)
    B, T = text.shape
    dev = text.device
    valid = torch.arange(T, device=dev)[None] < text_len[:, None]
    tok = torch.cat([text.masked_fill(~valid, model.ids["pad"]), torch.full((B, 1), model.ids["boi"], device=dev)], 1)
    h = model.text_embed(tok, torch.arange(T + 1, device=dev))
    role = torch.cat([torch.where(valid, ROLE_CAUSAL, ROLE_PAD), torch.full((B, 1), ROLE_CAUSAL, device=dev)], 1)
    return h, role


def null_condition(model: CausalFusion, text: torch.Tensor | None = None, text_len: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> dict:
    """The unconditional input for CFG: the empty caption ``<s></s>`` or the null class."""
    if model.cfg.condition == "class":
        return {"labels": torch.full_like(labels, model.cfg.num_classes)}
    empty = torch.full_like(text, model.ids["pad"])
    empty[:, 0], empty[:, 1] = model.ids["bos"], model.ids["eos"]
    return {"text": empty, "text_len": torch.full_like(text_len, 2)}


class ARContext:
    """What noisy tokens attend to while sampling: the condition plus clean tokens of finished steps.

    With ``use_cache`` those are held as per-layer keys/values (computed once); without
    it the whole sequence is re-run under the generalized causal mask (the reference).
    """

    def __init__(self, model: CausalFusion, h: torch.Tensor, role: torch.Tensor, use_cache: bool = True):
        self.model, self.use_cache = model, use_cache
        self.role, self.level = role, torch.zeros_like(role)
        self.next_level = 1
        # rotary positions (LLaMA): the prefix's slots count up; every image token takes the one after it
        real = (role != ROLE_PAD).long()
        self.pos = torch.cumsum(real, 1) - real  # B, C
        self.image_pos = real.sum(1)  # B
        if use_cache:
            self.caches = [dict() for _ in model.blocks]
            model.run_blocks(h, dense_mask(role, self.level), self.caches, update_cache=True, positions=self.pos,
                             image_slots=torch.zeros_like(role, dtype=torch.bool))
        else:
            self.h = h

    def _mask_over_cache(self, n: int) -> torch.Tensor:
        B = self.role.shape[0]
        keys = (self.role != ROLE_PAD)[:, None, :].expand(B, n, -1)
        return torch.cat([keys, torch.ones(B, n, n, dtype=torch.bool, device=keys.device)], 2)

    def _run(self, x: torch.Tensor, role: int, update: bool) -> torch.Tensor:
        B, n = x.shape[:2]
        pos = self.image_pos[:, None].expand(B, n)
        if self.use_cache:
            return self.model.run_blocks(x, self._mask_over_cache(n), self.caches, update_cache=update, positions=pos,
                                         image_slots=torch.ones(B, n, dtype=torch.bool, device=x.device))
        role_all = torch.cat([self.role, torch.full((B, n), role, device=x.device)], 1)
        level_all = torch.cat([self.level, torch.full((B, n), self.next_level, device=x.device)], 1)
        seq = torch.cat([self.h, x], 1)
        pos_all = torch.cat([self.pos, self.image_pos[:, None].expand(B, seq.shape[1] - self.pos.shape[1])], 1)
        if update:
            self.h = seq
        return self.model.run_blocks(seq, dense_mask(role_all, level_all), positions=pos_all,
                                     image_slots=role_all >= ROLE_CLEAN)[:, -n:]

    def predict(self, noisy_h: torch.Tensor) -> torch.Tensor:
        """Diffusion-head output (B, n, P, float32) for embedded noisy tokens of the next step."""
        return self.model.diffusion_head(self._run(noisy_h, ROLE_NOISY, update=False)).float()

    def add_clean(self, clean_h: torch.Tensor) -> None:
        """Append the finished step's clean tokens (embedded) as context for later steps."""
        self._run(clean_h, ROLE_CLEAN, update=True)
        B, n = clean_h.shape[:2]
        self.role = torch.cat([self.role, torch.full((B, n), ROLE_CLEAN, device=clean_h.device)], 1)
        self.level = torch.cat([self.level, torch.full((B, n), self.next_level, device=clean_h.device)], 1)
        self.next_level += 1


def guidance_scale(scale: float, schedule: str, progress: float, t_model, interval: tuple[float, float]):
    """CFG scale for one model call.

    ``constant``: ``scale`` throughout. ``linear``: grows from 1 with the fraction of
    tokens generated by the end of the current AR step (as MAR). ``interval``: ``scale``
    while ``interval[0] <= t < interval[1]`` in model time (0..1000), 1 outside (as the
    official ``cfg_interval``). ``t_model``: a float, or the call's model-time tensor (B,):
    the interval is then decided on the device, per row (a tensor of scales), so sampling
    never reads t back.
    """
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * progress
    if schedule == "interval":
        if isinstance(t_model, torch.Tensor):
            return torch.where((t_model >= interval[0]) & (t_model < interval[1]), scale, 1.0)
        return scale if interval[0] <= t_model < interval[1] else 1.0
    raise ValueError(f"sample.cfg_schedule: expected 'constant', 'linear' or 'interval', got {schedule!r}")


def guided(out: torch.Tensor, scale) -> torch.Tensor:
    """Combine a [cond; uncond] batch: ``uncond + scale * (cond - uncond)``; scale 1 returns cond
    exactly. ``scale``: a float or a per-row tensor (B,) from :func:`guidance_scale`."""
    cond, uncond = out.chunk(2)
    if isinstance(scale, torch.Tensor):
        s = scale.to(out.dtype).view(-1, *([1] * (out.dim() - 1)))
        return torch.where(s == 1, cond, uncond + s * (cond - uncond))
    return cond if scale == 1.0 else uncond + scale * (cond - uncond)


@torch.no_grad()
def sample_image_tokens(model: CausalFusion, diffusion, *, ar_steps: int, generator: torch.Generator,
                        text: torch.Tensor | None = None, text_len: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                        cfg_scale: float = 1.0, cfg_schedule: str = "constant", cfg_interval: tuple[float, float] = (0.0, 1000.0),
                        use_cache: bool = True, clip_x0: float = 0.0, known_tokens: torch.Tensor | None = None,
                        known_mask: torch.Tensor | None = None, flow_options: dict | None = None) -> torch.Tensor:
    """Condition -> image tokens (B, L, P, raster order) in ``ar_steps`` AR steps.

    Each step denoises its subset of tokens (a random order, cut evenly) with the full
    diffusion chain while attending to the condition and the clean tokens of earlier
    steps. ``cfg_scale != 1`` runs a [cond; uncond] batch (see :func:`guidance_scale`).

    Editing: ``known_tokens`` (B, L, P) with ``known_mask`` (L,) True where a token is
    kept. Kept tokens enter as the clean tokens of a first AR step (the model saw such
    partial contexts in training: any subset can be an earlier step); only the others
    are generated, in ``ar_steps`` steps.

    ``flow_options`` (rectified flow only): the sampler's ``sampler``, ``drift_scale``, ``noise_scale``.
    """
    cond = {"text": text, "text_len": text_len, "labels": labels}
    B = (labels if model.cfg.condition == "class" else text).shape[0]
    L, P = model.num_image_tokens, model.token_dim
    dev = model.x_proj.weight.device
    dtype = model.x_proj.weight.dtype
    use_cfg = cfg_scale != 1.0
    dup = (lambda x: torch.cat([x, x])) if use_cfg else (lambda x: x)  # noqa: E731

    h, role = condition_prefix(model, **cond)
    if use_cfg:
        h_null, role_null = condition_prefix(model, **{**cond, **null_condition(model, **cond)})
        h, role = torch.cat([h, h_null]), torch.cat([role, role_null])
    ctx = ARContext(model, h, role, use_cache)

    out = torch.zeros(B, L, P, device=dev, dtype=dtype)
    todo = torch.arange(L)
    if known_mask is not None:
        known_mask = known_mask.cpu().bool()  # a host mask (the user's region): its indices are host values
        if known_mask.shape != (L,) or known_mask.all():
            raise ValueError(f"known_mask: expected shape ({L},) with at least one token to generate, got {tuple(known_mask.shape)}")
        kept = to_device(known_mask.nonzero()[:, 0], dev)
        if kept.numel():
            out[:, kept] = known_tokens.to(dev)[:, kept].to(dtype)
            ctx.add_clean(dup(model.image_embed(out[:, kept], kept.expand(B, -1))))
        todo = (~known_mask).nonzero()[:, 0]
    n_todo = todo.numel()
    # drawn by the caller's generator on its device (the model's, for sampling without copies)
    perm = torch.argsort(torch.rand(B, n_todo, generator=generator, device=generator.device), dim=1).to(dev)
    order = to_device(todo, dev)[perm]  # B, n_todo
    split = even_ar_split(n_todo, ar_steps)
    start = 0
    for s, size in enumerate(split):
        pos = order[:, start:start + size]  # B, size
        progress = (start + size) / n_todo

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            pred = ctx.predict(model.image_embed(dup(x), dup(pos), dup(t)))
            return guided(pred, guidance_scale(cfg_scale, cfg_schedule, progress, t, cfg_interval)) if use_cfg else pred

        noise = torch.randn(B, size, P, generator=generator, device=generator.device).to(dev)
        x0 = diffusion.sample(model_fn, noise, generator=generator, clip_x0=clip_x0, **(flow_options or {}))
        out.scatter_(1, pos[..., None].expand(B, size, P), x0.to(dtype))
        if s < len(split) - 1:
            ctx.add_clean(dup(model.image_embed(x0, pos)))
        start += size
    return out


@torch.no_grad()
def generate_caption_ids(model: CausalFusion, image_tokens: torch.Tensor, max_len: int, generator: torch.Generator,
                         top_p: float = 0.0, temperature: float = 1.0) -> list[list[int]]:
    """Image tokens (B, L, P raster) -> caption ids, greedy (``top_p=0``) or nucleus sampling, with a KV cache."""
    B, L, _ = image_tokens.shape
    dev = image_tokens.device
    T = model.cfg.max_text_len
    max_len = min(max_len, T - 1)
    ids = model.ids
    # prefix [<boi> | image | <eoi> <s>]
    ex = lambda v: torch.tensor(v, device=dev).expand(B, -1)  # noqa: E731
    lay = Layout(kind=ex([TEXT] + [CLEAN] * L + [TEXT, TEXT]), token=ex([ids["boi"]] + [0] * L + [ids["eoi"], ids["bos"]]),
                 pos=ex([T] + [0] * L + [T + 1, 0]), img_idx=ex([-1] + list(range(L)) + [-1, -1]),
                 role=ex([ROLE_BIDIR] * (L + 1) + [ROLE_CAUSAL] * 2), level=ex([0] * (L + 3)))
    caches = [dict() for _ in model.blocks]
    h = model.run_blocks(model.embed(lay, image_tokens, None, None), lay.attention_mask(), caches, update_cache=True,
                         positions=lay.rope_positions(), image_slots=lay.image_slots())
    n_keys = L + 3
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for j in range(max_len):
        logits = model.lm_head(h[:, -1]).float() / max(temperature, 1e-6)
        if top_p > 0:
            probs = logits.softmax(-1)
            sorted_p, sorted_i = probs.sort(-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p
            sorted_p = sorted_p * keep
            # drawn where the generator lives (the CPU): the same captions on any device
            p = (sorted_p / sorted_p.sum(-1, keepdim=True)).to(generator.device)
            choice = torch.multinomial(p, 1, generator=generator).to(dev)
            nxt = sorted_i.gather(-1, choice)[:, 0]
        else:
            nxt = logits.argmax(-1)
        # one read per token: the ids are needed on the host anyway
        host_nxt, host_done = nxt.tolist(), done.tolist()
        for b in range(B):
            if not host_done[b]:
                out[b].append(host_nxt[b])
        done |= nxt == ids["eos"]
        if all(d or n == ids["eos"] for d, n in zip(host_done, host_nxt)) or j == max_len - 1:
            break
        h_new = model.text_embed(nxt, torch.full_like(nxt, j + 1))[:, None]
        mask = torch.ones(B, 1, n_keys + 1, dtype=torch.bool, device=dev)
        pos = torch.full((B, 1), 3 + j, device=dev)  # after <boi>, <eoi>, <s> and j tokens (Layout.rope_positions)
        h = model.run_blocks(h_new, mask, caches, update_cache=True, positions=pos,
                             image_slots=torch.zeros(B, 1, dtype=torch.bool, device=dev))
        n_keys += 1
    return out
