"""Training-engine pieces on one process: the DeepSpeed config, optimizer groups, LR schedules, sharded EMA."""
import math

import pytest
import torch

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

    plain = load_config(None, ["train.zero_stage=1", "train.precision=fp32"])
    ds = deepspeed_config(plain.optim, plain.train, 64, load_universal=True)
    assert ds["zero_optimization"] == {"stage": 1} and ds["bf16"] == {"enabled": False}
    assert ds["checkpoint"] == {"load_universal": True}
    opt_only = load_config(None, ["train.zero_stage=2", "train.offload=optimizer"])
    assert "offload_param" not in deepspeed_config(opt_only.optim, opt_only.train, 64)["zero_optimization"]


@pytest.mark.parametrize("overrides, message", [
    (["train.offload=gpu"], "train.offload"),
    (["train.offload=optimizer", "train.zero_stage=0"], "zero_stage >= 1"),
    (["train.offload=all", "train.zero_stage=2"], "zero_stage=3"),
    (["train.compile=maybe"], "train.compile"),
    (["ema.decay=1.0"], "ema.decay"),
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


def test_train_config_defaults_are_valid():
    t = TrainConfig()
    assert t.offload == "none" and t.compile is False and t.zero_stage == 3
