"""Bad input gives a clear error that names the problem."""
import io
import tarfile

import pytest
from conftest import REPO, tiny_overrides

from mmtrain import cli
from mmtrain.components.data import DataConfig, build_train_loader
from mmtrain.data.shards import ShardDataError


def test_missing_shard_directory_is_named(synthetic_data, tmp_path, capsys):
    missing = tmp_path / "no_such_shards"
    rc = cli.main(["train", str(REPO / "configs" / "tiny.yaml"), *tiny_overrides(synthetic_data, tmp_path / "run"),
                   f"data.train_shards={missing}"])
    assert rc == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing started


def test_unknown_config_key_is_named(synthetic_data, tmp_path, capsys):
    rc = cli.main(["train", str(REPO / "configs" / "tiny.yaml"), *tiny_overrides(synthetic_data, tmp_path / "run"),
                   "model.hiden_size=8"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "model.hiden_size" in err and "tiny.yaml" in err


def test_missing_tokenizer_is_named(synthetic_data, tmp_path, capsys):
    rc = cli.main(["train", str(REPO / "configs" / "tiny.yaml"), *tiny_overrides(synthetic_data, tmp_path / "run"),
                   "tokenizer.text_model=/nowhere/text.model"])
    assert rc == 2 and "/nowhere/text.model" in capsys.readouterr().err


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_corrupt_image_in_training_stream_names_shard_and_key(tmp_path):
    shard = tmp_path / "shards" / "shard-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        _add(tar, "00000042.png", b"\x89PNG this is not an image")
        _add(tar, "00000042.txt", b"a small red circle at the top left")
        _add(tar, "00000042.json", b'{"shapes": []}')
    loader = build_train_loader(DataConfig(train_shards=str(shard.parent), num_workers=0, index_cache=""),
                                micro_batch_size=1, rank=0, world_size=1, seed=0, start_sample=0)
    with pytest.raises(ShardDataError) as err:
        next(iter(loader))
    assert str(shard) in str(err.value) and "00000042" in str(err.value)


def test_not_a_run_dir(tmp_path, capsys):
    assert cli.main(["eval", "generate", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_resuming_with_a_different_tokenizer_is_refused_before_writing(synthetic_data, tmp_path, capsys):
    from mmtrain.tokenize.text import TextTokenizerConfig, train_text_tokenizer

    run_dir = tmp_path / "run"
    kept = run_dir / "tokenizer" / "text"
    train_text_tokenizer(["a red circle", "a blue square at the top"] * 50, kept, TextTokenizerConfig(vocab_size=40), progress=False)
    before = kept.with_suffix(".model").read_bytes()
    rc = cli.main(["train", str(REPO / "configs" / "tiny.yaml"), *tiny_overrides(synthetic_data, run_dir)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "tokenizer mismatch" in err and synthetic_data["tokenizer"] in err
    assert kept.with_suffix(".model").read_bytes() == before  # the run's own copy is untouched
