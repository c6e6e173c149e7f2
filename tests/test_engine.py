"""Training-engine pieces on one process: the DeepSpeed config, optimizer groups, LR schedules, sharded EMA."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, free_port

from mmtrain.components.ema import EMAConfig, ShardedEMA, consolidate, shard_bounds
from mmtrain.components.optimizer import OptimizerConfig, deepspeed_config, lr_multiplier, param_groups
from mmtrain.config import ConfigError, TrainConfig, load_config


def test_deepspeed_config_follows_the_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  grad_clip: 0.5\ntrain:\n  zero_stage: 3\n  precision: bf16\n  offload: all\n"
                    "  micro_batch_size: 4\n  grad_accum: 8\n")
    cfg = load_config(path)
    ds = deepspeed_config(cfg.optim, cfg.train, hidden_size=64)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 8
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["checkpoint"] == {"load_universal": False}
    # bf16 weights, fp32 gradient accumulation and reduction by default
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"

    plain = load_config(None, ["train.zero_stage=1", "train.precision=fp32"])
    ds = deepspeed_config(plain.optim, plain.train, 64, load_universal=True)
    assert ds["zero_optimization"] == {"stage": 1} and ds["bf16"] == {"enabled": False}
    assert ds["checkpoint"] == {"load_universal": True}
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    low = load_config(None, ["train.precision=bf16", "train.grad_accum_dtype=bf16", "train.communication_dtype=bf16"])
    ds = deepspeed_config(low.optim, low.train, 64)
    assert ds["data_types"] == {"grad_accum_dtype": "bf16"} and ds["communication_data_type"] == "bf16"
    # ZeRO-0: DeepSpeed refuses bf16 weights with fp32 accumulation, so none is asked for
    zero0 = load_config(None, ["train.zero_stage=0", "train.precision=bf16"])
    ds = deepspeed_config(zero0.optim, zero0.train, 64)
    assert "data_types" not in ds and ds["communication_data_type"] == "fp32"
    opt_only = load_config(None, ["train.zero_stage=2", "train.offload=optimizer"])
    assert "offload_param" not in deepspeed_config(opt_only.optim, opt_only.train, 64)["zero_optimization"]


@pytest.mark.parametrize("overrides, message", [
    (["train.offload=gpu"], "train.offload"),
    (["train.offload=optimizer", "train.zero_stage=0"], "zero_stage >= 1"),
    (["train.offload=all", "train.zero_stage=2"], "zero_stage=3"),
    (["train.compile=maybe"], "train.compile"),
    (["ema.decay=1.0"], "ema.decay"),
    (["train.grad_accum_dtype=fp16"], "train.grad_accum_dtype: expected 'fp32' or 'bf16'"),
    (["train.communication_dtype=bf16"], r"train.communication_dtype=bf16 needs train.precision=bf16"),
    (["train.grad_accum_dtype=bf16", "train.precision=fp32"], r"train.grad_accum_dtype=bf16 needs train.precision=bf16"),
    (["train.convert_timeout_s=0"], "train.convert_timeout_s"),
])
def test_bad_engine_settings_are_refused_by_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_no_weight_decay_on_norms_biases_embeddings():
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 4), "lin": torch.nn.Linear(4, 4), "norm": torch.nn.LayerNorm(4)})
    model.text_pos = torch.nn.Parameter(torch.zeros(3, 4))
    decay, no_decay = param_groups(model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]  # only the Linear matrix
    assert len(no_decay["params"]) == 5  # embedding, bias, norm weight + bias, text_pos
    (one,) = param_groups(model, weight_decay=0.0, grouping="one")  # the official code's single group
    assert len(one["params"]) == 6 and one["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="optim.param_groups: 'one' .* needs optim.weight_decay: 0"):
        OptimizerConfig(weight_decay=0.05, param_groups="one")


def test_lr_schedules():
    warm = OptimizerConfig(lr=1.0, warmup_steps=10, schedule="constant")
    assert [lr_multiplier(warm, s, 100) for s in (0, 4, 9, 10, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    official = OptimizerConfig(lr=1.0, warmup_steps=10, warmup_start="zero")  # transformers' constant-with-warm-up
    assert [lr_multiplier(official, s, 100) for s in (0, 4, 9, 10, 99)] == [0.0, 0.4, 0.9, 1.0, 1.0]
    cos = OptimizerConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(cos, 10, 110) == pytest.approx(1.0)
    assert lr_multiplier(cos, 60, 110) == pytest.approx(0.55)  # half way: the middle of [0.1, 1]
    assert lr_multiplier(cos, 110, 110) == pytest.approx(0.1)
    assert lr_multiplier(cos, 500, 110) == pytest.approx(0.1)  # stays at the floor


def test_shard_bounds_cover_every_element_once():
    for numel in (1, 7, 8, 9, 100):
        for world in (1, 2, 3, 8):
            covered = []
            for r in range(world):
                start, stop, size = shard_bounds(numel, r, world)
                assert stop - start <= size == math.ceil(numel / world)
                covered += range(start, stop)
            assert covered == list(range(numel))


def _toy_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))


def test_sharded_ema_equals_a_full_ema_and_reshards_across_world_sizes(tmp_path):
    """Three 'ranks' each keep a third of the EMA; put together they are the plain EMA."""
    model = _toy_model(0)
    cfg = EMAConfig(decay=0.8)
    shards = [ShardedEMA(model, cfg, r, 3) for r in range(3)]
    reference = {k: v.detach().clone() for k, v in model.named_parameters()}
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        for ema in shards:
            ema.update(step)
        for k, v in model.named_parameters():
            reference[k] = 0.8 * reference[k] + 0.2 * v.detach()
    for ema in shards:
        ema.save(tmp_path / "ckpt")
    full = consolidate(tmp_path / "ckpt")
    assert set(full) == set(reference)
    for k in reference:
        torch.testing.assert_close(full[k], reference[k], rtol=1e-6, atol=1e-6)

    # resume on 2 ranks: each re-slices the 3-rank shards and the consolidated EMA is unchanged
    resumed = [ShardedEMA(_toy_model(1), cfg, r, 2) for r in range(2)]
    for ema in resumed:
        ema.load(tmp_path / "ckpt")
        ema.save(tmp_path / "ckpt2")
    again = consolidate(tmp_path / "ckpt2")
    for k in reference:
        torch.testing.assert_close(again[k], full[k], rtol=0, atol=0)


def test_ema_resume_on_the_same_world_size_reads_only_the_rank_s_own_shard(tmp_path):
    """Each rank loads its own file (the others' may be elsewhere, e.g. on their nodes); a
    different slicing at the same world size, or another world size, goes through consolidate."""
    model, cfg = _toy_model(0), EMAConfig(decay=0.8)
    saved = [ShardedEMA(model, cfg, r, 3) for r in range(3)]
    for ema in saved:
        ema.save(tmp_path / "ckpt")
    for r in range(3):
        alone = tmp_path / f"only{r}"
        (alone / "ema").mkdir(parents=True)
        (tmp_path / "ckpt" / "ema" / f"rank{r:05d}.safetensors").rename(alone / "ema" / f"rank{r:05d}.safetensors")
        resumed = ShardedEMA(_toy_model(1), cfg, r, 3)  # other initial weights: the load must replace them
        resumed.load(alone)
        for name, shard in resumed.shards.items():
            torch.testing.assert_close(shard, saved[r].shards[name], rtol=0, atol=0)
        with pytest.raises(FileNotFoundError, match="1 EMA shard files, but the run had 3 ranks"):
            ShardedEMA(model, cfg, min(r, 1), 2).load(alone)  # another world size re-slices: it needs every shard
        (alone / "ema" / f"rank{r:05d}.safetensors").rename(tmp_path / "ckpt" / "ema" / f"rank{r:05d}.safetensors")

    # same world size, other slice boundaries (as ZeRO-1/2 fragments after a regrouping): re-sliced
    full = consolidate(tmp_path / "ckpt")
    for r, ema in enumerate(ShardedEMA(model, cfg, r, 2) for r in range(2)):
        ema.starts = {name: 0 if r == 0 else 2 for name in ema.starts}
        ema.shards = {name: full[name].view(-1)[:2].clone() if r == 0 else full[name].view(-1)[2:].clone()
                      for name in ema.shards}
        ema.save(tmp_path / "odd")
    for r in range(2):
        resumed = ShardedEMA(_toy_model(1), cfg, r, 2)
        resumed.load(tmp_path / "odd")
        for name, shard in resumed.shards.items():
            start, stop, _ = shard_bounds(full[name].numel(), r, 2)
            torch.testing.assert_close(shard, full[name].view(-1)[start:stop], rtol=0, atol=0)


def test_ema_update_follows_weights_changed_in_place_after_a_load(tmp_path):
    """The sources are resolved at the first update, after a checkpoint load, and stay views of
    the weights the optimizer updates in place."""
    model, cfg = _toy_model(0), EMAConfig(decay=0.5)
    ema = ShardedEMA(model, cfg, 1, 2)
    ShardedEMA(_toy_model(2), cfg, 1, 2).save(tmp_path)
    ema.load(tmp_path)
    expected = {k: v.clone() for k, v in ema.shards.items()}
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5).add_(0.25)
        ema.update(step)
        for name, p in model.named_parameters():
            start, stop, _ = shard_bounds(p.numel(), 1, 2)
            expected[name] = 0.5 * expected[name] + 0.5 * p.detach().view(-1)[start:stop]
    for name in expected:
        torch.testing.assert_close(ema.shards[name], expected[name], rtol=1e-6, atol=1e-7)


def test_ema_warmup_decay():
    ema = ShardedEMA(_toy_model(0), EMAConfig(decay=0.999, warmup=True), 0, 1)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(90) == pytest.approx(0.91)
    assert ema.decay_at(10**6) == 0.999


def test_missing_ema_shard_is_named(tmp_path):
    model = _toy_model(0)
    for r in range(2):
        ShardedEMA(model, EMAConfig(), r, 2).save(tmp_path)
    (tmp_path / "ema" / "rank00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="1 EMA shard files, but the run had 2 ranks"):
        consolidate(tmp_path)


def test_a_failed_universal_conversion_raises_on_rank_0_and_bounds_the_wait_of_the_others(tmp_path):
    """Rank 0's conversion fails: it raises with the way out (the launcher then ends the job) and
    leaves no universal directory; another rank stops waiting after train.convert_timeout_s."""
    from mmtrain.components.checkpoint import checkpoint_root, make_universal, plan_resume

    root = checkpoint_root(tmp_path)
    (root / "step00000004").mkdir(parents=True)
    meta = root / "step00000004" / "meta.json"
    meta.write_text(json.dumps({"step": 4, "world_size": 2, "zero_stage": 3}))
    # its manifest vouches for it (so the resume plan takes it), but it holds no DeepSpeed file to convert
    (root / "step00000004" / "manifest.json").write_text(json.dumps({"files": {"meta.json": meta.stat().st_size}}))
    (root / "latest").write_text("step00000004")
    point = plan_resume(tmp_path, world_size=4, zero_stage=3)
    assert point.universal and point.load_tag == "universal-step00000004" and point.world_size == 4
    with pytest.raises(RuntimeError, match=r"(?s)universal checkpoint failed \(exit \d+\); resume on 2 ranks instead.*ds_to_universal"):
        make_universal(tmp_path, point, rank=0, timeout_s=1)  # no DeepSpeed files in it
    assert not (root / "universal-step00000004").exists()
    with pytest.raises(TimeoutError, match=r"rank 0 to convert .*step00000004 .*train.convert_timeout_s=0.5"):
        make_universal(tmp_path, point, rank=1, timeout_s=0.5)


def test_train_config_defaults_are_valid():
    t = TrainConfig()
    assert t.offload == "none" and t.compile is False and t.zero_stage == 3


GRADIENT_DTYPES = """
import json, os, random, sys
import torch
import deepspeed
from mmtrain import distributed
from mmtrain.components.optimizer import build_optimizer, deepspeed_config
from mmtrain.config import load_config
from mmtrain.models import Condition, build_model, family
from mmtrain.models.diffusion import build_diffusion
from mmtrain.tokenize.build import build_image_tokenizer
from mmtrain.tokenize.image import patchify

def holds_finer_than_bf16(tensors):
    # a sum of two bf16 micro-batch gradients that bf16 cannot hold survives only in fp32
    return sum(int((t.float() != t.float().bfloat16().float()).sum()) for t in tensors)

def accumulation_buffers(engine, stage):
    opt = engine.optimizer
    if stage == 3:
        return [opt.grad_partitions_flat_buffer]
    if stage == 2:
        return [g for group in opt.averaged_gradients.values() for g in group]
    if stage == 1 and hasattr(opt, "fp32_groups_gradients_flat"):
        return opt.fp32_groups_gradients_flat  # DeepSpeed's BF16_Optimizer
    return [p.grad for p in engine.module.parameters() if p.grad is not None]

distributed.init(60, with_deepspeed=True)
report = {}
for name, overrides in json.loads(sys.argv[2]).items():
    stage = int(name[-1])
    cfg = load_config(sys.argv[1], ["model.condition=class", "train.precision=bf16", "train.micro_batch_size=2",
                                    "train.grad_accum=2", f"train.zero_stage={stage}", *overrides])
    torch.manual_seed(0)
    image_tok = build_image_tokenizer(cfg.tokenizer.image)
    model = build_model(cfg.model, cfg.data.image_size, None, image_tok)
    opt, sched = build_optimizer(model, cfg.optim, 10)
    ds = deepspeed_config(cfg.optim, cfg.train, cfg.model.hidden_size)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    diffusion, gen, rng = build_diffusion(cfg.diffusion), torch.Generator(), random.Random(0)
    for micro in range(2):
        gen.manual_seed(micro)
        tokens = patchify(torch.randn(2, 3, 32, 32, generator=gen), cfg.model.patch_size).bfloat16()
        engine.backward(engine(**family(model).training_inputs(model, tokens, Condition(labels=torch.tensor([1, 2])), diffusion, gen,
                                                                 rng))["loss"])
    buffers = accumulation_buffers(engine, stage)  # after the last micro-batch, before the step
    report[name] = {"optimizer": type(engine.optimizer).__name__,
                    "communication": str(engine.communication_data_type),
                    "optimizer_communication": str(getattr(engine.optimizer, "communication_data_type", None)),
                    "buffer_dtypes": sorted({str(b.dtype) for b in buffers}),
                    "finer_than_bf16": holds_finer_than_bf16(buffers)}
    if stage == 3:
        report[name]["bucket_dtypes"] = sorted(str(b.buffer.dtype) for b in engine.optimizer.ipg_buckets.values())
    engine.step()
try:  # what the config leaves out at ZeRO-0: DeepSpeed refuses fp32 accumulation of bf16 weights there
    cfg = load_config(sys.argv[1], ["model.condition=class", "train.precision=bf16", "train.zero_stage=0"])
    model = build_model(cfg.model, cfg.data.image_size, None, build_image_tokenizer(cfg.tokenizer.image))
    opt, sched = build_optimizer(model, cfg.optim, 10)
    deepspeed.initialize(model=model, optimizer=opt, config={**deepspeed_config(cfg.optim, cfg.train, 64),
                                                             "data_types": {"grad_accum_dtype": "fp32"}})
    report["zero0_fp32_accumulation"] = "accepted"
except NotImplementedError as exc:
    report["zero0_fp32_accumulation"] = str(exc)
print("REPORT " + json.dumps(report))
"""


def test_bf16_engines_accumulate_and_reduce_gradients_in_fp32(tmp_path):
    """Real bf16 DeepSpeed engines (one gloo rank, the tiny model) built from deepspeed_config:
    after two micro-batches the accumulated gradients are fp32 and hold sums bf16 cannot, and
    the reduction runs in fp32, at ZeRO-1, 2 and 3; with both knobs at bf16 ZeRO-3 keeps bf16."""
    runs = {"zero3": [], "zero2": [], "zero1": [], "zero0": [],
            "bf16_zero3": ["train.grad_accum_dtype=bf16", "train.communication_dtype=bf16"]}
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", GRADIENT_DTYPES, str(REPO / "configs" / "tiny.yaml"), json.dumps(runs)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    fp32 = "torch.float32"
    for stage in ("zero3", "zero2", "zero1"):
        r = report[stage]
        assert r["buffer_dtypes"] == [fp32] and r["finer_than_bf16"] > 0, (stage, r)
        assert r["communication"] == fp32, (stage, r)
    assert report["zero3"]["optimizer_communication"] == report["zero2"]["optimizer_communication"] == fp32
    assert report["zero3"]["bucket_dtypes"] == [fp32]  # what is reduce-scattered
    assert report["zero1"]["optimizer"] == "BF16_Optimizer"  # DeepSpeed's ZeRO-1 path for fp32 accumulation
    # ZeRO-0: bf16 gradients (DeepSpeed cannot do otherwise), all-reduced in fp32
    assert report["zero0"]["buffer_dtypes"] == ["torch.bfloat16"] and report["zero0"]["communication"] == fp32
    assert "unsupported mix" in report["zero0_fp32_accumulation"]
    low = report["bf16_zero3"]
    assert low["buffer_dtypes"] == ["torch.bfloat16"] and low["finer_than_bf16"] == 0
    assert low["bucket_dtypes"] == ["torch.bfloat16"] and low["communication"] == "torch.bfloat16"
