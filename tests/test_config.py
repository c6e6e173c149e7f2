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
    with pytest.raises(ValueError, match=r"tiny\.yaml: data\.cache_limit: expected auto .*a byte count"):
        load_config(REPO / "configs" / "tiny.yaml", ["data.cache_limit=12 parsecs"])
    assert load_config(REPO / "configs" / "tiny.yaml", ["data.cache_limit=2GiB"]).data.cache_limit_bytes == 2 * 2**30


def test_retired_keys_of_old_run_configs_load_with_a_warning(tmp_path, caplog):
    """A config.yaml written by an older version (synthetic section, data.shuffle_buffer) still loads,
    each retired key dropped with one warning line naming the file; a misspelt key is still an error."""
    from mmtrain.config import RETIRED_KEYS

    tree = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    tree["synthetic"] = {"image_size": 32, "seed": 0, "min_shapes": 1, "max_shapes": 2}
    tree.setdefault("data", {})["shuffle_buffer"] = 500
    old = tmp_path / "run" / "config.yaml"
    old.parent.mkdir()
    old.write_text(yaml.safe_dump(tree))
    with caplog.at_level("WARNING", logger="mmtrain.config"):
        cfg = load_config(old)
    assert cfg == load_config(REPO / "configs" / "tiny.yaml")
    warnings = [r.getMessage() for r in caplog.records if r.name == "mmtrain.config"]
    assert len(warnings) == 2 and all("config.yaml: ignoring retired key" in w and "\n" not in w for w in warnings)
    assert set(RETIRED_KEYS) == {"synthetic", "data.shuffle_buffer"}
    assert all(sum(f"retired key {key!r}" in w for w in warnings) == 1 for key in RETIRED_KEYS)
    assert not hasattr(cfg, "synthetic") and not hasattr(cfg.data, "shuffle_buffer")
    tree["data"]["shuffle_bufer"] = 500
    old.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"config\.yaml: unknown key 'data\.shuffle_bufer'"):
        load_config(old)
    with pytest.raises(ConfigError, match=r"unknown key 'synthetics'"):
        load_config(None, ["synthetics.seed=1"])


@pytest.mark.parametrize("override,message", [
    ("data.mode=shuffled", r"c\.yaml: data\.mode: expected one of"),
    ("data.sources=[{path: x, weight: -1}]", r"c\.yaml: data\.sources\[0\]\.weight: expected a number >= 0"),
    ("data.sources=[{path: x, wieght: 1}]", r"c\.yaml: unknown key 'data\.sources\[0\]\.wieght'"),
    ("tokenizer.text.vocab_size=3", r"c\.yaml: tokenizer\.text\.vocab_size: expected an int > 6"),
    ("launch.time=tomorrow", r"c\.yaml: launch\.time: expected HH:MM"),
    ("optim.schedule=step", r"c\.yaml: optim\.schedule: expected 'constant' or 'cosine'"),
    ("checkpoint.keep_last=0", r"c\.yaml: checkpoint\.every_steps and checkpoint\.keep_last must be >= 1"),
    ("ema.decay=1.5", r"c\.yaml: ema\.decay: expected 0 <= decay < 1"),
    ("logging.wandb_mode=cloud", r"c\.yaml: logging\.wandb_mode: expected offline/online/disabled"),
    ("sample.cfg_interval=[5, 1]", r"c\.yaml: sample\.cfg_interval: expected \[low, high\]"),
    ("model.transdiff.dropout=2", r"c\.yaml: model\.transdiff\.dropout: expected a probability"),
    ("eval.ar_steps=[0]", r"c\.yaml: eval\.ar_steps: every AR step count must be >= 1"),
])
def test_every_section_error_is_a_config_error_naming_file_and_dotted_key(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text((REPO / "configs" / "tiny.yaml").read_text())
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


def test_config_sections_raise_config_error_when_built_in_code():
    """The sections' own validation raises the one ConfigError (a ValueError), not a bare ValueError."""
    from mmtrain.components.checkpoint import CheckpointConfig
    from mmtrain.components.data import DataConfig, SourceConfig
    from mmtrain.components.ema import EMAConfig
    from mmtrain.components.metrics import LoggingConfig
    from mmtrain.components.optimizer import OptimizerConfig
    from mmtrain.config import SampleConfig, TrainConfig
    from mmtrain.errors import ConfigError as BaseConfigError
    from mmtrain.launch.config import LaunchConfig
    from mmtrain.tokenize.text import TextTokenizerConfig

    assert ConfigError is BaseConfigError and issubclass(ConfigError, ValueError)
    for build, message in ((lambda: DataConfig(mode="x"), "mode: expected one of"),
                           (lambda: DataConfig(sources=[{"path": "a"}, {"path": "b", "format": "parquet"}]),
                            r"sources\[1\]\.format: expected one of"),
                           (lambda: DataConfig(sources=[{"path": "a", "wieght": 2}]), r"unknown key 'sources\[0\]\.wieght'"),
                           (lambda: SourceConfig(path=""), "path: required"),
                           (lambda: CheckpointConfig(keep_last=0), "checkpoint.keep_last"),
                           (lambda: EMAConfig(decay=2.0), "ema.decay"),
                           (lambda: LoggingConfig(wandb_mode="cloud"), "logging.wandb_mode"),
                           (lambda: OptimizerConfig(schedule="step"), "optim.schedule"),
                           (lambda: TrainConfig(precision="fp8"), "train.precision"),
                           (lambda: SampleConfig(cfg_schedule="cosine"), "sample.cfg_schedule"),
                           (lambda: LaunchConfig(time="tomorrow"), "launch.time"),
                           (lambda: TextTokenizerConfig(vocab_size=3), "TextTokenizerConfig.vocab_size"),
                           (lambda: Config(sample=SampleConfig(flow_sampler="euler_maruyama")), "needs diffusion.process")):
        with pytest.raises(ConfigError, match=message):
            build()


def test_option_values_and_set_items_override_one_section():
    """The one way the commands turn options and --set items into a validated section."""
    from mmtrain.schema import option_overrides, override_section

    assert option_overrides("launch", {"time": "12:00", "nodes": 2, "qos": None, "exclusive": True}) == [
        'launch.time="12:00"', "launch.nodes=2", "launch.exclusive=true"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", option_overrides("launch", {"time": "12:00"}))
    assert cfg.launch.time == "12:00" and cfg.launch.timeout_min == 720  # not YAML's base-60 integer 720 as a string
    sample = override_section(cfg.sample, "sample", ["ar_steps=8", "sample.cfg_scale=2", "cfg_interval=[1, 5]"])
    assert (sample.ar_steps, sample.cfg_scale, sample.cfg_interval) == (8, 2.0, (1.0, 5.0)) and cfg.sample.ar_steps != 8
    ev = override_section(cfg.eval, "eval", ["eval.batch_size=3", *option_overrides("eval", {"cfg_scales": [1.0, 3.0], "shards": "s3://b/x"})])
    assert (ev.batch_size, ev.cfg_scales, ev.shards) == (3, [1.0, 3.0], "s3://b/x")
    with pytest.raises(ConfigError, match=r"sample\.ar_steps: expected an integer"):
        override_section(cfg.sample, "sample", ["ar_steps=many"])
    with pytest.raises(ConfigError, match=r"unknown key 'sample\.ar_stepz'"):
        override_section(cfg.sample, "sample", ["ar_stepz=1"])
    with pytest.raises(ConfigError, match=r"eval\.num_samples and eval\.batch_size must be >= 1"):
        override_section(cfg.eval, "eval", option_overrides("eval", {"num_samples": 0}))
