from pathlib import Path

import pytest
import yaml

from mmtrain.config import Config, ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert isinstance(cfg, Config)
    assert cfg.model.hidden_size % cfg.model.num_heads == 0


def test_overrides_are_typed_and_nested():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.depth=5", "optim.lr=3e-4", "train.run_dir=/x/y",
                                                       "logging.wandb=false", "optim.betas=[0.8,0.9]"])
    assert cfg.model.depth == 5 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.run_dir == "/x/y" and cfg.logging.wandb is False
    assert tuple(cfg.optim.betas) == (0.8, 0.9)


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hiden_size: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "bad.yaml" in str(err.value) and "model.hiden_size" in str(err.value)


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        load_config(REPO / "configs" / "tiny.yaml", ["train.stepz=3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"model\.depth.*integer"):
        load_config(None, ["model.depth=deep"])


def test_invalid_value_names_field():
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load_config(None, ["train.precision=fp8"])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml", ["model.depth=3"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["depth"] == 3


@pytest.mark.parametrize("override,key", [("sample.cfg_schedule=cosine", r"sample\.cfg_schedule"),
                                          ("model.condition=image", r"model\.condition"),
                                          ("model.attention=xformers", r"model\.attention"),
                                          ("diffusion.process=edm", r"diffusion\.process")])
def test_model_and_sampling_choices_are_validated(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(REPO / "configs" / "tiny.yaml", [override])


def test_stop_at_ends_a_launch_early_but_not_beyond_the_run():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.steps=20", "train.stop_at=10"])
    assert (cfg.train.steps, cfg.train.last_step) == (20, 10)
    assert load_config(REPO / "configs" / "tiny.yaml", ["train.steps=20"]).train.last_step == 20
    with pytest.raises(ConfigError, match=r"train\.stop_at.*up to train\.steps \(20\).*got 21"):
        load_config(REPO / "configs" / "tiny.yaml", ["train.steps=20", "train.stop_at=21"])


def test_one_byte_size_rule_for_every_option():
    """mmtrain.units.parse_bytes: K/M/G/T[B] are powers of 1000, KiB/MiB/GiB/TiB of 1024, for
    data.cache_limit and prep --shard-size alike; errors name the option."""
    import argparse

    from mmtrain.data.prep.cli import parse_shard_size
    from mmtrain.units import parse_bytes

    for text, expected in (("0", 0), ("123456", 123456), ("500MB", 500 * 10**6), ("500 mb", 500 * 10**6), ("500M", 500 * 10**6),
                           ("500MiB", 500 * 2**20), ("16KiB", 16384), ("16K", 16000), ("1.5GB", 1_500_000_000),
                           ("2TiB", 2 * 2**40), ("7B", 7)):
        assert parse_bytes(text, "x") == expected, text
        assert parse_shard_size(text) == expected, text
    assert parse_bytes(4096, "x") == 4096
    for bad in ("lots", "-5MB", "5 XB", "", "MB"):
        with pytest.raises(ValueError, match=r"data\.cache_limit: expected a byte count"):
            parse_bytes(bad, "data.cache_limit")
        with pytest.raises(argparse.ArgumentTypeError, match="expected a byte count"):
            parse_shard_size(bad)
    with pytest.raises(ValueError, match=r"tiny\.yaml: data: cache_limit: expected auto .*a byte count"):
        load_config(REPO / "configs" / "tiny.yaml", ["data.cache_limit=12 parsecs"])
    assert load_config(REPO / "configs" / "tiny.yaml", ["data.cache_limit=2GiB"]).data.cache_limit_bytes == 2 * 2**30
