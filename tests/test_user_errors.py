"""A new user's slips (issue 33, items 2 and 7): no default for where the data is or where a run goes,
data.val_shards checked before any rank starts, a cut prompt or caption said once with its lengths,
a missing bucket found before anything is staged, the parent of a prep output answered with its train/.
Each fails (or warns) in-process or in a CLI call that stops before any training."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, tiny_overrides
from mmtrain import cli
from mmtrain.config import ConfigError, load_config, require_run_paths

TINY = str(REPO / "configs" / "tiny.yaml")


# --------------------------------------------------------------------------- no default data / run_dir


@pytest.mark.parametrize("command", [["train"], ["train", "--preflight-only"], ["launch", "--dry-run"]])
def test_a_run_config_without_data_or_run_dir_names_the_keys_and_writes_nothing(command, synthetic_data, tmp_path,
                                                                                monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = cli.main([command[0], TINY, *command[1:], f"tokenizer.text_model={synthetic_data['tokenizer']}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "tiny.yaml: not set: data.train_shards (or data.sources)" in err[0] and "train.run_dir" in err[0]
    assert not (tmp_path / "runs").exists() and os.listdir(tmp_path) == []
    # data given, run_dir not: only run_dir is named
    rc = cli.main([command[0], TINY, *command[1:], f"data.train_shards={synthetic_data['train']}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "train.run_dir" in err[0] and "data.train_shards" not in err[0], err


def test_loading_a_config_needs_no_paths_but_training_does(synthetic_data, tmp_path):
    cfg = load_config(TINY)  # eval, export and the tests load configs for other purposes
    assert cfg.data.train_shards == "" and cfg.data.val_shards == "" and cfg.train.run_dir == ""
    with pytest.raises(ConfigError, match=r"^x\.yaml: not set: data\.train_shards .*; train\.run_dir"):
        require_run_paths(cfg, "x.yaml")
    with pytest.raises(ConfigError, match="data.train_shards: not set"):
        cfg.data.train_sources()
    require_run_paths(load_config(TINY, [f"data.sources=[{{path: {synthetic_data['train']}}}]", f"train.run_dir={tmp_path}"]),
                      "x.yaml")  # sources count as data


def test_the_command_line_says_it_in_one_line_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmtrain.cli", "train", str(REPO / "configs" / "demo.yaml"),
                           "tokenizer.text_model=tok.model"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and lines[-1].startswith("mmtrain train: error: ") and "demo.yaml" in lines[-1]
    assert "data.train_shards" in lines[-1] and "train.run_dir" in lines[-1]
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- data.val_shards in the preflight


def test_a_missing_val_shards_fails_the_preflight(synthetic_data, tmp_path, capsys):
    from mmtrain.launch.preflight import preflight

    missing = tmp_path / "nowhere" / "val"
    with pytest.raises(FileNotFoundError, match=rf"data\.val_shards={missing}: .*does not exist"):
        preflight(TINY, tiny_overrides(synthetic_data, tmp_path / "run", f"data.val_shards={missing}"))
    rc = cli.main(["train", TINY, "--preflight-only", *tiny_overrides(synthetic_data, tmp_path / "run",
                                                                      f"data.val_shards={missing}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "data.val_shards=" in err[0], err
    assert not (tmp_path / "run").exists()
    preflight(TINY, tiny_overrides(synthetic_data, tmp_path / "run", "data.val_shards="))  # unset: not checked


# --------------------------------------------------------------------------- the parent of a prep output


def test_the_parent_of_a_prep_output_suggests_its_train_folder(synthetic_data, tmp_path, capsys):
    from mmtrain.data.shards import list_shards
    from mmtrain.data.sources import open_source

    photos = tmp_path / "photos"  # what `prep folder --out photos` writes
    for split in ("train", "val"):
        (photos / split).mkdir(parents=True)
        shutil.copy(sorted(Path(synthetic_data["train"]).glob("*.tar"))[0], photos / split)
    for call in (lambda: open_source(str(photos)), lambda: list_shards(photos)):
        with pytest.raises(FileNotFoundError, match=rf"use {photos}/train for data\.train_shards and {photos}/val "
                                                    r"for data\.val_shards"):
            call()
    rc = cli.main(["train", TINY, "--preflight-only", *tiny_overrides(synthetic_data, tmp_path / "run",
                                                                      f"data.train_shards={photos}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"use {photos}/train" in err[0], err
    # two `prep synthetic` outputs side by side (each writes its shards into its --out): name them
    for name in ("shapes", "more"):
        (tmp_path / "synthetic" / name).mkdir(parents=True)
        shutil.copy(sorted(Path(synthetic_data["train"]).glob("*.tar"))[0], tmp_path / "synthetic" / name)
    with pytest.raises(FileNotFoundError, match=rf"its subfolders hold shards: point at one of them "
                                                rf"\({tmp_path}/synthetic/more, {tmp_path}/synthetic/shapes\)"):
        open_source(str(tmp_path / "synthetic"))


# --------------------------------------------------------------------------- cut prompts and captions


def test_encode_batch_reports_what_it_cuts(synthetic_data):
    from mmtrain.tokenize.text import TextTokenizer

    tok = TextTokenizer.from_file(synthetic_data["tokenizer"])
    long = "a large red circle and a small blue square " * 3
    cut: list = []
    ids, lengths = tok.encode_batch(["red", long], 8, cut=cut)
    assert [row for row, _ in cut] == [1] and cut[0][1] == len(tok.encode(long)) > 8 and lengths.tolist()[1] == 8


def test_a_cut_prompt_is_said_once_with_its_lengths(synthetic_data, caplog):
    from mmtrain.inference import _condition_batch
    from mmtrain.tokenize.text import TextTokenizer

    tok = TextTokenizer.from_file(synthetic_data["tokenizer"])
    run = SimpleNamespace(cfg=load_config(TINY, ["model.max_text_len=8"]), text_tok=tok, device="cpu",
                          prompts_cut_reported=False)
    long = "a large red circle and a small blue square " * 3
    with caplog.at_level(logging.WARNING, logger="mmtrain.inference"):
        _condition_batch(run, ["red", "blue"])
        assert not caplog.records
        _condition_batch(run, ["red", long, long])
        _condition_batch(run, [long])
    [record] = caplog.records
    assert f"is {len(tok.encode(long))} tokens; model.max_text_len=8 keeps the first 8 (1 of 2 prompt(s)" in record.getMessage()


def test_the_loader_says_once_how_many_captions_it_cut(synthetic_data, caplog):
    from mmtrain.components.data import DataConfig, build_train_loader
    from mmtrain.tokenize.text import TextTokenizer

    tok = TextTokenizer.from_file(synthetic_data["tokenizer"])
    cfg = DataConfig(train_shards=synthetic_data["train"], num_workers=0, index_cache="")
    with caplog.at_level(logging.WARNING, logger="mmtrain.data"):
        loader = build_train_loader(cfg, 8, 0, world_size=1, seed=0, start_sample=0, text_tokenizer=tok, max_text_len=5)
        for _, _batch in zip(range(3), loader):
            pass
    cut = [r.getMessage() for r in caplog.records if "max_text_len" in r.getMessage()]
    assert len(cut) == 1 and "model.max_text_len=5 keeps the first 5" in cut[0] and "of the first 8 captions" in cut[0], cut
