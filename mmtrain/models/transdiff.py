"""TransDiff: an AR transformer encodes the condition, a flow decoder draws the image.

Zhen et al. 2025, "Marrying Autoregressive Transformer and Diffusion with Multi-Reference
Autoregression". Two parts:

* **encoder** (``depth`` pre-norm ViT blocks) over
  ``[condition (C) | queries (Q) | reference 1 (R) | ... | reference K (R)]``.
  The condition is ``buffer_size`` copies of the class embedding (class mode, as the
  official model; ``fake_latent`` is the null class) or the prompt's text tokens (text
  mode; the empty caption ``<s></s>`` is the null prompt). Queries are learned tokens;
  a reference is an earlier image of the same condition, cut into R coarse tokens.
  Attention is block-causal over the blocks (see :func:`encoder_mask`).
* **decoder** (``transdiff.decoder_depth`` blocks: adaLN self-attention over the noisy
  image tokens, cross-attention to encoder features, adaLN MLP) predicts the rectified
  flow velocity ``noise - x0`` at time t.

**MRAR** (Multi-Reference Autoregression): image i of a condition is decoded from the
features of the query block and references 1..i (the images before it). Training
teacher-forces real images of the same condition as references (other rows of the
micro-batch with the same label or prompt, see :func:`training_inputs`); sampling feeds
back its own images, then returns the last.

Parameter names follow the official code (``class_emb``, ``fake_latent``, ``z_proj``,
``encoder_blocks.N``, ``diffusion_pos_embed_learned``; the decoder ``diffdecoder.net.*``
is ``decoder.*`` here), so :mod:`mmtrain.convert` is a short key map.

Shapes: B batch, L image tokens, P token dim, C condition slots, Q queries, R tokens
per reference, K references, D encoder width, W decoder width.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mmtrain.distributed import to_device
from mmtrain.errors import ConfigError
from mmtrain.models.base import Condition, ImageTokenModel, ModelFamily
from mmtrain.models.causalfusion import guidance_scale, guided
from mmtrain.models.config import ModelConfig

LN_EPS = 1e-6  # the official norm_layer


def layer_norm(dim: int, affine: bool = True) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS, elementwise_affine=affine)


# --------------------------------------------------------------------------- blocks


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:  # B, N, D -> B, H, N, D/H
    B, N, D = x.shape
    return x.view(B, N, heads, D // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:  # B, H, N, d -> B, N, H*d
    B, H, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, H * d)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # B, H, N, d
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None], dropout_p=p)
        return self.proj_drop(self.proj(_merge(out)))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.wq, self.wk, self.wv = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # B, L, W and B, M, W
        q, k, v = _heads(self.wq(x), self.heads), _heads(self.wk(context), self.heads), _heads(self.wv(context), self.heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj_drop(self.proj(_merge(out)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, as official
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """adaLN-gated self-attention, plain cross-attention, adaLN-gated MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn1 = SelfAttention(dim, heads, dropout)
        self.norm2 = layer_norm(dim)
        self.attn2 = CrossAttention(dim, heads, dropout)
        self.norm3 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, context, t6):  # B, L, W; B, M, W; B, 6, W
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table + t6).chunk(6, dim=1)  # B, 1, W each
        x = x + self.attn1(self.norm1(x) * (1 + scale1) + shift1) * gate1
        x = x + self.attn2(self.norm2(x), context)
        return x + self.mlp(self.norm3(x) * (1 + scale2) + shift2) * gate2


class TimeEmbedder(nn.Module):
    """Sinusoid of model time (0..1000, cos first) -> MLP; the official ``time_embedder``."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # B -> B, W
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], dim=-1).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(emb)))


class TimeEmbedding(nn.Module):
    """t -> (temb for the final layer, six modulation vectors for every block)."""

    def __init__(self, dim: int):
        super().__init__()
        self.time_embedder = TimeEmbedder(dim)
        self.time_proj = nn.Linear(dim, 6 * dim)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        temb = self.time_embedder(t)  # B, W
        return temb, self.time_proj(F.silu(temb)).unflatten(1, (6, -1))  # B, W and B, 6, W


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = layer_norm(dim, affine=False)
        self.linear = nn.Linear(dim, out_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x, temb):  # modulated by temb itself, not SiLU(temb), as official
        shift, scale = (self.scale_shift_table + temb[:, None]).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class FlowDecoder(nn.Module):
    """Noisy image tokens x_t (B, L, P), encoder features (B, M, D), model time (B,) -> velocity (B, L, P)."""

    def __init__(self, token_dim: int, width: int, cond_dim: int, heads: int, depth: int, mlp_ratio: float,
                 num_tokens: int, dropout: float, grad_checkpoint: bool = False):
        super().__init__()
        self.grad_checkpoint = grad_checkpoint
        self.input_proj = nn.Linear(token_dim, width)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.time_embed = TimeEmbedding(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.res_blocks = nn.ModuleList(DecoderBlock(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.final_layer = FinalLayer(width, token_dim)

    def forward(self, x: torch.Tensor, features: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x.to(self.input_proj.weight.dtype)) + self.diffusion_pos_embed_learned  # B, L, W
        temb, t6 = self.time_embed(t)
        context = self.cond_embed(features)  # B, M, W
        for block in self.res_blocks:
            if self.grad_checkpoint and self.training:
                h = checkpoint(block, h, context, t6, use_reentrant=False)
            else:
                h = block(h, context, t6)
        return self.final_layer(h, temb)


# --------------------------------------------------------------------------- masks

# block of an encoder slot: the condition is block 0, queries block 1, reference j block 2 + j
COND_BLOCK, QUERY_BLOCK = 0, 1


def encoder_mask(cond_valid: torch.Tensor, num_queries: int, num_refs: int, ref_len: int, text_causal: bool,
                 condition_sees_query: bool) -> torch.Tensor:
    """Boolean attention mask (B, N, N), True = may attend, over ``[condition | queries | refs]``.

    A slot sees every slot of its own and earlier blocks (block-causal), so reference j
    never sees the images after it and the queries see only the condition. Within the
    condition: text is causal, class slots are bidirectional, and with
    ``condition_sees_query`` class slots also see the queries (the official 1-step
    encoder has no mask at all). Padded condition slots are seen by nobody and see only
    themselves, so every row keeps a finite softmax.
    """
    B, C = cond_valid.shape
    dev = cond_valid.device
    block = torch.cat([torch.full((C,), COND_BLOCK, device=dev), torch.full((num_queries,), QUERY_BLOCK, device=dev),
                       torch.arange(num_refs, device=dev).repeat_interleave(ref_len) + QUERY_BLOCK + 1])  # N, built on the device
    N = block.numel()
    allowed = (block[None, :] <= block[:, None]).expand(B, N, N).clone()
    if text_causal:
        causal = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
        allowed[:, :C, :C] = causal
    elif condition_sees_query:
        allowed[:, :C, C:C + num_queries] = True
    valid = torch.cat([cond_valid, torch.ones(B, N - C, dtype=torch.bool, device=dev)], 1)  # B, N
    allowed &= valid[:, None, :]
    allowed |= torch.eye(N, dtype=torch.bool, device=dev)[None]
    return allowed


# --------------------------------------------------------------------------- model


def reference_tokens(image_tokens: torch.Tensor, grid: int, ref_patch: int) -> torch.Tensor:
    """Image tokens (..., L, P) in raster order -> coarse reference tokens (..., L / r^2, r^2 * P):
    each groups an r x r square of tokens, values ordered (row, col, token value) as
    :func:`mmtrain.tokenize.image.patchify` orders a patch."""
    *lead, L, P = image_tokens.shape
    g, r = grid, ref_patch
    x = image_tokens.reshape(-1, g // r, r, g // r, r, P).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(*lead, (g // r) ** 2, r * r * P)


class TransDiff(ImageTokenModel):
    """Encoder + flow decoder. ``forward`` returns the training losses."""

    def __init__(self, cfg: ModelConfig, latent_channels: int, latent_size: int, vocab_size: int = 0, special_ids: dict | None = None):
        super().__init__(cfg, latent_channels, latent_size, vocab_size, special_ids)
        td = cfg.transdiff
        if self.grid % td.ref_patch:
            raise ValueError(f"model.transdiff.ref_patch {td.ref_patch} does not divide the {self.grid}x{self.grid} token grid")
        self.num_queries = td.num_queries or self.num_image_tokens
        self.ref_len = (self.grid // td.ref_patch) ** 2
        self.cond_len = td.buffer_size if cfg.condition == "class" else cfg.max_text_len
        D, W = cfg.hidden_size, td.decoder_hidden_size or cfg.hidden_size
        heads = td.decoder_heads or cfg.num_heads
        if W % heads:
            raise ValueError(f"decoder width {W} must be divisible by model.transdiff.decoder_heads ({heads})")
        context_len = self.num_queries + td.mrar_refs * self.ref_len

        if cfg.condition == "class":
            self.class_emb = nn.Embedding(cfg.num_classes, D)
            self.fake_latent = nn.Parameter(torch.zeros(1, D))  # the null class
        else:
            self.tok_embed = nn.Embedding(vocab_size, D)
        if td.mrar_refs:
            self.z_proj = nn.Linear(td.ref_patch**2 * self.token_dim, D)
        self.z_proj_ln = layer_norm(D)
        self.mask_token = nn.Parameter(torch.zeros(1, self.num_queries, D))  # the learned queries
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.cond_len + context_len, D))
        self.encoder_blocks = nn.ModuleList(EncoderBlock(D, cfg.num_heads, cfg.mlp_ratio, td.dropout) for _ in range(cfg.depth))
        self.encoder_norm = layer_norm(D)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, context_len, D))
        self.decoder = FlowDecoder(self.token_dim, W, D, heads, td.decoder_depth, cfg.mlp_ratio, self.num_image_tokens,
                                   td.dropout, cfg.grad_checkpoint)
        self._init_weights()

    def _init_weights(self) -> None:
        self._init_linear_layers()
        for p in (self.mask_token, self.encoder_pos_embed_learned, self.diffusion_pos_embed_learned,
                  self.decoder.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        if self.cfg.condition == "class":
            nn.init.normal_(self.class_emb.weight, std=0.02)
            nn.init.normal_(self.fake_latent, std=0.02)
        else:
            nn.init.normal_(self.tok_embed.weight, std=0.02)
        nn.init.zeros_(self.decoder.final_layer.linear.weight)
        nn.init.zeros_(self.decoder.final_layer.linear.bias)

    def transformer_blocks(self) -> list[nn.Module]:
        """The blocks ``train.compile`` compiles one by one."""
        return [*self.encoder_blocks, *self.decoder.res_blocks]

    @property
    def max_images(self) -> int:
        """Images per MRAR chain: K references + the final one."""
        return self.cfg.transdiff.mrar_refs + 1

    # ---------------------------------------------------------------- encoder

    def condition(self, text: torch.Tensor | None = None, text_len: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition slots (B, C, D) and which are real (B, C). Label ``num_classes`` = the null class."""
        if self.cfg.condition == "class":
            null = labels >= self.cfg.num_classes
            # where(): fake_latent stays in the graph on batches without dropped labels (ZeRO-3 wants every grad)
            emb = torch.where(null[:, None], self.fake_latent, self.class_emb(labels.clamp(max=self.cfg.num_classes - 1)))
            h = emb[:, None].expand(-1, self.cond_len, -1)
            return h, torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        T = text.shape[1]
        if T > self.cond_len:
            raise ValueError(f"text of {T} slots is longer than model.max_text_len {self.cond_len}")
        text = F.pad(text, (0, self.cond_len - T), value=self.ids["pad"])
        valid = torch.arange(self.cond_len, device=text.device)[None] < text_len[:, None]
        return self.tok_embed(text.masked_fill(~valid, self.ids["pad"])), valid

    def encode(self, cond: torch.Tensor, cond_valid: torch.Tensor, refs: torch.Tensor | None = None) -> torch.Tensor:
        """Condition slots (B, C, D), optional references (B, k, L, P) with k <= K ->
        decoder context (B, Q + k R, D): the encoder outputs of the query and reference blocks."""
        B, C, _ = cond.shape
        parts = [cond, self.mask_token.expand(B, -1, -1)]
        k = 0 if refs is None else refs.shape[1]
        if k > self.cfg.transdiff.mrar_refs:
            raise ValueError(f"{k} references given; the model was built for model.transdiff.mrar_refs={self.cfg.transdiff.mrar_refs}")
        if k:
            ref = reference_tokens(refs, self.grid, self.cfg.transdiff.ref_patch)  # B, k, R, r^2 P
            parts.append(self.z_proj(ref.to(self.z_proj.weight.dtype)).flatten(1, 2))
        h = torch.cat(parts, 1)  # B, N, D
        N = h.shape[1]
        h = self.z_proj_ln(h + self.encoder_pos_embed_learned[:, :N])
        mask = encoder_mask(cond_valid, self.num_queries, k, self.ref_len, self.cfg.condition == "text",
                            self.cfg.transdiff.condition_sees_query)
        for block in self.encoder_blocks:
            if self.cfg.grad_checkpoint and self.training:
                h = checkpoint(block, h, mask, use_reentrant=False)
            else:
                h = block(h, mask)
        h = self.encoder_norm(h)[:, C:]  # B, Q + k R, D
        return h + self.diffusion_pos_embed_learned[:, :N - C]

    def context_len(self, step: int) -> int:
        """Decoder context length for image ``step`` (0-based) of an MRAR chain."""
        return self.num_queries + step * self.ref_len

    # ---------------------------------------------------------------- training

    def forward(self, *, images, noisy, t, target, num_images, text=None, text_len=None, labels=None) -> dict:
        """Training losses.

        Args:
            images: B, n, L, P clean MRAR chains (n = K + 1; image 0 is the row's own, the
                next ones same-condition images of other rows); ``num_images`` (B,) how
                many are real (1 = no references).
            noisy: B, n, m, L, P chain images noised to model time ``t`` (B, n, m);
                target (B, n, m, L, P) the velocity; m = ``diffusion_batch_mul``.
            text, text_len / labels: the condition (already dropped for CFG where chosen).
        """
        B, n, m = t.shape
        cond, valid = self.condition(text, text_len, labels)
        features = self.encode(cond, valid, images[:, :n - 1] if n > 1 else None)  # B, Q + (n-1) R, D
        total = images.new_zeros((), dtype=torch.float32)
        for i in range(n):
            # every row decodes image i (static shapes, nothing read back); rows whose chain is
            # shorter are masked out of the loss, so it equals the loss over real images only
            has = (num_images > i).float().repeat_interleave(m)  # B m
            ctx = features[:, :self.context_len(i)].repeat_interleave(m, 0)
            pred = self.decoder(noisy[:, i].flatten(0, 1), ctx, t[:, i].flatten())
            per_image = ((pred.float() - target[:, i].flatten(0, 1).float()) ** 2).mean((1, 2))  # B m
            total = total + (per_image * has).sum()
        count = num_images.sum() * m
        loss = total / count
        zero = torch.zeros((), device=loss.device)
        L = self.num_image_tokens
        return {"loss": loss, "diffusion_loss": loss.detach(), "text_loss": zero, "text_tokens": zero.long(),
                "image_tokens": (count * L).detach(), "sequence_tokens": (valid.sum() + B * (features.shape[1])).detach(),
                "sequence_length": self.cond_len + features.shape[1]}


def training_flops(model: TransDiff, batch_size: int, seq_len: int) -> float:
    """Model FLOPs of one forward + backward (the MFU numerator), counted as
    :func:`mmtrain.models.causalfusion.training_flops` does: 6 x weights applied per
    position plus 12 x D x len^2 attention per block. ``seq_len`` is the encoder length; the
    decoder runs once per chain image over L tokens against its context."""
    cfg, td = model.cfg, model.cfg.transdiff
    D, W, L = cfg.hidden_size, td.decoder_hidden_size or cfg.hidden_size, model.num_image_tokens
    enc_block = 4 * D * D + 2 * D * int(D * cfg.mlp_ratio)
    enc = 6.0 * cfg.depth * enc_block * seq_len + 12.0 * cfg.depth * D * seq_len**2
    dec_block = 4 * W * W + 2 * W * W + 2 * W * int(W * cfg.mlp_ratio)  # qkv+proj, wq+proj, mlp
    M = model.num_queries
    dec = 6.0 * td.decoder_depth * (dec_block * L + 2 * W * D * M) + 12.0 * td.decoder_depth * W * (L * L + L * M)
    return batch_size * (enc + dec * td.diffusion_batch_mul)


# --------------------------------------------------------------------------- training inputs


def mrar_chains(keys: list, max_images: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced MRAR chains from a micro-batch: row b's chain is b followed by up to
    ``max_images - 1`` other rows with the same condition key, in a random order (drawn
    with ``rng`` on the host, where the chains are built: nothing waits for the device).

    Returns indices (B, max_images) into the batch (padded with b) and lengths (B,), on the CPU.
    """
    B = len(keys)
    index = torch.arange(B)[:, None].repeat(1, max_images)
    length = torch.ones(B, dtype=torch.long)
    if max_images == 1:
        return index, length
    shuffled = list(range(B))
    rng.shuffle(shuffled)
    groups: dict = {}
    for b in shuffled:
        groups.setdefault(keys[b], []).append(b)
    for b in range(B):
        others = [o for o in groups[keys[b]] if o != b][:max_images - 1]
        index[b, 1:1 + len(others)] = torch.tensor(others, dtype=torch.long)
        length[b] = 1 + len(others)
    return index, length


def training_inputs(model: TransDiff, latent_tokens: torch.Tensor, diffusion, gen: torch.Generator, rng: random.Random,
                    text: torch.Tensor | None = None, text_len: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> dict:
    """Everything random about one batch: CFG drop, MRAR chains (``rng``), t and noise (``gen``,
    drawn on its device). Chains group rows by label or by exact prompt ids, before the drop;
    the ids are read where the loader left them (the host), so building chains waits for nothing."""
    cfg = model.cfg
    B, L, P = latent_tokens.shape
    dev = latent_tokens.device
    g = gen.device
    drop = [rng.random() < cfg.cond_drop_prob for _ in range(B)]
    if cfg.condition == "class":
        if labels is None:
            raise ValueError("model.condition=class needs class labels in the batch (the shards' 'cls' field)")
        keys = labels.tolist()
        dropped = to_device(torch.tensor(drop), labels.device)
        cond = {"labels": to_device(torch.where(dropped, cfg.num_classes, labels.long()), dev)}
    else:
        keys = [tuple(ids[:n].tolist()) for ids, n in zip(text, text_len.tolist())]
        dropped = to_device(torch.tensor(drop), text.device)
        null = null_condition(model, text=text, text_len=text_len)
        cond = {"text": to_device(torch.where(dropped[:, None], null["text"], text), dev),
                "text_len": to_device(torch.where(dropped, null["text_len"], text_len), dev)}
    index, length = mrar_chains(keys, model.max_images, rng)
    images = latent_tokens[to_device(index, dev)]  # B, n, L, P
    n, m = model.max_images, cfg.transdiff.diffusion_batch_mul
    t = diffusion.sample_train_t(B * n * m, gen).view(B, n, m).to(dev)
    noise = torch.randn(B, n, m, L, P, generator=gen, device=g).to(dev)  # float32: the noising runs in float32
    clean = images[:, :, None].expand(B, n, m, L, P).float()
    noisy = diffusion.q_sample(clean.reshape(-1, L, P), t.flatten(), noise.reshape(-1, L, P)).view(B, n, m, L, P)
    return {**cond, "images": images, "noisy": noisy, "t": diffusion.model_time(t.flatten()).view(B, n, m),
            "target": diffusion.target(clean, noise), "num_images": to_device(length, dev)}


# --------------------------------------------------------------------------- inference


def null_condition(model: TransDiff, text=None, text_len=None, labels=None) -> dict:
    """The unconditional input for CFG: the null class (``fake_latent``) or the empty caption."""
    if model.cfg.condition == "class":
        return {"labels": torch.full_like(labels, model.cfg.num_classes)}
    empty = torch.full_like(text, model.ids["pad"])
    empty[:, 0], empty[:, 1] = model.ids["bos"], model.ids["eos"]
    return {"text": empty, "text_len": torch.full_like(text_len, 2)}


@torch.no_grad()
def sample_image_tokens(model: TransDiff, diffusion, *, ar_steps: int, generator: torch.Generator,
                        text: torch.Tensor | None = None, text_len: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                        cfg_scale: float = 1.0, cfg_schedule: str = "constant", cfg_interval: tuple[float, float] = (0.0, 1000.0),
                        clip_x0: float = 0.0, flow_options: dict | None = None, known_tokens=None, known_mask=None,
                        use_cache: bool = True) -> torch.Tensor:
    """Condition -> image tokens (B, L, P, raster order).

    ``ar_steps`` is the MRAR chain length (capped at K + 1): image i is decoded from the
    features of the queries and images 1..i-1, every image from the same initial noise
    (as official), and the last one is returned. ``cfg_scale != 1`` runs a [cond; uncond]
    batch whose two halves share the references; ``linear`` CFG grows with the chain.
    ``flow_options``: the flow sampler's ``sampler``, ``drift_scale``, ``noise_scale``.
    """
    del use_cache  # the encoder is re-run per chain image: it is short
    if known_tokens is not None or known_mask is not None:
        raise ValueError("in-context editing needs model.family=causalfusion (TransDiff has no partial-image context)")
    cond = {"text": text, "text_len": text_len, "labels": labels}
    B = (labels if model.cfg.condition == "class" else text).shape[0]
    dev = model.decoder.input_proj.weight.device
    dtype = model.decoder.input_proj.weight.dtype
    use_cfg = cfg_scale != 1.0
    dup = (lambda x: torch.cat([x, x])) if use_cfg else (lambda x: x)  # noqa: E731

    h, valid = model.condition(**{k: to_device(v, dev) for k, v in cond.items()})
    if use_cfg:
        null = null_condition(model, **cond)
        h_null, valid_null = model.condition(**{k: to_device(v, dev) for k, v in null.items()})
        h, valid = torch.cat([h, h_null]), torch.cat([valid, valid_null])
    steps = max(1, min(ar_steps, model.max_images))
    # drawn by the caller's generator on its device (the model's, for sampling without copies)
    noise = torch.randn(B, model.num_image_tokens, model.token_dim, generator=generator, device=generator.device).to(dev, dtype)
    images: list[torch.Tensor] = []
    x = noise
    for i in range(steps):
        refs = dup(torch.stack(images, 1)) if images else None
        features = model.encode(h, valid, refs)  # (2)B, Q + i R, D
        progress = (i + 1) / steps

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v = model.decoder(dup(x_t), features, dup(t))
            return guided(v, guidance_scale(cfg_scale, cfg_schedule, progress, t, cfg_interval)) if use_cfg else v

        x = diffusion.sample(model_fn, noise, generator=generator, clip_x0=clip_x0, **(flow_options or {})).to(dtype)
        images.append(x)
    return x


# --------------------------------------------------------------------------- the family


class TransDiffFamily(ModelFamily):
    """TransDiff for the trainer, the samplers and eval: generates images only (no caption
    decoder, no in-context editing)."""

    name = "transdiff"
    model_class = TransDiff
    token_proj_key, image_pos_key = "decoder.input_proj.weight", "decoder.diffusion_pos_embed_learned"

    def training_inputs(self, model: TransDiff, latent_tokens: torch.Tensor, cond: Condition, diffusion,
                        gen: torch.Generator, rng: random.Random) -> dict:
        if cond.documents is not None:
            # MRAR's references are earlier images of one condition, not a document's context
            raise ConfigError("model.family=transdiff trains on image-caption pairs; the data holds documents "
                              "(several images and text spans), which model.family=causalfusion trains on")
        return training_inputs(model, latent_tokens, diffusion, gen, rng, **cond.as_kwargs())

    def training_flops(self, model: TransDiff, batch_size: int, seq_len: int) -> float:
        return training_flops(model, batch_size, seq_len)

    def sample_image_tokens(self, model: TransDiff, diffusion, cond: Condition, *, ar_steps: int,
                            generator: torch.Generator, **options) -> torch.Tensor:
        return sample_image_tokens(model, diffusion, ar_steps=ar_steps, generator=generator, **cond.as_kwargs(), **options)


FAMILY = TransDiffFamily()
