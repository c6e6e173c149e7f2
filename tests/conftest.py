"""Shared fixtures: a small synthetic dataset and a real sentencepiece tokenizer, made once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmtrain.data.synthetic import write_synthetic_shards
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
    from mmtrain.data.sources import iter_samples

    captions = [s["caption"] for s in iter_samples(root / "train", want_image=False)]
    tok = train_text_tokenizer(captions, root / "tok" / "text", TextTokenizerConfig(), progress=False)
    return {"root": root, "train": str(root / "train"), "val": str(root / "val"), "tokenizer": str(tok.model_path)}


@pytest.fixture(scope="session")
def val_images(synthetic_data):
    """The val shards' images in order, uint8 (32, 32, 32, 3): the eval commands' reference images."""
    import numpy as np

    from mmtrain.data.sources import iter_samples

    return np.stack([np.asarray(s["image"]) for s in iter_samples(synthetic_data["val"])])


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


def train_side_by_side(*argvs: list[str]) -> list[int]:
    """``cli.main(argv)`` for each of ``argvs`` (training runs that read nothing the others write), all at
    once; their exit codes, in order. On 2 cores one run's single-threaded phases (preflight, torchrun's
    start, the ranks' imports, DeepSpeed's set-up) leave a core idle that the other run uses: two tiny
    runs side by side take ~20% less wall time than one after the other, and train exactly the same."""
    from concurrent.futures import ThreadPoolExecutor

    from mmtrain import cli

    with ThreadPoolExecutor(len(argvs)) as pool:
        return list(pool.map(cli.main, argvs))


@pytest.fixture(scope="session")
def s3_server():
    """One S3-compatible server (moto, credentials checked) for the whole session: moto keeps its
    authentication switch per process, so a second in-process server started after the first turned
    it on would refuse its own bootstrap keys. Tests write under prefixes of their own."""
    from storage_servers import start_s3

    server = start_s3()
    yield server
    server.stop()


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


def assert_same_training(run_dir: Path, reference: Path, rtol: float = 1e-5) -> None:
    """``run_dir`` (stopped, killed or preempted, then resumed) trained as ``reference`` did: every
    logged step once, with the same samples (data hashes, counts) and losses, and its last
    checkpoint holds the same weights and the same EMA (which no loss shows)."""
    import json

    import numpy as np
    import torch

    from mmtrain.components.checkpoint import latest_tag, load_model_state
    from mmtrain.components.ema import consolidate

    def metrics(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    a, b = metrics(run_dir), metrics(reference)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [(r["data_hash"], r["samples_seen"]) for r in a] == [(r["data_hash"], r["samples_seen"]) for r in b]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=rtol)
    tag = latest_tag(reference)
    assert latest_tag(run_dir) == tag
    weights, ema = load_model_state(run_dir, tag)[0], consolidate(run_dir / "checkpoints" / tag)
    ref_weights, ref_ema = load_model_state(reference, tag)[0], consolidate(reference / "checkpoints" / tag)
    assert weights.keys() == ref_weights.keys() and ema.keys() == ref_ema.keys()
    for k in ref_weights:
        torch.testing.assert_close(weights[k], ref_weights[k], rtol=rtol, atol=1e-7, msg=lambda m: f"weights {k}: {m}")
        torch.testing.assert_close(ema[k], ref_ema[k], rtol=rtol, atol=1e-7, msg=lambda m: f"EMA {k}: {m}")


def uninterrupted_overrides(data: dict, run_dir: Path, *extra: str) -> list[str]:
    return tiny_overrides(data, run_dir, f"train.steps={UNINTERRUPTED_STEPS}", "logging.log_every=1",
                          "checkpoint.every_steps=1000", *extra)
