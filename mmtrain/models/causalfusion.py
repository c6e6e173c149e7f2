"""CausalFusion: one decoder-only transformer over text tokens and image latent tokens.

Two directions share the weights (Deng et al. 2024, "Causal Diffusion Transformers"):

* **generate** (text -> image):
  ``[text (T) | <boi> | clean image tokens of AR steps 1..S-1 | noisy image tokens (L)]``
  Text gets next-token cross-entropy; the noisy tokens get the DDPM eps loss. Image
  tokens are put in a random order per sample; the order is cut into S AR steps.
* **caption** (image -> text):
  ``[<boi> | clean image tokens (L) | <eoi> | text (T)]`` with next-token cross-entropy.

The generalized causal mask (see :func:`generate_mask`):
condition tokens see earlier condition tokens; clean tokens of step i see the condition
and clean tokens of steps <= i; noisy tokens of step i see the condition, clean tokens of
steps < i and noisy tokens of step i.

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

# slot kinds in a laid-out sequence
PAD, TEXT, CLEAN, NOISY = 0, 1, 2, 3


@dataclass
class ModelConfig:
    """Model shape and training objective.

    Args:
        hidden_size: width D. Default 192.
        depth: transformer blocks. Default 6.
        num_heads: attention heads. Default 6.
        mlp_ratio: MLP hidden = mlp_ratio * D. Default 4.0.
        patch_size: latent pixels per token side. Default 4.
        max_text_len: text slots T including <s> and </s>. Default 32.
        ar_step_decay: P(S = k) proportional to decay^(k-1) when drawing AR steps. Default 0.9.
        max_ar_weight: diffusion-loss weight of the first AR step. Default 2.0.
        min_ar_weight: weight of the last AR step. Default 1.0.
        ar_weight_schedule: ``linear`` or ``cosine`` between the two. Default ``linear``.
        text_loss_weight: coefficient of the text cross-entropy. Default 1.0.
        cond_drop_prob: probability to drop the prompt (for classifier-free guidance). Default 0.1.
        caption_prob: fraction of samples laid out image -> text. Default 0.5.
        grad_checkpoint: recompute block activations in backward. Default false.
    """

    hidden_size: int = 192
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    patch_size: int = 4
    max_text_len: int = 32
    ar_step_decay: float = 0.9
    max_ar_weight: float = 2.0
    min_ar_weight: float = 1.0
    ar_weight_schedule: str = "linear"
    text_loss_weight: float = 1.0
    cond_drop_prob: float = 0.1
    caption_prob: float = 0.5
    grad_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})")
        if self.ar_weight_schedule not in ("linear", "cosine"):
            raise ValueError(f"model.ar_weight_schedule: expected 'linear' or 'cosine', got {self.ar_weight_schedule!r}")
        if not 0.0 <= self.caption_prob <= 1.0:
            raise ValueError(f"model.caption_prob: expected a probability, got {self.caption_prob}")
        if self.max_text_len < 2:
            raise ValueError(f"model.max_text_len: expected >= 2, got {self.max_text_len}")


# --------------------------------------------------------------------------- AR split


def draw_ar_split(num_tokens: int, decay: float, rng: random.Random) -> list[int]:
    """Step sizes of a random AR split: S ~ decay^(S-1), cut points uniform."""
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


# --------------------------------------------------------------------------- masks


def generate_mask(cond_len: int, split: list[int], cond_causal: bool = True) -> torch.Tensor:
    """Allowed-attention mask (True = may attend) for ``[cond | clean 1..S-1 | noisy]``."""
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
    allowed = (
        ((q_kind == 0) & (k_kind == 0) & cond_rule)
        | ((q_kind > 0) & (k_kind == 0))
        | ((q_kind == 1) & (k_kind == 1) & (k_st <= q_st))
        | ((q_kind == 2) & (k_kind == 1) & (k_st < q_st))
        | ((q_kind == 2) & (k_kind == 2) & (k_st == q_st))
    )
    return allowed


def caption_mask(image_len: int, text_len: int) -> torch.Tensor:
    """``[<boi> | image (L) | <eoi> | text]``: image block bidirectional, text causal over it."""
    ctx = 1 + image_len
    N = ctx + 1 + text_len
    idx = torch.arange(N)
    allowed = idx[None, :] <= idx[:, None]
    allowed[:ctx, :ctx] = True
    return allowed


# --------------------------------------------------------------------------- layers


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (grid*grid, dim), rows in raster order."""
    assert dim % 4 == 0, "hidden_size must be divisible by 4 for 2-D sin-cos positions"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")

    def emb(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([emb(ys), emb(xs)], dim=1).float()


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
    """Multi-head attention with qk-norm, a boolean mask and an optional KV cache."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = nn.LayerNorm(self.head_dim)
        self.k_norm = nn.LayerNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: dict | None = None, update_cache: bool = False) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # B, H, N, d
        q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            if update_cache:
                cache["k"], cache["v"] = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])  # mask: B, N, Nk
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x, mask, cache=None, update_cache=False):
        x = x + self.attn(self.norm1(x), mask, cache, update_cache)
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------- model


@dataclass
class Layout:
    """A batch laid out as one sequence per sample (all tensors B, N unless noted)."""

    kind: torch.Tensor  # PAD / TEXT / CLEAN / NOISY
    token: torch.Tensor  # text id for TEXT slots
    text_pos: torch.Tensor  # position row for TEXT slots
    img_idx: torch.Tensor  # raster index of the image token for CLEAN / NOISY slots
    target: torch.Tensor  # next-token target for TEXT slots, -100 elsewhere
    loss_weight: torch.Tensor  # diffusion loss weight for NOISY slots (0 elsewhere)
    mask: torch.Tensor  # B, N, N allowed attention


class CausalFusion(nn.Module):
    """The joint text + image decoder. ``forward`` returns the training losses."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, latent_channels: int, latent_size: int, special_ids: dict):
        super().__init__()
        if latent_size % cfg.patch_size:
            raise ValueError(f"latent size {latent_size} is not divisible by model.patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.latent_channels = latent_channels
        self.latent_size = latent_size
        self.grid = latent_size // cfg.patch_size
        self.num_image_tokens = self.grid**2
        self.token_dim = cfg.patch_size**2 * latent_channels
        self.ids = dict(special_ids)  # pad, bos, eos, boi, eoi
        D = cfg.hidden_size

        self.tok_embed = nn.Embedding(vocab_size, D)
        self.text_pos = nn.Parameter(torch.zeros(cfg.max_text_len + 2, D))  # + rows for <boi>, <eoi>
        self.x_proj = nn.Linear(self.token_dim, D)
        self.register_buffer("img_pos", sincos_2d(D, self.grid), persistent=False)
        self.t_embed = TimestepEmbedder(D)
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D)
        self.eps_head = nn.Linear(D, self.token_dim)
        self.lm_head = nn.Linear(D, vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        nn.init.normal_(self.text_pos, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.eps_head.weight)
        nn.init.zeros_(self.eps_head.bias)

    # ---------------------------------------------------------------- embedding

    def embed(self, layout: Layout, clean: torch.Tensor, noisy: torch.Tensor | None, t: torch.Tensor | None) -> torch.Tensor:
        """Slot embeddings (B, N, D). ``clean``/``noisy``: B, L, P in raster order."""
        B, N = layout.kind.shape
        idx = layout.img_idx.clamp(min=0)
        gather = idx[..., None].expand(B, N, self.token_dim)
        src = torch.gather(clean, 1, gather)  # B, N, P
        if noisy is not None:
            src = torch.where((layout.kind == NOISY)[..., None], torch.gather(noisy, 1, gather), src)
        img = self.x_proj(src) + self.img_pos[idx]
        if t is not None:
            img = img + (layout.kind == NOISY)[..., None] * self.t_embed(t)[:, None]
        text = self.tok_embed(layout.token) + self.text_pos[layout.text_pos]
        is_text = (layout.kind == TEXT)[..., None]
        is_img = ((layout.kind == CLEAN) | (layout.kind == NOISY))[..., None]
        return torch.where(is_text, text, torch.where(is_img, img, torch.zeros_like(img)))

    def run_blocks(self, h: torch.Tensor, mask: torch.Tensor, caches: list | None = None, update_cache: bool = False) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            if self.cfg.grad_checkpoint and self.training and cache is None:
                h = checkpoint(block, h, mask, use_reentrant=False)
            else:
                h = block(h, mask, cache, update_cache)
        return self.norm(h)

    # ---------------------------------------------------------------- layout

    def layout(self, text: torch.Tensor, text_len: torch.Tensor, caption_rows: torch.Tensor, order: torch.Tensor, split: list[int], loss_weights: torch.Tensor) -> Layout:
        """Lay out a training batch. ``text`` B, T ids; ``order`` B, L random token order."""
        B, T = text.shape
        L = self.num_image_tokens
        dev = text.device
        gen_mask = generate_mask(T + 1, split)  # cond = text + <boi>
        cap_mask = caption_mask(L, T)
        N = max(gen_mask.shape[0], cap_mask.shape[0])
        n_clean = L - split[-1]

        def pad_to(x: torch.Tensor, value) -> torch.Tensor:
            return F.pad(x, (0, N - x.shape[-1]), value=value)

        ar = torch.arange(T, device=dev)
        valid = ar[None] < text_len[:, None]  # B, T
        tok = text.masked_fill(~valid, self.ids["pad"])
        next_tok = torch.where(ar[None] + 1 < text_len[:, None], F.pad(text, (0, 1))[:, 1:], torch.full_like(text, -100))

        # generate direction: [text | boi | clean | noisy]
        g_kind = torch.cat([torch.where(valid, TEXT, PAD), torch.full((B, 1), TEXT, device=dev), torch.full((B, n_clean + L), CLEAN, device=dev)], 1)
        g_kind[:, T + 1 + n_clean:] = NOISY
        g_tok = torch.cat([tok, torch.full((B, 1), self.ids["boi"], device=dev), torch.zeros(B, n_clean + L, dtype=torch.long, device=dev)], 1)
        g_pos = torch.cat([ar.expand(B, T), torch.full((B, 1), T, device=dev), torch.zeros(B, n_clean + L, dtype=torch.long, device=dev)], 1)
        g_img = torch.cat([torch.full((B, T + 1), -1, device=dev), order[:, :n_clean], order], 1)
        g_tgt = torch.cat([next_tok, torch.full((B, 1 + n_clean + L), -100, device=dev)], 1)
        g_w = torch.cat([torch.zeros(B, T + 1 + n_clean, device=dev), loss_weights.to(dev).expand(B, L)], 1)

        # caption direction: [boi | image | eoi | text]
        raster = torch.arange(L, device=dev).expand(B, L)
        c_kind = torch.cat([torch.full((B, 1), TEXT, device=dev), torch.full((B, L), CLEAN, device=dev), torch.full((B, 1), TEXT, device=dev), torch.where(valid, TEXT, PAD)], 1)
        c_tok = torch.cat([torch.full((B, 1), self.ids["boi"], device=dev), torch.zeros(B, L, dtype=torch.long, device=dev), torch.full((B, 1), self.ids["eoi"], device=dev), tok], 1)
        c_pos = torch.cat([torch.full((B, 1), T, device=dev), torch.zeros(B, L, dtype=torch.long, device=dev), torch.full((B, 1), T + 1, device=dev), ar.expand(B, T)], 1)
        c_img = torch.cat([torch.full((B, 1), -1, device=dev), raster, torch.full((B, 1 + T), -1, device=dev)], 1)
        c_tgt = torch.cat([torch.full((B, L + 2), -100, device=dev), next_tok], 1)
        c_w = torch.zeros(B, c_kind.shape[1], device=dev)

        cap = caption_rows[:, None]
        pick = lambda g, c, v: torch.where(cap, pad_to(c, v), pad_to(g, v))  # noqa: E731
        kind = pick(g_kind, c_kind, PAD)
        base = torch.where(cap[..., None], F.pad(cap_mask, (0, N - cap_mask.shape[0], 0, N - cap_mask.shape[0])).to(dev)[None],
                           F.pad(gen_mask, (0, N - gen_mask.shape[0], 0, N - gen_mask.shape[0])).to(dev)[None])
        # pads are invisible; a pad query sees only itself so softmax stays finite
        mask = (base & (kind != PAD)[:, None, :]) | torch.eye(N, dtype=torch.bool, device=dev)[None]
        return Layout(kind=kind, token=pick(g_tok, c_tok, 0), text_pos=pick(g_pos, c_pos, 0), img_idx=pick(g_img, c_img, -1),
                      target=pick(g_tgt, c_tgt, -100), loss_weight=pick(g_w, c_w, 0.0), mask=mask)

    # ---------------------------------------------------------------- training

    def forward(self, text, text_len, caption_rows, latents_tokens, noisy_tokens, t, target, order, split, loss_weights) -> dict:
        """Training losses.

        Args:
            text, text_len: B, T ids (prompt already dropped for CFG where chosen) and lengths.
            caption_rows: B bool, True = image -> text layout.
            latents_tokens: B, L, P clean tokens (raster order); noisy_tokens: same shape,
                ``q_sample`` of them at timesteps ``t`` (B,); target: what the diffusion head
                regresses (the noise for eps-prediction, the clean tokens for x0-prediction).
            order: B, L random AR order; split: AR step sizes; loss_weights: L (AR order).
        """
        lay = self.layout(text, text_len, caption_rows, order, split, loss_weights)
        h = self.embed(lay, latents_tokens, noisy_tokens, t)
        h = self.run_blocks(h, lay.mask)

        logits = self.lm_head(h).float()  # B, N, V
        ce = F.cross_entropy(logits.transpose(1, 2), lay.target, ignore_index=-100, reduction="sum")
        n_text = (lay.target != -100).sum()
        text_loss = ce / n_text.clamp(min=1)

        pred = self.eps_head(h).float()  # B, N, P
        target = torch.gather(target, 1, lay.img_idx.clamp(min=0)[..., None].expand_as(pred))
        per_tok = ((pred - target.float()) ** 2).mean(-1)
        is_noisy = lay.kind == NOISY
        diff_loss = (per_tok * lay.loss_weight * is_noisy).sum() / is_noisy.sum().clamp(min=1)
        loss = diff_loss + self.cfg.text_loss_weight * text_loss
        return {"loss": loss, "diffusion_loss": diff_loss.detach(), "text_loss": text_loss.detach(),
                "text_tokens": n_text.detach(), "image_tokens": is_noisy.sum().detach()}


# --------------------------------------------------------------------------- training inputs


def training_inputs(model: CausalFusion, latent_tokens: torch.Tensor, text: torch.Tensor, text_len: torch.Tensor,
                    diffusion, gen: torch.Generator, rng: random.Random) -> dict:
    """Draw everything random about one training batch: direction, CFG drop, t, noise, order, split.

    ``latent_tokens``: B, L, P clean tokens in raster order; ``text``: B, T ids.
    ``gen`` drives tensor randomness and ``rng`` the AR split, so a seeded run is repeatable.
    """
    cfg = model.cfg
    B, L, _ = latent_tokens.shape
    dev = latent_tokens.device
    caption_rows = torch.rand(B, generator=gen) < cfg.caption_prob
    # classifier-free guidance: a dropped prompt becomes the empty caption "<s></s>"
    drop = (torch.rand(B, generator=gen) < cfg.cond_drop_prob) & ~caption_rows
    text = text.clone()
    text[drop, 0], text[drop, 1] = model.ids["bos"], model.ids["eos"]
    text_len = torch.where(drop, torch.full_like(text_len, 2), text_len)
    t = torch.randint(0, diffusion.num_timesteps, (B,), generator=gen)
    noise = torch.randn(latent_tokens.shape, generator=gen)
    order = torch.argsort(torch.rand(B, L, generator=gen), dim=1)
    split = draw_ar_split(L, cfg.ar_step_decay, rng)
    weights = ar_loss_weights(split, cfg.max_ar_weight, cfg.min_ar_weight, cfg.ar_weight_schedule)
    noise, t = noise.to(dev, latent_tokens.dtype), t.to(dev)
    return {
        "text": text.to(dev), "text_len": text_len.to(dev), "caption_rows": caption_rows.to(dev),
        "latents_tokens": latent_tokens, "noisy_tokens": diffusion.q_sample(latent_tokens, t, noise), "t": t,
        "target": diffusion.target(latent_tokens, noise), "order": order.to(dev), "split": split, "loss_weights": weights.to(dev),
    }


# --------------------------------------------------------------------------- inference


def _prompt_layout(model: CausalFusion, text: torch.Tensor, text_len: torch.Tensor):
    """Embeddings, key validity and mask of the condition ``[text | <boi>]`` (B, T+1)."""
    B, T = text.shape
    dev = text.device
    valid = torch.arange(T, device=dev)[None] < text_len[:, None]
    tok = torch.cat([text.masked_fill(~valid, model.ids["pad"]), torch.full((B, 1), model.ids["boi"], device=dev)], 1)
    pos = torch.arange(T + 1, device=dev).expand(B, T + 1)
    h = model.tok_embed(tok) + model.text_pos[pos]
    key_valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)
    causal = torch.ones(T + 1, T + 1, dtype=torch.bool, device=dev).tril()
    mask = (causal[None] & key_valid[:, None, :]) | torch.eye(T + 1, dtype=torch.bool, device=dev)[None]
    return h, key_valid, mask


@torch.no_grad()
def sample_image_tokens(model: CausalFusion, text: torch.Tensor, text_len: torch.Tensor, diffusion, ar_steps: int,
                        cfg_scale: float, generator: torch.Generator, use_cache: bool = True, clip_x0: float = 0.0) -> torch.Tensor:
    """Text -> image tokens (B, L, P, raster order) in ``ar_steps`` AR steps.

    The diffusion head's output is guided (CFG) and handed to ``diffusion.sample``,
    which reads it as eps or x0 according to the diffusion config.

    Each step denoises its subset of tokens (a random order, cut evenly) with the full
    respaced DDPM chain while attending to the prompt and the clean tokens of earlier
    steps. With ``use_cache`` those are kept as keys/values; without it the whole
    sequence is recomputed under the generalized causal mask (same numbers, slower).
    """
    B, T = text.shape
    L, P, dev = model.num_image_tokens, model.token_dim, text.device
    guided = cfg_scale != 1.0
    if guided:
        empty = torch.full_like(text, model.ids["pad"])
        empty[:, 0], empty[:, 1] = model.ids["bos"], model.ids["eos"]
        text = torch.cat([text, empty])
        text_len = torch.cat([text_len, torch.full_like(text_len, 2)])
    B2 = text.shape[0]
    order = torch.argsort(torch.rand(B, L, generator=generator), dim=1).to(dev)
    order2 = order.repeat(2, 1) if guided else order
    split = even_ar_split(L, ar_steps)
    dtype = model.x_proj.weight.dtype

    cond_h, key_valid, cond_mask = _prompt_layout(model, text, text_len)
    caches = [dict() for _ in model.blocks] if use_cache else None
    if use_cache:
        model.run_blocks(cond_h, cond_mask, caches, update_cache=True)
    ctx_h, ctx_kind = cond_h, torch.zeros(key_valid.shape, dtype=torch.long, device=dev)  # uncached path
    out = torch.zeros(B, L, P, device=dev, dtype=dtype)
    start = 0
    for s, size in enumerate(split):
        pos = order2[:, start:start + size]  # B2, size
        own = torch.ones(B2, size, size, dtype=torch.bool, device=dev)

        def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x2 = torch.cat([x, x]) if guided else x
            t2 = torch.cat([t, t]) if guided else t
            h = model.x_proj(x2.to(dtype)) + model.img_pos[pos] + model.t_embed(t2)[:, None]
            if use_cache:
                mask = torch.cat([key_valid[:, None, :].expand(B2, size, -1), own], 2)
                h = model.run_blocks(h, mask, caches, update_cache=False)
            else:
                seq = torch.cat([ctx_h, h], 1)
                n_ctx = ctx_h.shape[1]
                mask = _uncached_mask(key_valid, ctx_kind, size)
                h = model.run_blocks(seq, mask)[:, n_ctx:]
            eps = model.eps_head(h).float()
            if guided:
                cond, uncond = eps.chunk(2)
                eps = uncond + cfg_scale * (cond - uncond)
            return eps

        x0 = diffusion.sample(eps_fn, torch.randn(B, size, P, generator=generator).to(dev), generator=generator, clip_x0=clip_x0)
        out.scatter_(1, pos[:B, :, None].expand(B, size, P), x0.to(dtype))
        if s < len(split) - 1:
            x0_2 = torch.cat([x0, x0]) if guided else x0
            clean_h = model.x_proj(x0_2.to(dtype)) + model.img_pos[pos]
            if use_cache:
                mask = torch.cat([key_valid[:, None, :].expand(B2, size, -1), own], 2)
                model.run_blocks(clean_h, mask, caches, update_cache=True)
            else:
                ctx_h = torch.cat([ctx_h, clean_h], 1)
                ctx_kind = torch.cat([ctx_kind, torch.full((B2, size), s + 1, device=dev)], 1)
            key_valid = torch.cat([key_valid, torch.ones(B2, size, dtype=torch.bool, device=dev)], 1)
        start += size
    return out


def _uncached_mask(key_valid: torch.Tensor, ctx_kind: torch.Tensor, size: int) -> torch.Tensor:
    """Mask for ``[cond | clean steps so far | noisy step]`` built from the rules, for reference.

    ``ctx_kind`` is 0 for condition slots and s >= 1 for clean slots of AR step s.
    """
    B, n_ctx = key_valid.shape
    N = n_ctx + size
    dev = key_valid.device
    kind = torch.cat([ctx_kind, torch.full((B, size), -1, device=dev)], 1)  # -1: the noisy step
    q, k = kind[:, :, None], kind[:, None, :]
    idx = torch.arange(N, device=dev)
    causal = (idx[None, :] <= idx[:, None])[None]
    allowed = (((q == 0) & (k == 0) & causal)            # condition: causal among itself
               | ((q > 0) & (k == 0)) | ((q == -1) & (k == 0))  # everything sees the condition
               | ((q > 0) & (k > 0) & (k <= q))           # clean step s: clean steps <= s
               | ((q == -1) & (k > 0))                    # noisy step: all earlier clean steps
               | ((q == -1) & (k == -1)))                 # noisy step: itself
    valid = torch.cat([key_valid, torch.ones(B, size, dtype=torch.bool, device=dev)], 1)
    return (allowed & valid[:, None, :]) | torch.eye(N, dtype=torch.bool, device=dev)[None]


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
    kind = torch.tensor([TEXT] + [CLEAN] * L + [TEXT, TEXT], device=dev).expand(B, -1)
    token = torch.tensor([ids["boi"]] + [0] * L + [ids["eoi"], ids["bos"]], device=dev).expand(B, -1)
    text_pos = torch.tensor([T] + [0] * L + [T + 1, 0], device=dev).expand(B, -1)
    img_idx = torch.tensor([-1] + list(range(L)) + [-1, -1], device=dev).expand(B, -1)
    lay = Layout(kind=kind, token=token, text_pos=text_pos, img_idx=img_idx, target=None, loss_weight=None,
                 mask=caption_mask(L, 1).to(dev)[None].expand(B, -1, -1))
    caches = [dict() for _ in model.blocks]
    h = model.run_blocks(model.embed(lay, image_tokens.to(model.x_proj.weight.dtype), None, None), lay.mask, caches, update_cache=True)
    n_keys = kind.shape[1]
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for j in range(max_len):
        logits = model.lm_head(h[:, -1]).float() / max(temperature, 1e-6)
        if top_p > 0:
            probs = logits.softmax(-1)
            sorted_p, sorted_i = probs.sort(-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p
            sorted_p = sorted_p * keep
            choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
            nxt = sorted_i.gather(-1, choice)[:, 0]
        else:
            nxt = logits.argmax(-1)
        for b in range(B):
            if not done[b]:
                out[b].append(int(nxt[b]))
        done |= nxt == ids["eos"]
        if bool(done.all()) or j == max_len - 1:
            break
        h_new = model.tok_embed(nxt)[:, None] + model.text_pos[j + 1][None, None]
        mask = torch.ones(B, 1, n_keys + 1, dtype=torch.bool, device=dev)
        h = model.run_blocks(h_new, mask, caches, update_cache=True)
        n_keys += 1
    return out
