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
