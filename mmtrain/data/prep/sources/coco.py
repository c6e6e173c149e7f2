"""COCO-captions source: ``images`` (id, file_name) + ``annotations`` (image_id, caption).

One sample per image by default: ``txt`` is its first caption (annotation file
order) and ``json["captions"]`` holds all of them. With ``all_captions`` every
caption becomes its own sample (key ``{image_id}_{n}``); those samples share a
group, so they land in the same split and are not duplicates of each other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mmtrain.data.prep.candidate import Candidate, Drop, KeyAllocator, Source


def list_coco(
    annotations: str | os.PathLike[str],
    images_dir: str | os.PathLike[str] | None = None,
    all_captions: bool = False,
) -> Source:
    """List a COCO captions annotation file.

    Args:
        annotations: The JSON file (e.g. ``captions_train2017.json``).
        images_dir: Folder that ``file_name`` is relative to. Default None: the
            annotation file's folder.
        all_captions: One sample per caption instead of per image, default False.

    Image entries without ``id``/``file_name`` and annotations without a known
    ``image_id`` or a text ``caption`` are dropped as ``bad_row`` (counted per
    entry); images with no caption as ``missing_caption``.

    Raises:
        FileNotFoundError: the annotation file or ``images_dir`` is missing.
        ValueError: the file is not JSON with ``images`` and ``annotations`` lists.
    """
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {str(path)!r} does not exist")
    root = Path(images_dir) if images_dir is not None else path.resolve().parent
    if not root.is_dir():
        raise FileNotFoundError(f"COCO images folder {str(root)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"COCO annotation file {str(path)!r}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"COCO annotation file {str(path)!r}: expected an object with 'images' and 'annotations' lists")  # noqa: TRY004 -- CLI maps ValueError to exit 2

    drops: list[Drop] = []
    images: dict[Any, dict[str, Any]] = {}
    for i, entry in enumerate(data["images"]):
        where = f"{path.name} images[{i}]"
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            drops.append(Drop("bad_row", where, "expected an object with 'id' and a text 'file_name'"))
        elif entry["id"] in images:
            drops.append(Drop("bad_row", where, f"image id {entry['id']!r} repeats an earlier entry"))
        else:
            images[entry["id"]] = {"file_name": entry["file_name"], "captions": []}
    for j, ann in enumerate(data["annotations"]):
        where = f"{path.name} annotations[{j}]"
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            drops.append(Drop("bad_row", where, "expected an object with 'image_id' and a text 'caption'"))
        elif ann["image_id"] not in images:
            drops.append(Drop("bad_row", where, f"image_id {ann['image_id']!r} is not in 'images'"))
        elif not ann["caption"].strip():
            drops.append(Drop("empty_caption", where, f"empty caption for image_id {ann['image_id']!r}"))
        else:
            images[ann["image_id"]]["captions"].append(ann["caption"].strip())

    keys = KeyAllocator()
    candidates: list[Candidate] = []
    for image_id, entry in images.items():
        name, captions = entry["file_name"], entry["captions"]
        if not captions:
            drops.append(Drop("missing_caption", f"{path.name} image {image_id!r} ({name})", "no annotation has a caption for it"))
            continue
        meta = {"image_id": image_id, "file_name": name, "captions": captions}
        chosen = enumerate(captions) if all_captions else [(0, captions[0])]
        for n, caption in chosen:
            key = keys.allocate(f"{image_id}_{n}" if all_captions else str(image_id))
            candidates.append(Candidate(
                key=key, source=name, group=name, image=str(root / name), caption=caption,
                meta={**meta, "caption_index": n} if all_captions else meta,
            ))
    return Source(kind="coco", spec={"all_captions": all_captions}, candidates=candidates, drops=drops)
