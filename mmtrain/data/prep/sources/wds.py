"""Webdataset source: existing tar shards (img2dataset output or our own) to re-shard.

Only tar headers are read while listing; each member is located by (tar, offset,
size) and read by the workers with a seek, so listing a terabyte of shards reads
kilobytes. Members are grouped into samples by the one tar reader's rule
(:mod:`mmtrain.data.tar`: consecutive members sharing a key). Kept: the image (``jpg``/``jpeg``/``png``/``webp``),
``txt``, ``json`` (merged into the new metadata) and ``cls``; other members are
dropped, since after a resize they may no longer match the image.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from mmtrain.data.images import IMAGE_EXTENSIONS
from mmtrain.data.prep.candidate import ByteRef, Candidate, Drop, KeyAllocator, Source
from mmtrain.data.shards import ShardDataError, list_shards
from mmtrain.data.tar import iter_tar_samples


def _scan(tar: str, drops: list[Drop]) -> dict[str, dict[str, ByteRef]]:
    """``{sample prefix: {extension: (tar, offset, size)}}`` in member order (:mod:`mmtrain.data.tar`'s rule)."""
    samples: dict[str, dict[str, ByteRef]] = {}
    try:
        for sample in iter_tar_samples(tar):
            samples[sample.key] = {ext: (tar, off, size) for ext, (off, size) in sample.members.items()}
    except ShardDataError as exc:
        drops.append(Drop("corrupt_shard", tar, f"{exc} (kept the {len(samples)} samples before it)"))
    return samples


def list_wds(shards: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> Source:
    """List the samples of webdataset shards.

    Args:
        shards: A directory of ``.tar`` files, a ``.tar`` path, a brace pattern
            (``dir/shard-{000000..000009}.tar``), or a list of those.

    Keys are the input keys, sanitized and made unique across shards in listing
    order. A sample without an image member is dropped as ``missing_image``, one
    without ``txt`` as ``missing_caption``; an unreadable tar counts once as
    ``corrupt_shard`` and its members before the damage are kept.

    Raises:
        FileNotFoundError: from ``list_shards`` when a shard source does not exist.
    """
    sources = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    if not sources:
        raise ValueError("wds source: no input shards given")
    paths: list[str] = []
    for src in sources:
        paths.extend(list_shards(src))
    keys = KeyAllocator()
    candidates: list[Candidate] = []
    drops: list[Drop] = []
    has_labels = False
    for tar in paths:
        for prefix, members in _scan(tar, drops).items():
            where = f"{tar}#{prefix}"
            image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
            if image_ext is None:
                drops.append(Drop("missing_image", where, f"no image member ({'/'.join(IMAGE_EXTENSIONS)}); members: {sorted(members)}"))
                continue
            if "txt" not in members:
                drops.append(Drop("missing_caption", where, f"no txt member; members: {sorted(members)}"))
                continue
            has_labels = has_labels or "cls" in members
            candidates.append(Candidate(
                key=keys.allocate(prefix),
                source=where,
                group=prefix,
                image=members[image_ext],
                caption_ref=members["txt"],
                label_ref=members.get("cls"),
                meta_ref=members.get("json"),
            ))
    return Source(kind="wds", spec={}, candidates=candidates, drops=drops, has_labels=has_labels)
