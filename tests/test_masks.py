"""The generalized causal mask against the rules of the CausalFusion paper, pair by pair."""
import random

import pytest
import torch

from mmtrain.models.causalfusion import (CLEAN, NOISY, PAD, TEXT, CausalFusion, ModelConfig, ar_loss_weights,
                                         caption_mask, draw_ar_split, generate_mask, pack_plan, split_inputs)


def roles(cond_len, split):
    """(role, step, index) per sequence position for [cond | clean 1..S-1 | noisy 1..S]."""
    out = [("cond", -1, i) for i in range(cond_len)]
    for s, size in enumerate(split[:-1]):
        out += [("clean", s, None)] * size
    for s, size in enumerate(split):
        out += [("noisy", s, None)] * size
    return out


def paper_rule(q, k, causal_cond):
    (qr, qs, qi), (kr, ks, ki) = q, k
    if qr == "cond":
        return kr == "cond" and (ki <= qi if causal_cond else True)
    if kr == "cond":
        return True
    if qr == "clean":
        return kr == "clean" and ks <= qs
    # noisy tokens of step i: clean tokens of steps < i and noisy tokens of step i
    return (kr == "clean" and ks < qs) or (kr == "noisy" and ks == qs)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("causal_cond", [True, False])
def test_generate_mask_matches_paper_rules(seed, causal_cond):
    rng = random.Random(seed)
    L = rng.choice([4, 9, 16])
    split = draw_ar_split(L, 0.9, rng)
    cond_len = rng.randint(1, 6)
    mask = generate_mask(cond_len, split, cond_causal=causal_cond)
    r = roles(cond_len, split)
    assert mask.shape == (len(r), len(r))
    for i, q in enumerate(r):
        for j, k in enumerate(r):
            assert bool(mask[i, j]) == paper_rule(q, k, causal_cond), (split, i, j, q, k)


def test_single_step_is_pure_diffusion():
    mask = generate_mask(3, [5])
    # no clean tokens: noisy tokens see the condition and each other
    assert mask.shape == (8, 8)
    assert mask[3:, :].all()


def test_draw_ar_split_properties():
    rng = random.Random(0)
    counts = {}
    for _ in range(3000):
        split = draw_ar_split(16, 0.9, rng)
        assert sum(split) == 16 and all(s >= 1 for s in split)
        counts[len(split)] = counts.get(len(split), 0) + 1
    # P(S=k) ~ 0.9^(k-1): one step is the most likely, and more likely than 16 steps
    assert counts[1] > counts.get(8, 0) > counts.get(16, 0)
    assert 0.8 < counts[2] / counts[1] < 1.0


def test_ar_loss_weights_linear_and_cosine():
    w = ar_loss_weights([2, 2], 2.0, 1.0, "linear")
    assert w.tolist() == [2.0, 2.0, 1.5, 1.5]
    c = ar_loss_weights([1, 1], 2.0, 1.0, "cosine")
    assert c[0] == pytest.approx(2.0) and c[1] == pytest.approx(1.5)


def test_caption_mask():
    m = caption_mask(image_len=4, text_len=3)
    assert m[:5, :5].all()  # <boi> + image: bidirectional
    assert not m[:5, 5:].any()  # image never sees text
    assert m[5:, :5].all()  # text sees the whole image
    assert torch.equal(m[5:, 5:], torch.ones(4, 4, dtype=torch.bool).tril())


def test_batch_layout_mixes_directions_and_hides_pads():
    cfg = ModelConfig(hidden_size=32, depth=1, num_heads=2, patch_size=8, max_text_len=6)
    model = CausalFusion(cfg, latent_channels=3, latent_size=16, vocab_size=20, special_ids=dict(pad=0, bos=2, eos=3, boi=4, eoi=5))
    L = model.num_image_tokens  # 4
    text = torch.tensor([[2, 7, 8, 3, 0, 0], [2, 9, 3, 0, 0, 0]])
    text_len = torch.tensor([4, 3])
    order = torch.stack([torch.randperm(L) for _ in range(2)])
    lay = model.layout(order, **split_inputs([1, 3], 0), loss_weights=ar_loss_weights([1, 3], 2, 1, "linear"), text=text,
                       text_len=text_len, caption_rows=torch.tensor([False, True]))
    mask = lay.attention_mask()
    # row 0 (generate): pads at text slots 4,5 are invisible to every other query
    gen = lay.kind[0]
    assert gen[:4].eq(TEXT).all() and gen[4:6].eq(PAD).all() and gen[6] == TEXT
    assert (gen == CLEAN).sum() == 1 and (gen == NOISY).sum() == L
    pads = (gen == PAD).nonzero().flatten()
    others = (gen != PAD).nonzero().flatten()
    assert not mask[0][others][:, pads].any()
    # clean slot holds the first token in AR order, noisy slots all tokens in AR order
    assert lay.img_idx[0][gen == CLEAN].tolist() == order[0, :1].tolist()
    assert lay.img_idx[0][gen == NOISY].tolist() == order[0].tolist()
    # only noisy slots carry diffusion loss weight, text slots carry next-token targets
    assert (lay.loss_weight[0] > 0).eq(gen == NOISY).all()
    assert lay.target[0, :3].tolist() == [7, 8, 3] and lay.target[0, 3] == -100
    # row 1 (caption): [<boi> | image | <eoi> | text]; the image is in raster order
    assert lay.kind[1, 1:L + 1].eq(CLEAN).all()
    assert lay.token[1, 0] == 4 and lay.token[1, L + 1] == 5
    assert lay.img_idx[1, 1:L + 1].tolist() == list(range(L))
    assert lay.target[1, L + 2:L + 4].tolist() == [9, 3]
    assert not mask[1, 1:L + 1, L + 1:].any()  # image never sees the caption


def _random_layout(seed, condition):
    """``condition``: ``text``, ``class``, or ``llama`` (text on the LLaMA backbone)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    if condition == "class":
        cfg = ModelConfig(hidden_size=32, depth=1, num_heads=2, patch_size=4, condition="class", num_classes=5, num_cond_tokens=3)
        model = CausalFusion(cfg, latent_channels=3, latent_size=16)
        kw = {}
    else:
        cfg = ModelConfig(hidden_size=32, depth=1, num_heads=2, patch_size=4, max_text_len=6,
                          backbone="llama" if condition == "llama" else "dit")
        model = CausalFusion(cfg, latent_channels=3, latent_size=16, vocab_size=20, special_ids=dict(pad=0, bos=2, eos=3, boi=4, eoi=5))
        kw = dict(text=torch.randint(6, 20, (3, 6)), text_len=torch.tensor([2, 6, 4]), caption_rows=torch.tensor([False, True, False]))
    L = model.num_image_tokens
    split = draw_ar_split(L, 0.9, rng)
    order = torch.stack([torch.randperm(L) for _ in range(3)])
    # the model's default seq_buckets: the clean block is padded up to a bucket edge
    lay = model.layout(order, **split_inputs(split, model.cfg.seq_buckets), loss_weights=ar_loss_weights(split, 2, 1, "linear"), **kw)
    return model, lay, split, kw


def pack_all(lay, length):
    """Pack a layout with the host plan made from its own row sizes (read here: a test)."""
    return lay.pack(*pack_plan((lay.kind != PAD).sum(1).tolist(), length))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("condition", ["text", "class"])
def test_layout_mask_equals_reference_masks(seed, condition):
    """The role/level rule reproduces generate_mask / caption_mask for every row on its real
    slots, and the padding (text pads, the clean block padded to its bucket) is cut off: a pad
    sees only itself and nothing sees a pad."""
    model, lay, split, kw = _random_layout(seed, condition)
    mask = lay.attention_mask()
    for b in range(3):
        real = (lay.kind[b] != PAD).nonzero().flatten()
        pads = (lay.kind[b] == PAD).nonzero().flatten()
        assert not mask[b][real][:, pads].any()
        assert torch.equal(mask[b][pads][:, pads], torch.eye(len(pads), dtype=torch.bool))
        if condition == "class":
            ref = generate_mask(model.cfg.num_cond_tokens, split, cond_causal=False)
            assert torch.equal(mask[b][real][:, real], ref)
            continue
        T, L = 6, model.num_image_tokens
        n_text = int(kw["text_len"][b])
        if kw["caption_rows"][b]:
            ref = caption_mask(L, T)
            keep = torch.tensor(list(range(L + 2 + n_text)))
        else:
            ref = generate_mask(T + 1, split, cond_causal=True)
            keep = torch.tensor(list(range(n_text)) + list(range(T, ref.shape[0])))
        assert torch.equal(mask[b][real][:, real], ref[keep][:, keep])


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("condition", ["text", "class", "llama"])
def test_flex_attention_matches_sdpa(condition, packed):
    """FlexAttention with the block mask built from slot roles gives the numbers of SDPA + dense mask."""
    model, lay, split, kw = _random_layout(3, condition)
    if packed:
        lay = pack_all(lay, 64)
    model.eval()
    B, N = lay.kind.shape
    h = torch.randn(B, N, 32)
    slots = dict(positions=lay.rope_positions(), image_slots=lay.image_slots())
    with torch.no_grad():
        ref = model.run_blocks(h, lay.attention_mask("sdpa"), **slots)
        out = model.run_blocks(h, lay.attention_mask("flex"), **slots)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_flex_falls_back_to_sdpa_where_torch_has_no_flex_attention(monkeypatch):
    from mmtrain.models import causalfusion

    _, lay, _, _ = _random_layout(3, "text")
    assert not isinstance(lay.attention_mask("flex"), torch.Tensor)  # a BlockMask where flex exists
    monkeypatch.setattr(causalfusion, "_flex_ok", None)
    monkeypatch.setitem(__import__("sys").modules, "torch.nn.attention.flex_attention", None)  # import fails
    with pytest.warns(UserWarning, match="using SDPA with a dense mask"):
        mask = lay.attention_mask("flex")
    assert torch.equal(mask, lay.attention_mask("sdpa"))


@pytest.mark.parametrize("condition", ["text", "class", "llama", "llama-frozen_text"])
def test_packing_isolates_samples_and_keeps_the_losses(condition):
    """Packed rows: fewer, no attention across samples, and the very same losses and gradients."""
    from mmtrain.models.causalfusion import sample_sizes, training_inputs
    from mmtrain.models.diffusion import DiffusionConfig, GaussianDiffusion

    torch.manual_seed(0)
    kw = dict(hidden_size=32, depth=2, num_heads=2, patch_size=8, max_text_len=12, caption_prob=0.5)
    B = 6
    g = torch.Generator().manual_seed(0)
    if condition == "class":
        cfg = ModelConfig(**kw, condition="class", num_classes=5, num_cond_tokens=3)
        cond = dict(labels=torch.randint(0, 5, (B,), generator=g))
        make = lambda c: CausalFusion(c, latent_channels=3, latent_size=16)  # noqa: E731
    else:  # llama: the LLaMA backbone, whose rotary positions restart at each packed sample
        llama = dict(backbone="llama", backbone_training=condition.partition("-")[2] or "full") if "llama" in condition else {}
        cfg = ModelConfig(**kw, **llama)
        text = torch.randint(6, 20, (B, 12), generator=g)
        text_len = torch.tensor([3, 12, 5, 2, 8, 4])
        cond = dict(text=text, text_len=text_len)
        make = lambda c: CausalFusion(c, latent_channels=3, latent_size=16, vocab_size=20, special_ids=dict(pad=0, bos=2, eos=3, boi=4, eoi=5))  # noqa: E731
    tokens = torch.randn(B, 4, 192, generator=g)
    packed_cfg = ModelConfig(**{**cfg.__dict__, "pack_length": 48})
    # the packing plan is drawn on the host with the batch; the unpacked model takes the same draws without it
    packed_inputs = training_inputs(make(packed_cfg), tokens, GaussianDiffusion(DiffusionConfig()), torch.Generator().manual_seed(1),
                                    random.Random(1), **cond)
    inputs = {k: v for k, v in packed_inputs.items() if not k.startswith("pack_")}

    results = []
    for model_cfg, batch in ((cfg, inputs), (packed_cfg, packed_inputs)):
        torch.manual_seed(0)
        model = make(model_cfg)
        torch.nn.init.normal_(model.diffusion_head.weight, std=0.05)
        out = model(**batch)
        out["loss"].backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        unpacked = model.layout(batch["order"], batch["ar_step"], batch["clean_slots"], batch["loss_weights"], batch.get("text"),
                                batch.get("text_len"), batch.get("caption_rows"))
        if model_cfg.pack_length:
            # the host's sizes (from the loader's lengths and host draws) are the device layout's
            host = sample_sizes(cfg, 4, int((batch["ar_step"] < batch["ar_step"][-1]).sum()),
                                batch["text_len"].tolist() if "text" in batch else None,
                                batch["caption_rows"].tolist() if "text" in batch else None, B)
            assert host == (unpacked.kind != PAD).sum(1).tolist()
            lay = unpacked.pack(batch["pack_sample"], batch["pack_offset"])
            assert lay.kind.shape[0] < B  # padding removed: fewer rows than samples
            assert lay.kind.shape[0] % 2 == 0  # the row count is bucketed: a multiple of ceil(B / seq_buckets)
            assert sorted(set(lay.sample[lay.sample >= 0].tolist())) == list(range(B))
            mask = lay.attention_mask()
            cross = (lay.sample[:, :, None] != lay.sample[:, None, :]) & (lay.sample[:, :, None] >= 0)
            cross &= ~torch.eye(model_cfg.pack_length, dtype=torch.bool)[None]
            assert not (mask & cross).any()
    (plain, plain_grads), (packed, packed_grads) = results
    for key in ("loss", "diffusion_loss", "text_loss", "text_tokens", "image_tokens"):
        torch.testing.assert_close(packed[key].float(), plain[key].float(), rtol=1e-5, atol=1e-6)
    for name in plain_grads:
        torch.testing.assert_close(packed_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)


def test_pack_length_shorter_than_a_sample_is_an_error():
    model, lay, split, kw = _random_layout(0, "text")
    with pytest.raises(ValueError, match="pack_length"):
        pack_all(lay, 5)
