"""FlexAttention, called the same way by every backbone's attention (mmtrain.models.causalfusion's
DiT blocks, mmtrain.models.llama's LLaMA blocks)."""
from __future__ import annotations

import torch

_compiled_flex = None


def flex_attention_call(q, k, v, block_mask):
    """FlexAttention of q (B, H, N, d), k, v (B, H, Nk, d) under ``block_mask``: eager on CPU (forward
    only), fused into compiled blocks, else through one compiled kernel."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # inside compiled blocks (train.compile): fused with them
        return flex_attention(q, k, v, block_mask=block_mask)
    if q.device.type != "cuda":
        if torch.is_grad_enabled() and q.requires_grad:
            raise RuntimeError("model.attention=flex: FlexAttention has no backward pass on CPU; train with model.attention=sdpa "
                               "on CPU (same numbers) and use flex on CUDA")
        return flex_attention(q, k, v, block_mask=block_mask)
    global _compiled_flex
    if _compiled_flex is None:
        # static shapes: the training sequences come in model.seq_buckets lengths, so this
        # compiles a bounded number of times per run (no recompile per AR split)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)
