"""Read prepared datasets back: webdataset shards or an MDS directory, shard by shard.

Used by the latent precompute and by tests; it reads raw members/columns and
decodes nothing but the JSON metadata, so it is cheap and exact.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mmtrain.data.images import IMAGE_EXTENSIONS
from mmtrain.data.prep.sample import NO_LABEL, OutSample
from mmtrain.data.shards import ShardDataError, list_shards
from mmtrain.data.tar import read_tar_samples

MDS_INDEX = "index.json"


def dataset_format(source: str | os.PathLike[str]) -> str:
    """``"mds"`` for a directory holding ``index.json``, else ``"wds"``."""
    return "mds" if (Path(source) / MDS_INDEX).is_file() else "wds"


def wds_to_sample(key: str, members: dict[str, bytes], where: str) -> OutSample:
    """An OutSample from raw members; extra members go to ``extras``."""
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if image_ext is None:
        raise ShardDataError(f"{where}, sample {key}: no image member ({'/'.join(IMAGE_EXTENSIONS)}); members: {sorted(members)}")
    try:
        caption = members.get("txt", b"").decode("utf-8")
        meta = json.loads(members["json"].decode("utf-8")) if "json" in members else {}
        label = int(members["cls"].decode()) if "cls" in members else None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ShardDataError(f"{where}, sample {key}: cannot decode txt/json/cls: {exc}") from exc
    latent = np.load(io.BytesIO(members["latent.npy"]), allow_pickle=False) if "latent.npy" in members else None
    known = {image_ext, "txt", "json", "cls", "latent.npy"}
    return OutSample(key=key, image=members[image_ext], image_ext="png" if image_ext == "png" else "jpg",
                     caption=caption, meta=meta if isinstance(meta, dict) else {"json": meta},
                     label=label, latent=latent, extras={k: v for k, v in members.items() if k not in known})


def mds_shards(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The shard entries of ``directory/index.json``, in order."""
    path = Path(directory) / MDS_INDEX
    try:
        index = json.loads(path.read_text())
        return list(index["shards"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ShardDataError(f"MDS index {path}: cannot read the shard list: {exc}") from exc


def iter_mds_shard(directory: str | os.PathLike[str], entry: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Decoded column dicts of one MDS shard (via streaming's own reader)."""
    from streaming.base.format import reader_from_json  # slow import; MDS users only

    reader = reader_from_json(str(directory), None, entry)
    for i in range(entry["samples"]):
        yield reader.get_item(i)


def _image_ext(data: bytes) -> str:
    return "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg"


def mds_to_sample(row: dict[str, Any]) -> OutSample:
    label = row.get("cls")
    return OutSample(key=row["key"], image=row["image"], image_ext=_image_ext(row["image"]), caption=row["caption"],
                     meta=row["json"], label=None if label is None or label == NO_LABEL else int(label),
                     latent=row.get("latent"))


def iter_dataset(source: str | os.PathLike[str]) -> Iterator[tuple[str, list[OutSample]]]:
    """Yield ``(shard name, samples)`` for a webdataset source or an MDS directory.

    ``source``: an MDS directory (has ``index.json``), or anything
    ``list_shards`` accepts (directory of ``.tar``, one ``.tar``, brace pattern).
    """
    if dataset_format(source) == "mds":
        for entry in mds_shards(source):
            yield entry["raw_data"]["basename"], [mds_to_sample(r) for r in iter_mds_shard(source, entry)]
        return
    for path in list_shards(source):
        yield os.path.basename(path), [wds_to_sample(k, m, f"shard {path}") for k, m in read_tar_samples(path)]
