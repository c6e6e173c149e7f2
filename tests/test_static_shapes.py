"""What a GPU would see, checked on the CPU: the training forward and a sampler step compile
with ``fullgraph=True`` (a graph break is a host read or a data-dependent shape, i.e. a
stream sync per micro-batch on CUDA) into at most ``model.seq_buckets`` graphs over many
random AR splits (a new graph is a recompile, and ranks that recompile at different steps
stall each other); padding to those shapes changes no loss or gradient; the diffusion
forward process runs in float32 under bf16; the LM head sees only the text targets.

Graphs are counted with dynamo's ``CompileCounterWithBackend("aot_eager")``: dynamo and
AOTAutograd trace forward and backward as inductor would, without its code generation.
"""
from __future__ import annotations

import random

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from mmtrain.models.causalfusion import (PAD, ARContext, CausalFusion, ModelConfig, condition_prefix, guidance_scale, guided,
                                         null_condition, split_inputs, training_inputs)
from mmtrain.models.config import TransDiffConfig
from mmtrain.models.diffusion import DiffusionConfig, build_diffusion
from mmtrain.models.transdiff import TransDiff, training_inputs as transdiff_inputs

SPECIAL = dict(pad=0, bos=2, eos=3, boi=4, eoi=5)
MICRO_BATCHES = 20


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def causalfusion(seed: int = 0, **kw) -> CausalFusion:
    """16 image tokens (4 x 4 grid of 4 x 4 x 3 patches), text of 10 slots."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"hidden_size": 32, "depth": 1, "num_heads": 2, "patch_size": 4, "max_text_len": 10, **kw})
    if cfg.condition == "class":
        model = CausalFusion(cfg, latent_channels=3, latent_size=16)
    else:
        model = CausalFusion(cfg, latent_channels=3, latent_size=16, vocab_size=40, special_ids=SPECIAL)
    torch.nn.init.normal_(model.diffusion_head.weight, std=0.05)  # zero at init: give the loss a gradient everywhere
    return model.train()


def micro_batch(model: CausalFusion, seed: int, B: int = 4) -> dict:
    """One random micro-batch as the trainer draws it (the loader's host text, a seeded split)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, model.num_image_tokens, model.token_dim, generator=g)
    if model.cfg.condition == "class":
        cond = {"labels": torch.randint(0, model.cfg.num_classes, (B,), generator=g)}
    else:
        text = torch.randint(6, 40, (B, 10), generator=g)
        text[:, 0] = SPECIAL["bos"]
        cond = {"text": text, "text_len": torch.randint(3, 11, (B,), generator=g)}
    return training_inputs(model, tokens, build_diffusion(DiffusionConfig()), torch.Generator().manual_seed(seed),
                           random.Random(seed), **cond)


def shape_key(batch: dict) -> tuple:
    """What decides a training graph's shapes: the clean block (unpacked) or the packed rows."""
    return (batch["clean_slots"], tuple(batch["pack_sample"].shape) if "pack_sample" in batch else None)


@pytest.mark.parametrize("attention,backward,condition,pack_length", [
    ("sdpa", True, "text", 0),   # what CPU / SDPA training runs: forward and backward
    ("flex", False, "text", 0),  # FlexAttention with its block mask built in the graph (no CPU backward)
    ("sdpa", True, "class", 48),  # packed rows: the row count is what is bucketed
    # the LLaMA backbone, packed (rotary positions restart per sample, computed on the device), its
    # image weights picked per slot (frozen_text); flex == sdpa on it is tests/test_masks.py's
    ("sdpa", True, "llama-frozen_text", 48),
])
def test_training_forward_compiles_fullgraph_to_one_graph_per_bucket(attention, backward, condition, pack_length):
    llama = dict(backbone="llama", backbone_training=condition.partition("-")[2] or "full") if "llama" in condition else {}
    model = causalfusion(attention=attention, condition="class" if condition == "class" else "text", num_classes=5,
                         num_cond_tokens=3, pack_length=pack_length, **llama)
    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(lambda **batch: model(**batch)["loss"], backend=counter, fullgraph=True, dynamic=False)
    shapes = set()
    for seed in range(MICRO_BATCHES):
        batch = micro_batch(model, seed)
        shapes.add(shape_key(batch))
        with torch.set_grad_enabled(backward):
            loss = forward(**batch)
        if backward:
            loss.backward()
        assert torch.isfinite(loss)
    # 20 random AR splits come in at most seq_buckets shapes, and each shape is one graph
    assert len(shapes) <= model.cfg.seq_buckets
    assert counter.frame_count == len(shapes) <= model.cfg.seq_buckets, (counter.frame_count, shapes)
    if not pack_length:
        assert len(shapes) > 1  # the splits did vary: the bound was exercised


def test_compiled_blocks_take_a_new_flex_block_mask_per_micro_batch_without_recompiling():
    """``train.compile`` compiles block by block; each micro-batch hands them a fresh BlockMask
    (a new mask function over new tensors): that must not be a new graph."""
    model = causalfusion(attention="flex")
    counter = CompileCounterWithBackend("aot_eager")
    for block in model.transformer_blocks():
        block.compile(backend=counter, fullgraph=True, dynamic=False)
    shapes = set()
    with torch.no_grad():
        for seed in range(MICRO_BATCHES):
            batch = micro_batch(model, seed)
            shapes.add(shape_key(batch))
            assert torch.isfinite(model(**batch)["loss"])
    assert counter.frame_count == len(shapes) <= model.cfg.seq_buckets


def test_transdiff_training_forward_compiles_fullgraph_to_one_graph():
    """MRAR chains differ per micro-batch (same-prompt rows); every row decodes every chain image
    and the missing ones are masked out of the loss, so the shapes never change."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, depth=1, num_heads=4, patch_size=2, condition="text", max_text_len=8, family="transdiff",
                      transdiff=TransDiffConfig(decoder_depth=1, num_queries=4, mrar_refs=2))
    model = TransDiff(cfg, latent_channels=3, latent_size=8, vocab_size=20, special_ids={**SPECIAL, "bos": 1, "eos": 2}).train()
    flow = build_diffusion(DiffusionConfig(process="rectified_flow"))
    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(lambda **batch: model(**batch)["loss"], backend=counter, fullgraph=True, dynamic=False)
    chain_lengths = set()
    for seed in range(MICRO_BATCHES):
        g = torch.Generator().manual_seed(seed)
        prompts = torch.randint(5, 20, (3, 8), generator=g)
        which = torch.randint(0, 3, (6,), generator=g)
        batch = transdiff_inputs(model, torch.randn(6, 16, 12, generator=g), flow, torch.Generator().manual_seed(seed),
                                 random.Random(seed), text=prompts[which], text_len=torch.tensor([4, 6, 8])[which])
        chain_lengths.add(tuple(batch["num_images"].tolist()))
        forward(**batch).backward()
    assert len(chain_lengths) > 1
    assert counter.frame_count == 1


@pytest.mark.parametrize("cfg_schedule", ["interval", "linear"])
def test_one_sampler_step_with_the_kv_cache_compiles_fullgraph_once(cfg_schedule):
    """The model call of a diffusion step (KV cache of the condition and a finished AR step,
    [cond; uncond] CFG batch, the interval schedule decided on the device from t): one graph
    for every diffusion step of an AR step, equal to the eager call."""
    model = causalfusion().eval()
    B = 2
    text, text_len = torch.randint(6, 40, (B, 10)), torch.tensor([5, 9])
    dup = lambda x: torch.cat([x, x])  # noqa: E731
    with torch.no_grad():
        h, role = condition_prefix(model, text=text, text_len=text_len)
        h_null, role_null = condition_prefix(model, **null_condition(model, text=text, text_len=text_len))
        ctx = ARContext(model, torch.cat([h, h_null]), torch.cat([role, role_null]), use_cache=True)
        done = torch.stack([torch.randperm(16)[:4] for _ in range(B)])
        ctx.add_clean(dup(model.image_embed(torch.randn(B, 4, 48), done)))
        pos = torch.stack([torch.randperm(16)[4:8] for _ in range(B)])

        def step(x, t):
            pred = ctx.predict(model.image_embed(dup(x), dup(pos), dup(t)))
            return guided(pred, guidance_scale(3.0, cfg_schedule, 0.5, t, (200.0, 800.0)))

        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=False)
        for i in range(10):  # the diffusion steps of one AR step: t walks 900 -> 0
            x, t = torch.randn(B, 4, 48), torch.full((B,), 900.0 - 100 * i)
            torch.testing.assert_close(compiled(x, t), step(x, t), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_interval_guidance_is_decided_per_row_on_the_device():
    out = torch.randn(4, 3, 5)  # [cond (2); uncond (2)]
    cond, uncond = out.chunk(2)
    t = torch.tensor([100.0, 500.0])
    mixed = guided(out, guidance_scale(4.0, "interval", 0.5, t, (200.0, 800.0)))
    assert torch.equal(mixed[0], cond[0])  # outside the interval: the conditional prediction, exactly
    torch.testing.assert_close(mixed[1], uncond[1] + 4.0 * (cond[1] - uncond[1]))
    assert guidance_scale(4.0, "interval", 0.5, 100.0, (200.0, 800.0)) == 1.0  # host floats still work


@pytest.mark.parametrize("condition", ["text", "class"])
def test_padding_to_the_bucket_keeps_losses_and_gradients(condition):
    """The same micro-batches laid out at their exact length (seq_buckets 0) and padded to the
    bucket (seq_buckets 4): losses and gradients equal to 1e-6."""
    for seed in range(4):
        results = []
        for buckets in (0, 4):
            model = causalfusion(condition=condition, num_classes=5, num_cond_tokens=3, seq_buckets=buckets)
            batch = micro_batch(model, seed)
            out = model(**batch)
            out["loss"].backward()
            results.append((batch["clean_slots"], out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        (exact_slots, exact, exact_grads), (padded_slots, padded, padded_grads) = results
        cond_slots = 3 if condition == "class" else 10 + 1  # class tokens, or text + <boi>
        assert padded_slots >= exact_slots and padded["sequence_length"] == cond_slots + padded_slots + 16
        for key in ("loss", "diffusion_loss", "text_loss", "text_tokens", "image_tokens", "sequence_tokens"):
            torch.testing.assert_close(padded[key].float(), exact[key].float(), rtol=0, atol=1e-6)
        assert exact_grads.keys() == padded_grads.keys()
        for name, grad in exact_grads.items():
            torch.testing.assert_close(padded_grads[name], grad, rtol=0, atol=1e-6, msg=name)


def test_every_split_fits_a_bucket_and_the_buckets_are_few():
    from mmtrain.models.causalfusion import clean_slot_count

    for L in (16, 64, 256, 250):
        for buckets in (1, 4, 8):
            lengths = {clean_slot_count(n, L, buckets) for n in range(L)}
            assert len(lengths) <= buckets and all(c >= 1 for c in lengths)
            assert all(clean_slot_count(n, L, buckets) >= n for n in range(L))
        assert {clean_slot_count(n, L, 0) for n in range(L)} == set(range(L))


def test_bf16_noisy_tokens_are_the_float32_formula_rounded_once():
    """bf16 clean tokens in, the model in bf16: what the first layer sees is q_sample computed
    in float32 (coefficients from the float64 table) and rounded to bf16 once, not a formula
    evaluated in bf16 (with a bf16-rounded t)."""
    for process in ("ddpm", "rectified_flow"):
        model = causalfusion(condition="class", num_classes=5, num_cond_tokens=3).to(torch.bfloat16)
        diffusion = build_diffusion(DiffusionConfig(process=process))
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(4, 16, 48, generator=g).to(torch.bfloat16)  # what the VAE gives under bf16 autocast
        batch = training_inputs(model, x0, diffusion, torch.Generator().manual_seed(3), random.Random(3),
                                labels=torch.arange(4))
        # the same draws again (t, then noise, on the generator), to rebuild the formula by hand
        gen = torch.Generator().manual_seed(3)
        t = diffusion.sample_train_t(4, gen)
        noise = torch.randn(x0.shape, generator=gen)
        x = x0.double()
        if process == "ddpm":
            acp = diffusion.train_acp[t]
            want = acp.sqrt().float().double()[:, None, None] * x + (1 - acp).sqrt().float().double()[:, None, None] * noise.double()
            target = noise
        else:
            tt = t.double()[:, None, None]
            want = (1 - tt) * x + tt * noise.double()
            target = noise.double() - x
        assert batch["noisy_tokens"].dtype == torch.float32 and batch["target"].dtype == torch.float32
        torch.testing.assert_close(batch["noisy_tokens"].double(), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(batch["target"].double(), target.double(), rtol=0, atol=1e-6)
        seen = []
        hook = model.x_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        with torch.no_grad():
            model(**batch)
        hook.remove()
        lay_noisy = seen[0][:, 3 + batch["clean_slots"]:]  # class tokens, clean block, then the noisy tokens in AR order
        expect = torch.gather(want.float(), 1, batch["order"][..., None].expand(-1, -1, 48)).to(torch.bfloat16)
        assert seen[0].dtype == torch.bfloat16
        assert torch.equal(lay_noisy, expect)  # rounded once, from the float32 value


def test_the_lm_head_sees_only_the_text_targets():
    """The LM head runs on B (T - 1) gathered slots, not on every slot of the sequence, and the
    text loss equals cross-entropy over every slot's logits (the old way) to 1e-6."""
    model = causalfusion()
    batch = micro_batch(model, 1)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    out = model(**batch)
    hook.remove()
    B, T = batch["text"].shape
    assert seen == [torch.Size([B * (T - 1), 32])]
    # the reference: every slot through the LM head
    lay = model.layout(batch["order"], batch["ar_step"], batch["clean_slots"], batch["loss_weights"], batch["text"],
                       batch["text_len"], batch["caption_rows"])
    with torch.no_grad():
        h = model.run_blocks(model.embed(lay, batch["latents_tokens"], batch["noisy_tokens"], batch["t"]), lay.attention_mask())
        logits = model.lm_head(h).float()
        ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), lay.target, ignore_index=-100, reduction="sum")
        ref = ref / (lay.target != -100).sum()
    assert int(out["text_tokens"]) == int((lay.target != -100).sum()) > 0
    assert int((lay.kind != PAD).sum()) > B * (T - 1)  # the sequences are longer than the gathered slots
    torch.testing.assert_close(out["text_loss"], ref, rtol=0, atol=1e-6)


def test_split_inputs_give_the_step_of_every_order_position():
    out = split_inputs([2, 3, 1], buckets=0)
    assert out["ar_step"].tolist() == [1, 1, 2, 2, 2, 3] and out["clean_slots"] == 5
    assert split_inputs([2, 3, 1], buckets=2)["clean_slots"] == 6
    assert split_inputs([6], buckets=2)["clean_slots"] == 3  # S = 1: no clean token, the smallest bucket
