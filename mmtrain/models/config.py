"""Model configs: :class:`ModelConfig` (the ``model:`` section) with its TransDiff part.

``model.family`` picks the architecture: ``causalfusion`` (one decoder-only transformer,
:mod:`mmtrain.models.causalfusion`) or ``transdiff`` (an AR encoder plus a flow decoder,
:mod:`mmtrain.models.transdiff`). The shared fields (width, depth, condition, text
length, CFG drop) mean the same for both; the encoder of TransDiff is ``depth`` blocks of
``hidden_size``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mmtrain.errors import ConfigError

FAMILIES = ("causalfusion", "transdiff")
BACKBONES = ("dit", "llama")
LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
BACKBONE_TRAINING = ("full", "frozen_text", "new_only")


@dataclass
class TransDiffConfig:
    """The ``model.transdiff`` section (used when ``model.family=transdiff``).

    Args:
        decoder_depth: flow-decoder blocks (adaLN self-attention, cross-attention to the
            encoder features, MLP). Default 4.
        decoder_hidden_size: decoder width W; 0 = ``model.hidden_size`` (as every
            official size). Default 0.
        decoder_heads: decoder attention heads; 0 = ``model.num_heads``. Default 0.
        buffer_size: class mode: condition slots, each holding the class embedding (the
            official "buffer"). Text mode uses ``model.max_text_len`` text slots. Default 64.
        num_queries: learned query tokens whose encoder outputs the decoder attends to;
            0 = one per image token (the official 1-step model). Default 0.
        mrar_refs: Multi-Reference Autoregression: reference images K before the final
            one. 0 = plain TransDiff (one image per condition). Default 0.
        ref_patch: a reference image enters the encoder as tokens of ``ref_patch`` x
            ``ref_patch`` image tokens (official MRAR: 2, so 64 tokens per 256-token image). Default 2.
        condition_sees_query: class mode: condition slots also attend to the query block
            (the official 1-step encoder is fully bidirectional; its MRAR encoder is
            block-causal and sets this false). Default true.
        diffusion_batch_mul: decoder loss evaluated at this many (t, noise) draws per
            image, reusing the encoder features (official ``diffusion_batch_mul``). Default 1.
        dropout: attention and projection dropout in encoder and decoder (official 0.1). Default 0.0.
    """

    decoder_depth: int = 4
    decoder_hidden_size: int = 0
    decoder_heads: int = 0
    buffer_size: int = 64
    num_queries: int = 0
    mrar_refs: int = 0
    ref_patch: int = 2
    condition_sees_query: bool = True
    diffusion_batch_mul: int = 1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("decoder_depth", "buffer_size", "ref_patch", "diffusion_batch_mul"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.transdiff.{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("decoder_hidden_size", "decoder_heads", "num_queries", "mrar_refs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.transdiff.{name}: expected >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.transdiff.dropout: expected a probability in [0, 1), got {self.dropout}")


@dataclass
class LlamaConfig:
    """The ``model.llama`` section (used when ``model.backbone=llama``): what a LLaMA-family
    decoder (:mod:`mmtrain.models.llama`) needs beyond ``model.hidden_size`` / ``depth`` /
    ``num_heads``. ``mmtrain convert hf`` and ``train.init_from`` a Hugging Face directory fill
    it from the checkpoint's ``config.json``; set by hand it describes a LLaMA trained from scratch.

    Args:
        model_type: ``llama``, ``mistral``, ``qwen2`` or ``qwen3``: what ``mmtrain export --hf``
            writes as ``config.json``'s model_type. Default ``llama``.
        num_key_value_heads: key/value heads (grouped-query attention); 0 = ``model.num_heads``. Default 0.
        head_dim: per-head width; 0 = hidden_size / num_heads. Default 0.
        intermediate_size: SwiGLU width; 0 = the width with today's MLP's parameter count,
            ``2/3 * mlp_ratio * hidden_size`` rounded up to a multiple of 8. Default 0.
        rms_norm_eps: RMSNorm epsilon. Default 1e-6.
        rope_theta: rotary base. Default 10000.0.
        rope_scaling: the checkpoint's ``rope_scaling`` (``linear`` or ``llama3``); null = none. Default null.
        qkv_bias: bias on the q/k/v projections (Qwen2). Default false.
        o_bias: bias on the attention output projection. Default false.
        mlp_bias: biases in the MLP. Default false.
        qk_norm: per-head RMSNorm on q and k (Qwen3). Default false.
        tie_word_embeddings: the LM head is the embedding table. Default false.
        vocab_size: rows of the embedding table; 0 = the text tokenizer's size. A checkpoint
            whose table is larger than its tokenizer (padded) keeps its size. Default 0.
        max_position_embeddings: the longest text the model is meant for (``mmtrain eval text``'s
            window, ``config.json`` on export). Default 2048.
        hf_config: the rest of the checkpoint's ``config.json`` (token ids, dtype ...), written
            back by ``mmtrain export --hf``. Default {}.
    """

    model_type: str = "llama"
    num_key_value_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    vocab_size: int = 0
    max_position_embeddings: int = 2048
    hf_config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_type not in LLAMA_MODEL_TYPES:
            raise ConfigError(f"model.llama.model_type: expected one of {LLAMA_MODEL_TYPES}, got {self.model_type!r}")
        for name in ("num_key_value_heads", "head_dim", "intermediate_size", "vocab_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.llama.{name}: expected >= 0, got {getattr(self, name)}")


@dataclass
class ModelConfig:
    """Model shape and training objective.

    Args:
        hidden_size: width D. Default 192.
        depth: transformer blocks. Default 6.
        num_heads: attention heads. Default 6.
        mlp_ratio: MLP hidden = mlp_ratio * D. Default 4.0.
        patch_size: latent pixels per token side. Default 4.
        condition: ``text`` (multimodal: prompts, captions) or ``class`` (the official
            class-conditional model: ``num_cond_tokens`` tokens from a label embedding).
            Default ``text``.
        num_classes: labels in class mode; label ``num_classes`` is the null class used
            for classifier-free guidance. Default 1000.
        num_cond_tokens: condition tokens per label in class mode. Default 4.
        trainable_pos: learn the image position embedding (starts as 2-D sin-cos; the
            official L/XL/H models learn it). Default false.
        max_text_len: text slots T including <s> and </s>. Default 32.
        ar_step_decay: P(S = k) proportional to decay^(k-1) when drawing AR steps. Default 0.9.
        max_ar_weight: diffusion-loss weight of the first AR step. Default 2.0.
        min_ar_weight: weight of the last AR step. Default 1.0.
        ar_weight_schedule: ``linear`` or ``cosine`` between the two. Default ``linear``.
        text_loss_weight: coefficient of the text cross-entropy. Default 1.0.
        cond_drop_prob: probability to drop the prompt or label (for classifier-free
            guidance). Default 0.1.
        caption_prob: fraction of samples laid out image -> text (text mode). Default 0.5.
        max_images: images per training sequence (documents): the loader cuts a longer
            document at the image over the budget, as ``max_text_len`` cuts its text; with
            ``pack_length: 0`` rows are as long as the longest document the budget allows.
            Pairs are one image. Default 1.
        pack_length: pack the samples of a batch into rows of this many slots, dropping
            their padding (first-fit; samples in one row never see each other); 0 = one
            row per sample. Must be at least the longest sample. Default 0.
        seq_buckets: static training shapes. The clean-token block of a training
            sequence (its length follows the random AR split) is padded up to the next of
            ``seq_buckets`` lengths ``ceil(k * L / seq_buckets)``, and packed batches round
            their row count up to a multiple of ``ceil(B / seq_buckets)``, so compiled code
            (``train.compile``, FlexAttention) sees at most ``seq_buckets`` sequence shapes in
            a whole run instead of one per AR split. Padding slots attend to nothing and
            carry no loss: the losses are those of the unpadded batch. 0 = no padding (one
            shape per split; only for eager runs). Default 4.
        attention: ``sdpa`` (boolean mask, any device) or ``flex`` (FlexAttention block
            mask built from the slot roles, no N x N matrix; compiled on CUDA; on CPU it
            runs forward only, so CPU training needs ``sdpa``). Same numbers. Default ``sdpa``.
        grad_checkpoint: recompute block activations in backward. Default false.
        family: ``causalfusion`` or ``transdiff``. Default ``causalfusion``. TransDiff
            ignores the AR-split, caption and packing knobs and needs
            ``diffusion.process=rectified_flow``.
        transdiff: the TransDiff part, see :class:`TransDiffConfig`.
        backbone: the transformer blocks of ``causalfusion``: ``dit`` (LayerNorm, GELU MLP,
            learned text positions, q/k LayerNorm: the official blocks) or ``llama`` (a
            LLaMA-family decoder, :mod:`mmtrain.models.llama`: RMSNorm, SwiGLU, rotary
            positions, grouped-query attention; text mode; can start from a Hugging Face
            checkpoint). Default ``dit``.
        llama: the LLaMA part, see :class:`LlamaConfig`.
        backbone_training: with ``backbone: llama``, which weights train: ``full`` (all;
            the pretrained ones at ``optim.pretrained_lr_scale`` x the learning rate),
            ``frozen_text`` (the pretrained weights are frozen and serve the text slots; image
            slots get their own copies of each block's norms, attention projections and MLP,
            initialised from the pretrained ones: text-only logits stay those of the base
            model) or ``new_only`` (only the new image layers train: input projection,
            timestep embedding, diffusion head). Default ``full``.
    """

    hidden_size: int = 192
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    patch_size: int = 4
    condition: str = "text"
    num_classes: int = 1000
    num_cond_tokens: int = 4
    trainable_pos: bool = False
    max_text_len: int = 32
    ar_step_decay: float = 0.9
    max_ar_weight: float = 2.0
    min_ar_weight: float = 1.0
    ar_weight_schedule: str = "linear"
    text_loss_weight: float = 1.0
    cond_drop_prob: float = 0.1
    caption_prob: float = 0.5
    max_images: int = 1
    pack_length: int = 0
    seq_buckets: int = 4
    attention: str = "sdpa"
    grad_checkpoint: bool = False
    family: str = "causalfusion"
    transdiff: TransDiffConfig = field(default_factory=TransDiffConfig)
    backbone: str = "dit"
    llama: LlamaConfig = field(default_factory=LlamaConfig)
    backbone_training: str = "full"

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(f"model.backbone: expected one of {BACKBONES}, got {self.backbone!r}")
        if self.backbone_training not in BACKBONE_TRAINING:
            raise ConfigError(f"model.backbone_training: expected one of {BACKBONE_TRAINING}, got {self.backbone_training!r}")
        if self.backbone == "llama" and (self.family != "causalfusion" or self.condition != "text"):
            raise ConfigError("model.backbone=llama is a language model's decoder: it needs model.family=causalfusion and "
                              f"model.condition=text (got {self.family}, {self.condition})")
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family: expected one of {FAMILIES}, got {self.family!r}")
        if self.family == "transdiff" and (self.attention != "sdpa" or self.pack_length):
            raise ConfigError("model.family=transdiff runs SDPA on unpacked rows: set model.attention=sdpa and model.pack_length=0")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})")
        if self.hidden_size % 4:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be divisible by 4 (2-D sin-cos positions)")
        if self.condition not in ("text", "class"):
            raise ConfigError(f"model.condition: expected 'text' or 'class', got {self.condition!r}")
        if self.ar_weight_schedule not in ("linear", "cosine"):
            raise ConfigError(f"model.ar_weight_schedule: expected 'linear' or 'cosine', got {self.ar_weight_schedule!r}")
        if self.attention not in ("sdpa", "flex"):
            raise ConfigError(f"model.attention: expected 'sdpa' or 'flex', got {self.attention!r}")
        if not 0.0 <= self.caption_prob <= 1.0:
            raise ConfigError(f"model.caption_prob: expected a probability, got {self.caption_prob}")
        if self.max_text_len < 2:
            raise ConfigError(f"model.max_text_len: expected >= 2, got {self.max_text_len}")
        if self.seq_buckets < 0 or self.pack_length < 0:
            raise ConfigError(f"model.seq_buckets and model.pack_length must be >= 0, got {self.seq_buckets}, {self.pack_length}")
        if self.max_images < 1:
            raise ConfigError(f"model.max_images: expected >= 1, got {self.max_images}")
        if self.num_classes < 1 or self.num_cond_tokens < 1:
            raise ConfigError(f"model.num_classes and model.num_cond_tokens must be >= 1, got {self.num_classes}, {self.num_cond_tokens}")
