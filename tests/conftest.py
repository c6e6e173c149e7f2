"""Shared fixtures: a small synthetic dataset and a real sentencepiece tokenizer, made once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmtrain.data.shards import write_synthetic_shards
from mmtrain.data.synthetic import SyntheticConfig
from mmtrain.tokenize.text import TextTokenizerConfig, train_text_tokenizer

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_SILENT", "true")
# no Slurm answers the tests unless they ask for the one tests/slurm_cluster.py starts (whose clients
# get its SLURM_CONF): a dry run renders only what it is given, whatever cluster this machine is in.
# An empty configuration makes Slurm's clients fail at once (a missing file, a minute of retries).
os.environ["SLURM_CONF"] = "/dev/null"


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_shards(root / "train", 400, SyntheticConfig(seed=0), samples_per_shard=100, progress=False)
    write_synthetic_shards(root / "val", 32, SyntheticConfig(seed=1), samples_per_shard=100, progress=False)
    from mmtrain.data.shards import iter_shard_samples

    captions = [s["caption"] for s in iter_shard_samples(root / "train")]
    tok = train_text_tokenizer(captions, root / "tok" / "text", TextTokenizerConfig(), progress=False)
    return {"root": root, "train": str(root / "train"), "val": str(root / "val"), "tokenizer": str(tok.model_path)}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for servers and rendezvous the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides(data: dict, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train_shards={data['train']}", f"data.val_shards={data['val']}",
            f"tokenizer.text_model={data['tokenizer']}", f"train.run_dir={run_dir}",
            f"data.index_cache={data['root'] / 'index_cache'}", *extra]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node Slurm (tests/slurm_cluster.py), started once for the tests that ask for it.
    Skipped where Slurm is not installed or the tests do not run as root (slurmd must); with
    ``MMTRAIN_REQUIRE_SLURM=1`` (set by .ci/run, after ``make slurm``) that is a failure instead."""
    from slurm_cluster import SlurmCluster, missing_reason

    reason = missing_reason()
    if reason:
        if os.environ.get("MMTRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(f"MMTRAIN_REQUIRE_SLURM=1, but {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


UNINTERRUPTED_STEPS = 30


@pytest.fixture(scope="session")
def uninterrupted_run(synthetic_data, tmp_path_factory) -> Path:
    """configs/tiny.yaml trained on 2 ranks for UNINTERRUPTED_STEPS steps without a stop, a loss per
    step: what every preempted, requeued or resumed run of the same overrides must reproduce."""
    from mmtrain import cli

    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert cli.main(["train", str(REPO / "configs" / "tiny.yaml"), *uninterrupted_overrides(synthetic_data, run_dir)]) == 0
    return run_dir


def uninterrupted_overrides(data: dict, run_dir: Path, *extra: str) -> list[str]:
    return tiny_overrides(data, run_dir, f"train.steps={UNINTERRUPTED_STEPS}", "logging.log_every=1",
                          "checkpoint.every_steps=1000", *extra)
