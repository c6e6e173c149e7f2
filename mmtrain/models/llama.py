"""A LLaMA-family decoder (LLaMA, Mistral, Qwen2, Qwen3) in one readable file.

Why: CausalFusion's text path should start from a pretrained language model. This file
rebuilds the LLaMA family's decoder from plain modules (RMSNorm, SwiGLU, rotary
positions, grouped-query attention, optional q/k/v bias as in Qwen2, optional per-head
q/k RMSNorm as in Qwen3, tied or untied embeddings) and loads the official
``model.safetensors`` weights without importing transformers. On text-only input its
logits equal those of transformers' ``AutoModelForCausalLM`` on the same checkpoint
(tests/test_llama.py checks 1e-5 in fp32).

The blocks keep the calling conventions of :mod:`mmtrain.models.causalfusion`: attention
takes a boolean mask (B, N, Nk) (True = may attend) or a FlexAttention BlockMask, and an
optional KV-cache dict (``update_cache`` stores the keys/values of this call), so the
generalized causal mask, KV-cache sampling and packing can later run on these blocks.
Positions are explicit (B, N) LongTensors, so image slots can later get their own.

Parameter names are those of Hugging Face without the ``model.`` prefix
(``embed_tokens``, ``layers.N.self_attn.q_proj`` ...), so :func:`load_hf_weights` is a
one-line key map.

Shapes: B batch, N query slots, Nk key slots, D hidden, H query heads, G key/value heads,
d head dim, F intermediate (MLP) width, V vocabulary.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmtrain.models.attention import flex_attention_call
from mmtrain.models.config import LLAMA_MODEL_TYPES as SUPPORTED_MODEL_TYPES
from mmtrain.models.config import LlamaConfig, ModelConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


# --------------------------------------------------------------------------- config


def _config_error(field_name: str, value, why: str) -> ValueError:
    return ValueError(f"config.json: field {field_name!r} = {value!r}: {why}")


@dataclass
class DecoderSpec:
    """The architecture of a LLaMA-family decoder, as read from a Hugging Face config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2 always; LLaMA attention_bias)
    o_bias: bool = False  # bias on the output projection (LLaMA / Qwen3 attention_bias)
    mlp_bias: bool = False  # LLaMA mlp_bias
    qk_norm: bool = False  # per-head RMSNorm on q and k before rotary (Qwen3)
    tie_word_embeddings: bool = False
    extra: dict = field(default_factory=dict)  # the rest of config.json, untouched

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "DecoderSpec":
        """Read a config.json dict; a field this decoder cannot honour is a ValueError naming it."""
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise _config_error("model_type", mt, f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
                raise _config_error(key, cfg.get(key), "required, a positive integer")
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise _config_error("num_key_value_heads", kv_heads, f"must divide num_attention_heads = {heads}")
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise _config_error("hidden_act", act, "only 'silu' (SwiGLU) is supported")
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            raise _config_error("partial_rotary_factor", cfg["partial_rotary_factor"], "only 1.0 is supported")
        # sliding-window attention is not implemented: refuse rather than silently differ
        if mt == "mistral" and cfg.get("sliding_window") is not None:
            raise _config_error("sliding_window", cfg["sliding_window"], "sliding-window attention is not supported (need null)")
        if mt in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
            raise _config_error("use_sliding_window", True, "sliding-window attention is not supported")
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise _config_error("rope_scaling", rope_scaling, f"rope_type must be one of {SUPPORTED_ROPE_TYPES}")
        bias = bool(cfg.get("attention_bias", False))
        known = {"model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                 "rope_scaling", "attention_bias", "mlp_bias", "tie_word_embeddings"}
        return cls(
            model_type=mt,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling,
            qkv_bias=True if mt == "qwen2" else (bias if mt in ("llama", "qwen3") else False),
            o_bias=bias if mt in ("llama", "qwen3") else False,
            mlp_bias=bool(cfg.get("mlp_bias", False)) if mt == "llama" else False,
            qk_norm=mt == "qwen3",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            extra={k: v for k, v in cfg.items() if k not in known},
        )

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> "DecoderSpec":
        path = _local_dir(directory)
        with open(os.path.join(path, "config.json")) as f:
            return cls.from_hf_config(json.load(f))

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, vocab_size: int) -> "DecoderSpec":
        """The decoder of a ``model.backbone=llama`` config (``vocab_size``: the embedding rows)."""
        lc, D = cfg.llama, cfg.hidden_size
        return cls(
            model_type=lc.model_type, vocab_size=vocab_size, hidden_size=D,
            intermediate_size=lc.intermediate_size or -(-round(2 * cfg.mlp_ratio * D / 3) // 8) * 8,
            num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
            num_key_value_heads=lc.num_key_value_heads or cfg.num_heads, head_dim=lc.head_dim or D // cfg.num_heads,
            rms_norm_eps=lc.rms_norm_eps, rope_theta=lc.rope_theta, rope_scaling=lc.rope_scaling, qkv_bias=lc.qkv_bias,
            o_bias=lc.o_bias, mlp_bias=lc.mlp_bias, qk_norm=lc.qk_norm, tie_word_embeddings=lc.tie_word_embeddings,
            extra=dict(lc.hf_config, max_position_embeddings=lc.max_position_embeddings))

    def model_fields(self) -> dict:
        """The ``model`` config fields (``hidden_size``, ``depth``, ``num_heads``, ``llama``) of this decoder."""
        extra = dict(self.extra)
        max_pos = int(extra.pop("max_position_embeddings", 2048))
        for key in ("architectures", "transformers_version"):
            extra.pop(key, None)
        return dict(hidden_size=self.hidden_size, depth=self.num_hidden_layers, num_heads=self.num_attention_heads,
                    llama=LlamaConfig(model_type=self.model_type, num_key_value_heads=self.num_key_value_heads,
                                      head_dim=self.head_dim, intermediate_size=self.intermediate_size,
                                      rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
                                      qkv_bias=self.qkv_bias, o_bias=self.o_bias, mlp_bias=self.mlp_bias, qk_norm=self.qk_norm,
                                      tie_word_embeddings=self.tie_word_embeddings, vocab_size=self.vocab_size,
                                      max_position_embeddings=max_pos, hf_config=extra))

    def to_hf_config(self) -> dict:
        """A ``config.json`` transformers reads back as this decoder."""
        cfg = dict(self.extra)
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        cfg.update(architectures=[arch], model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                   intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                   num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                   head_dim=self.head_dim, hidden_act="silu", rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
                   rope_scaling=self.rope_scaling, tie_word_embeddings=self.tie_word_embeddings)
        if self.model_type in ("llama", "qwen3"):
            cfg["attention_bias"] = self.qkv_bias or self.o_bias
            if self.qkv_bias != self.o_bias:
                raise ValueError(f"{self.model_type} has one attention_bias for q/k/v and o; this decoder has qkv_bias="
                                 f"{self.qkv_bias}, o_bias={self.o_bias}")
        elif self.qkv_bias != (self.model_type == "qwen2") or self.o_bias:
            raise ValueError(f"model_type {self.model_type} cannot hold qkv_bias={self.qkv_bias}, o_bias={self.o_bias}")
        if self.model_type == "llama":
            cfg["mlp_bias"] = self.mlp_bias
        elif self.mlp_bias:
            raise ValueError(f"model_type {self.model_type} has no MLP biases")
        if self.qk_norm != (self.model_type == "qwen3"):
            raise ValueError(f"model_type {self.model_type} {'needs' if self.model_type == 'qwen3' else 'has no'} q/k norm")
        if self.model_type == "mistral":
            cfg["sliding_window"] = None
        return cfg


# --------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back before the weight (as in HF)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # ..., dim
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies (d/2,) of rotary embeddings: default, "linear" or "llama3" scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = "default" if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if rope_type == "linear":  # positions divided by factor == frequencies divided by factor
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":  # Llama 3.1: long wavelengths / factor, short kept, smooth in between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif rope_type != "default":
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported ({SUPPORTED_ROPE_TYPES})")
    return inv_freq


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half convention) at explicit positions."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        # a plain fp32 tensor, not a buffer: module.to(bfloat16) must not round the frequencies
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)  # d/2

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, N) -> cos, sin (B, N, d) in fp32."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # B, N, d/2
        emb = torch.cat([freqs, freqs], dim=-1)  # B, N, d
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, N, d), cos/sin (B, N, d)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def causal_mask(n: int, nk: int, device=None) -> torch.Tensor:
    """(N, Nk) boolean causal mask of N new queries after Nk - N cached keys."""
    q = torch.arange(n, device=device)[:, None] + (nk - n)
    return torch.arange(nk, device=device)[None, :] <= q


class GQAttention(nn.Module):
    """Grouped-query attention with rotary positions; optional q/k/v bias and q/k norm.

    ``mask``: boolean (B, N, Nk), True where a query may attend; a FlexAttention BlockMask;
    or None for plain causal attention (offset by what the cache holds). ``cache``: a dict
    holding ``k``/``v`` (B, G, Nc, d) after rotary; with ``update_cache`` this call's keys
    and values are appended to it.
    """

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        D, H, G, d = spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        self.heads, self.kv_heads, self.head_dim = H, G, d
        self.q_proj = nn.Linear(D, H * d, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(D, G * d, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(D, G * d, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(H * d, D, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, mask, rope: tuple[torch.Tensor, torch.Tensor],
                cache: dict | None = None, update_cache: bool = False) -> torch.Tensor:
        return self.o_proj(self.attend(*self.project(x), mask, rope, cache, update_cache))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, D) -> q (B, N, H, d), k and v (B, N, G, d); q and k after the q/k norm."""
        B, N, _ = x.shape
        H, G, d = self.heads, self.kv_heads, self.head_dim
        q = self.q_proj(x).view(B, N, H, d)
        k = self.k_proj(x).view(B, N, G, d)
        v = self.v_proj(x).view(B, N, G, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def attend(self, q, k, v, mask, rope, cache=None, update_cache=False) -> torch.Tensor:
        """Rotary, the cache, attention: -> B, N, H * d (before ``o_proj``)."""
        B, N, H, d = q.shape
        G = self.kv_heads
        v = v.transpose(1, 2)  # B, G, N, d
        cos, sin = rope
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # B, H, N, d
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # B, G, N, d
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)  # B, G, Nk, d
                v = torch.cat([cache["v"], v], dim=2)
            if update_cache:
                cache["k"], cache["v"] = k, v
        # each key/value head serves H / G query heads (HF repeat_kv)
        k = k.repeat_interleave(H // G, dim=1)  # B, H, Nk, d
        v = v.repeat_interleave(H // G, dim=1)
        Nk = k.shape[2]
        if mask is None:
            m = None if N == 1 else causal_mask(N, Nk, q.device)  # a single new query sees every key
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=d**-0.5)
        elif isinstance(mask, torch.Tensor):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=d**-0.5)  # mask: B, N, Nk
        else:
            out = flex_attention_call(q, k, v, mask)  # flex's default scale is d**-0.5 too
        return out.transpose(1, 2).reshape(B, N, H * d)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B, N, D
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = GQAttention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = SwiGLU(spec.hidden_size, spec.intermediate_size, spec.mlp_bias)

    def forward(self, x, mask, rope, cache=None, update_cache=False, image_slots=None):  # x: B, N, D
        x = x + self.self_attn(self.input_layernorm(x), mask, rope, cache, update_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class ModalityBlock(DecoderBlock):
    """A block whose image slots have their own weights (LMFusion, mixture-of-transformers).

    The block's own weights (the pretrained ones, frozen in ``model.backbone_training:
    frozen_text``) serve text slots; ``image``, a copy of every norm, projection and MLP of
    the block, serves image slots (``image_slots`` (B, N) True). Attention is joint: every
    slot's q/k/v come from its own modality's projections, then one attention over all of
    them under the mask. Both modalities' projections run on every slot and ``torch.where``
    picks (static shapes, no gather; twice the linear FLOPs): a text slot's numbers are
    exactly those of the plain block, so text-only input gives the base model's logits bit
    for bit, however the image weights have trained.
    """

    def __init__(self, spec: DecoderSpec):
        super().__init__(spec)
        self.image = DecoderBlock(spec)

    def forward(self, x, mask, rope, cache=None, update_cache=False, image_slots=None):  # x: B, N, D
        if image_slots is None:
            return super().forward(x, mask, rope, cache, update_cache)
        img = image_slots[..., None]  # B, N, 1

        def pick(text_out, image_out):  # B, N, ... each
            return torch.where(img.view(*img.shape, *[1] * (text_out.dim() - 3)), image_out, text_out)

        a, b = self.self_attn, self.image.self_attn
        q, k, v = (pick(t, i) for t, i in zip(a.project(self.input_layernorm(x)), b.project(self.image.input_layernorm(x))))
        out = a.attend(q, k, v, mask, rope, cache, update_cache)  # B, N, H * d
        x = x + pick(a.o_proj(out), b.o_proj(out))
        return x + pick(self.mlp(self.post_attention_layernorm(x)), self.image.mlp(self.image.post_attention_layernorm(x)))


class Decoder(nn.Module):
    """embed_tokens -> layers -> norm -> lm_head (tied to embed_tokens or not)."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.rotary = Rotary(spec.head_dim, spec.rope_theta, spec.rope_scaling)
        self.layers = nn.ModuleList(DecoderBlock(spec) for _ in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self) -> list[dict]:
        """One empty KV-cache dict per layer."""
        return [{} for _ in self.layers]

    def forward_hidden(self, x: torch.Tensor, positions: torch.Tensor, mask=None,
                       cache: list[dict] | None = None, update_cache: bool = False) -> torch.Tensor:
        """Embedded inputs x (B, N, D) at positions (B, N) -> final-normed hidden states (B, N, D)."""
        rope = self.rotary(positions)  # cos, sin: B, N, d
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, rope, None if cache is None else cache[i], update_cache)
        return self.norm(x)

    def forward_text(self, ids: torch.Tensor, positions: torch.Tensor | None = None, mask=None,
                     cache: list[dict] | None = None, update_cache: bool = False) -> torch.Tensor:
        """Token ids (B, N) -> logits (B, N, V) in fp32.

        ``positions`` default to 0..N-1 after what the cache holds; ``mask`` None means
        causal (see :class:`GQAttention`).
        """
        B, N = ids.shape
        if positions is None:
            start = cache[0]["k"].shape[2] if cache is not None and "k" in cache[0] else 0
            positions = torch.arange(start, start + N, device=ids.device).expand(B, N)
        h = self.forward_hidden(self.embed_tokens(ids), positions, mask, cache, update_cache)  # B, N, D
        return self.lm_head(h).float()  # B, N, V


# --------------------------------------------------------------------------- weights


def _local_dir(directory: str | os.PathLike) -> str:
    path = os.fspath(directory)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a local directory: give the path of a downloaded Hugging Face "
                                "checkpoint (config.json + model.safetensors); nothing is downloaded")
    return path


def hf_to_local_key(key: str) -> str | None:
    """Official checkpoint key -> this module's name (None: not a parameter, e.g. old inv_freq buffers)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    return key[len("model."):] if key.startswith("model.") else key


def safetensors_files(path: str) -> list[str]:
    """The weight files of a local checkpoint: ``model.safetensors``, or the shards its index names."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(path, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def checkpoint_tensors(path: str):
    """(key, tensor) of every tensor of a local checkpoint, read one at a time (never the whole file)."""
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


@torch.no_grad()
def load_hf_weights(decoder: Decoder, directory: str | os.PathLike) -> Decoder:
    """Copy an official LLaMA-family checkpoint in a local directory into ``decoder``.

    Reads config.json (must describe the same architecture as ``decoder.spec``) and the
    safetensors weights (single file or sharded). Every parameter must be found and every
    checkpoint tensor used; a tied ``lm_head`` may be absent from the checkpoint.
    """
    path = _local_dir(directory)
    spec = DecoderSpec.from_directory(path)
    if {k: v for k, v in vars(spec).items() if k != "extra"} != {k: v for k, v in vars(decoder.spec).items() if k != "extra"}:
        raise ValueError(f"{path}/config.json describes another architecture than this decoder: {spec} vs {decoder.spec}")
    params = dict(decoder.named_parameters(remove_duplicate=False))
    seen, unexpected = set(), []
    for key, tensor in checkpoint_tensors(path):
        name = hf_to_local_key(key)
        if name is None:
            continue
        if name not in params:
            unexpected.append(key)
            continue
        if params[name].shape != tensor.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}")
        params[name].copy_(tensor.to(params[name].dtype))
        seen.add(name)
    if decoder.spec.tie_word_embeddings and "embed_tokens.weight" in seen:
        seen.add("lm_head.weight")  # the same tensor
    missing = sorted(set(params) - seen)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the decoder; missing {missing}, unexpected {sorted(unexpected)}")
    return decoder


def from_pretrained(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Decoder:
    """Build a :class:`Decoder` from a local checkpoint directory and load its weights."""
    decoder = Decoder(DecoderSpec.from_directory(directory)).to(dtype)
    return load_hf_weights(decoder, directory)
