"""The paper's model sizes load from configs/ and have the official architecture's parameter count."""
from pathlib import Path

import pytest
import torch

from mmtrain.config import load_config
from mmtrain.models.causalfusion import CausalFusion

CONFIGS = Path(__file__).parent.parent / "configs"


def official_param_count(D, depth, heads, cond_tokens=64, classes=1000, token_dim=16, num_patches=256, mlp_ratio=4):
    """Counted from the official CausalDiffusionModel's layer list, independently of our modules."""
    hd = D // heads
    hidden = int(D * mlp_ratio)
    block = 2 * D + 3 * D * D + 4 * hd + D * D + D + 2 * D + D * hidden + hidden + hidden * D + D
    return (token_dim * D + D) + (256 * D + D + D * D + D) + (classes + 1) * cond_tokens * D \
        + num_patches * D + cond_tokens * D + depth * block + 2 * D + D * token_dim + token_dim


@pytest.mark.parametrize("name,shape,millions", [("l", (1024, 24, 16), 370), ("xl", (1280, 32, 20), 714), ("h", (1408, 48, 22), 1236)])
def test_paper_sizes(name, shape, millions):
    cfg = load_config(CONFIGS / f"causalfusion_{name}.yaml")
    assert (cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads) == shape
    with torch.device("meta"):
        model = CausalFusion(cfg.model, latent_channels=16, latent_size=cfg.data.image_size // 16)
    n = sum(p.numel() for p in model.parameters())
    assert n == official_param_count(*shape)
    assert round(n / 1e6) == millions
    assert model.pos_embed.requires_grad and cfg.model.grad_checkpoint


def test_transdiff_l_config_has_the_papers_size():
    """TransDiff-L is 683M parameters in the paper. Counted independently from the official
    layer list: 2 x 16 encoder blocks, 16 decoder blocks, z_proj (C -> D) and one mask token;
    mmtrain drops the 1-step model's dead z_proj and learns one query per slot (+255 x D)."""
    cfg = load_config(CONFIGS / "transdiff_l.yaml")
    from mmtrain.models.transdiff import TransDiff

    with torch.device("meta"):
        model = TransDiff(cfg.model, latent_channels=16, latent_size=cfg.data.image_size // 16)
    D, C, L = 1024, 16, 256
    ln = 2 * D
    enc_block = 2 * ln + (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D)
    dec_block = 3 * ln + (3 * D * D + 3 * D) + (D * D + D) + 4 * (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + 6 * D
    decoder = (C * D + D) + L * D + (256 * D + D) + (D * D + D) + (6 * D * D + 6 * D) + (D * D + D) + 16 * dec_block \
        + (D * C + C) + 2 * D
    official = 1000 * D + D + (C * D + D) + ln + D + (64 + L) * D + 32 * enc_block + ln + L * D + decoder
    assert round(official / 1e6) == 683
    n = sum(p.numel() for p in model.parameters())
    assert n == official - (C * D + D) + (L - 1) * D
