"""The document layout (several images and text spans in one sequence): its mask, and today's
pair layouts as special cases of it, with the same losses and gradients."""
import random

import numpy as np
import pytest
import torch

from mmtrain.models.causalfusion import (CLEAN, NOISY, PAD, ROLE_CAUSAL, TEXT, CausalFusion, ModelConfig, generate_mask,
                                         training_inputs)
from mmtrain.models.diffusion import DiffusionConfig, GaussianDiffusion
from mmtrain.models.document_layout import (IGNORE, ImageRun, TextRun, document_rows, document_runs, layout_from_slots,
                                            pack_documents, pair_runs, run_slots)

IDS = dict(pad=0, bos=2, eos=3, boi=4, eoi=5)
T = 16  # text slots


def _model(**kw) -> CausalFusion:
    cfg = ModelConfig(hidden_size=32, depth=2, num_heads=2, patch_size=8, max_text_len=T, **{"max_images": 3, **kw})
    return CausalFusion(cfg, latent_channels=3, latent_size=16, vocab_size=24, special_ids=IDS)  # L = 4 tokens


def _story(rng: random.Random, images: list[int]) -> list:
    """A document: a text span, then per image the image and a text span (some spans empty)."""
    segs: list = [np.array([rng.randrange(6, 24) for _ in range(rng.randint(1, 3))])]
    for m in images:
        segs.append(m)
        if rng.random() < 0.7:
            segs.append(np.array([rng.randrange(6, 24) for _ in range(rng.randint(1, 3))]))
    return segs


def _doc_layout(model, docs, seed=0, **cfg_over):
    cfg = model.cfg if not cfg_over else ModelConfig(**{**model.cfg.__dict__, **cfg_over})
    rng = random.Random(seed)
    runs = [document_runs(d, IDS, T, model.num_image_tokens, cfg, rng) for d in docs]
    rows = document_rows([run_slots(r, IDS, T) for r in runs], cfg, model.num_image_tokens)
    return runs, layout_from_slots(rows, "cpu")


def test_text_stream_targets_open_and_close_images():
    """<s> span <boi> [image] <eoi> span </s>: a span's last token predicts <boi>, <eoi> the next
    span's first token (or </s> at the end, or <boi> of a following image), <boi> nothing."""
    model = _model(caption_prob=0.0, cond_drop_prob=0.0)
    doc = [np.array([10, 11]), 0, np.array([12]), 1, 2]
    runs = document_runs(doc, IDS, T, 4, model.cfg, random.Random(0))
    kinds = [type(r).__name__ for r in runs]
    assert kinds == ["TextRun", "ImageRun", "TextRun", "ImageRun", "ImageRun"]
    assert runs[0].ids.tolist() == [2, 10, 11] and runs[0].targets.tolist() == [10, 11, IDS["boi"]]
    assert runs[0].pos.tolist() == [0, 1, 2] and runs[2].pos.tolist() == [3]
    assert runs[1].eoi_target == 12 and runs[2].targets.tolist() == [IDS["boi"]]
    assert runs[3].eoi_target == IDS["boi"] and runs[4].eoi_target == IDS["eos"]
    slots = run_slots(runs, IDS, T)
    boi = (slots["token"] == IDS["boi"]) & (slots["kind"] == TEXT)
    assert boi.sum() == 3 and (slots["target"][boi] == IGNORE).all()
    assert (slots["pos"][boi] == T).all() and (slots["pos"][slots["token"] == IDS["eoi"]] == T + 1).all()
    # each generated image: a full clean copy (what follows sees it) and L noisy tokens
    assert (slots["kind"] == CLEAN).sum() == 3 * 4 and (slots["kind"] == NOISY).sum() == 3 * 4
    # the text budget cuts the stream (the loader cuts first; this guards)
    long = document_runs([np.arange(6, 6 + 40) % 24], IDS, T, 4, model.cfg, random.Random(0))
    assert sum(len(r.ids) for r in long) == T and long[-1].targets[-1] == IDS["eos"]


@pytest.mark.parametrize("seed", range(4))
def test_no_later_segment_sees_an_image_s_noisy_tokens_and_each_image_keeps_the_single_image_mask(seed):
    model = _model(caption_prob=0.3, cond_drop_prob=0.0)
    rng = random.Random(seed)
    docs = [_story(rng, [0, 1, 2]), _story(rng, [3, 4])]
    runs, lay = _doc_layout(model, docs, seed)
    mask = lay.attention_mask()  # R, N, N
    R, N = lay.kind.shape
    eye = torch.eye(N, dtype=torch.bool)
    for r in range(R):
        m, kind, seg, sample, level = mask[r], lay.kind[r], lay.seg[r], lay.sample[r], lay.level[r]
        noisy = kind == NOISY
        # a noisy key is seen only by noisy queries of its own image and AR step
        sees_noisy = m[:, noisy] & ~eye[:, noisy]
        q_ok = (noisy[:, None] & (seg[:, None] == seg[noisy][None]) & (level[:, None] == level[noisy][None]))
        assert not (sees_noisy & ~q_ok).any()
        for d in set(sample[sample >= 0].tolist()):
            for s in set(seg[(sample == d) & (seg >= 0) & (kind != TEXT)].tolist()):
                own = (sample == d) & (seg == s) & (kind != TEXT)
                slots = own.nonzero().flatten()
                before = ((sample == d) & (torch.arange(N) < slots[0])).nonzero().flatten()
                rows = m[slots]
                if (kind[slots] == NOISY).any():
                    # the image's own block is the single-image mask of its AR split (the clean copy
                    # of the last step, which only later segments read, left out)
                    L = int((kind[slots] == NOISY).sum())
                    lv = level[slots][kind[slots] == NOISY]
                    split = torch.bincount(lv)[1:].tolist()
                    inner = slots[(kind[slots] == NOISY) | (level[slots] < lv.max())]
                    ref = generate_mask(0, split)
                    assert torch.equal(m[inner][:, inner], ref), (r, d, s)
                    # it sees every earlier non-noisy slot of its document and no earlier noisy one
                    assert torch.equal(rows[:, before], (kind[before] != NOISY)[None].expand(len(slots), -1))
                    assert L == model.num_image_tokens
                else:  # a context image: <boi> + tokens, one bidirectional block
                    assert m[slots][:, slots].all()
        # documents packed in one row never see each other
        cross = (sample[:, None] != sample[None]) & ~eye
        assert not (m & cross).any()
        # text after an image sees its clean copy
        text_q = (kind == TEXT) & (lay.role[r] == ROLE_CAUSAL)
        clean = kind == CLEAN
        later = torch.arange(N)[:, None] > torch.arange(N)[None]
        expect = text_q[:, None] & clean[None] & later & (sample[:, None] == sample[None])
        assert (m[expect]).all()


def test_cfg_drop_isolates_the_image_and_flex_matches_dense():
    model = _model(caption_prob=0.0, cond_drop_prob=1.0)
    rng = random.Random(1)
    runs, lay = _doc_layout(model, [_story(rng, [0, 1])])
    assert all(r.alone for r in runs[0] if isinstance(r, ImageRun))
    mask = lay.attention_mask()[0]
    img = (lay.kind[0] == CLEAN) | (lay.kind[0] == NOISY)
    other_seg = lay.seg[0][:, None] != lay.seg[0][None]
    eye = torch.eye(mask.shape[0], dtype=torch.bool)
    assert not (mask & img[:, None] & other_seg & ~eye).any()  # a dropped image sees only itself
    # the text after it still sees its clean copy
    assert (mask[lay.kind[0] == TEXT][:, lay.kind[0] == CLEAN]).any()
    model.eval()
    h = torch.randn(*lay.kind.shape, 32)
    with torch.no_grad():
        ref = model.run_blocks(h, lay.attention_mask("sdpa"))
        out = model.run_blocks(h, lay.attention_mask("flex"))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pack_length,backbone", [(0, "dit"), (48, "dit"), (48, "llama")])
def test_pair_documents_give_today_s_losses_and_gradients(pack_length, backbone):
    """Today's one-image layouts written as runs (pair_runs) train to the same losses and
    gradients as CausalFusion.layout, from the same draws, unpacked or packed."""
    torch.manual_seed(0)
    B = 6
    g = torch.Generator().manual_seed(0)
    text = torch.randint(6, 24, (B, T), generator=g)
    text_len = torch.tensor([3, 16, 5, 2, 8, 4])
    text[:, 0] = IDS["bos"]
    tokens = torch.randn(B, 4, 192, generator=g)
    model = _model(caption_prob=0.5, pack_length=pack_length, backbone=backbone)
    torch.nn.init.normal_(model.diffusion_head.weight, std=0.05)
    diffusion = GaussianDiffusion(DiffusionConfig())
    batch = training_inputs(model, tokens, diffusion, torch.Generator().manual_seed(1), random.Random(3), text=text, text_len=text_len)
    assert batch["caption_rows"].any() and not batch["caption_rows"].all()

    def run(**kw):
        model.zero_grad()
        out = model(**kw)
        out["loss"].backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    today, today_grads = run(**batch)
    split = torch.bincount(batch["ar_step"])[1:].tolist()
    docs = []
    for b in range(B):
        n = int(batch["text_len"][b])
        docs.append(run_slots(pair_runs(batch["text"][b, :n].numpy(), bool(batch["caption_rows"][b]), b, batch["order"][b].numpy(),
                                        split, batch["loss_weights"].numpy(), IDS, T), IDS, T))
    rows = pack_documents(docs, pack_length or max(len(d["kind"]) for d in docs), 1)
    if pack_length:
        assert rows["kind"].shape[0] < B
    lay = layout_from_slots(rows, "cpu")
    doc, doc_grads = run(latents_tokens=tokens, noisy_tokens=batch["noisy_tokens"], t=batch["t"], target=batch["target"],
                         layout=lay, max_text_targets=B * (T - 1))
    for key in ("loss", "diffusion_loss", "text_loss", "text_tokens", "image_tokens", "sequence_tokens"):
        torch.testing.assert_close(doc[key].float(), today[key].float(), rtol=1e-5, atol=1e-6)
    for name in today_grads:
        torch.testing.assert_close(doc_grads[name], today_grads[name], rtol=1e-4, atol=1e-6)


def test_a_document_trains_its_images_text_and_the_gradient_reaches_every_part():
    """Images of a document have their own t (M,) and rows; the text loss covers <boi>/<eoi>
    targets; loss is finite and every part of the model gets a gradient."""
    model = _model(caption_prob=0.0, cond_drop_prob=0.0)
    torch.nn.init.normal_(model.diffusion_head.weight, std=0.05)  # zero at init: no gradient would pass it
    rng = random.Random(2)
    docs = [_story(rng, [0, 1, 2]), _story(rng, [3])]
    runs, lay = _doc_layout(model, docs)
    M, L, P = 4, model.num_image_tokens, model.token_dim
    x0 = torch.randn(M, L, P)
    t = torch.tensor([10, 500, 900, 250])
    out = model(latents_tokens=x0, noisy_tokens=x0 + torch.randn(M, L, P), t=t.float(), target=torch.randn(M, L, P),
                layout=lay, max_text_targets=2 * T)
    assert torch.isfinite(out["loss"])
    assert int(out["image_tokens"]) == 4 * L
    n_targets = sum(int((r.targets != IGNORE).sum()) for d in runs for r in d if isinstance(r, TextRun))
    n_targets += sum(1 for d in runs for r in d if isinstance(r, ImageRun) and r.eoi_target != IGNORE)
    assert int(out["text_tokens"]) == n_targets
    out["loss"].backward()
    assert model.x_proj.weight.grad.abs().sum() > 0 and model.lm_head.weight.grad.abs().sum() > 0
    assert model.t_embedder.mlp[0].weight.grad.abs().sum() > 0
    assert (lay.kind != PAD).sum() == sum(len(run_slots(r, IDS, T)["kind"]) for r in runs)
