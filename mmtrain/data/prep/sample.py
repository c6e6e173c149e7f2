"""The output sample and its two encodings: webdataset members and MDS columns.

This is the contract training code reads:

- webdataset: ``KEY.jpg``/``KEY.png`` (encoded image), ``KEY.txt`` (UTF-8 caption),
  ``KEY.json`` (object with ``source``, ``width``, ``height``, ``orig_width``,
  ``orig_height``, optional ``captions``), optional ``KEY.cls`` (decimal label),
  optional ``KEY.latent.npy`` (``.npy`` bytes of a C,h,w float16/float32 array).
- MDS: ``key: str``, ``image: bytes``, ``caption: str``, ``json: json``, plus
  ``cls: int`` when the dataset has labels (-1 for a sample without one) and
  ``latent: ndarray`` when latents were computed.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# -1 marks "no label" in an MDS int column, which has no null.
NO_LABEL = -1


@dataclass
class OutSample:
    """One sample as written.

    Attributes:
        key: Unique key without '.' or '/'.
        image: Encoded image bytes.
        image_ext: ``"jpg"`` or ``"png"`` (the webdataset member extension).
        caption: The caption.
        meta: The ``json`` object.
        label: Class label or None.
        latent: C,h,w latent array or None.
        extras: Further raw webdataset members to carry along (name after the key
            -> bytes); MDS output drops them.
    """

    key: str
    image: bytes
    image_ext: str
    caption: str
    meta: dict[str, Any]
    label: int | None = None
    latent: np.ndarray | None = None
    extras: dict[str, bytes] = field(default_factory=dict)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def to_wds(sample: OutSample) -> dict[str, Any]:
    """The ``TarWriter(encoder=False)`` dict: every value already bytes."""
    encoded: dict[str, Any] = dict(sample.extras)
    encoded.update({
        "__key__": sample.key,
        sample.image_ext: sample.image,
        "txt": sample.caption.encode("utf-8"),
        # sort_keys: identical metadata gives identical bytes, so shards are reproducible.
        "json": json.dumps(sample.meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    })
    if sample.label is not None:
        encoded["cls"] = str(sample.label).encode("ascii")
    if sample.latent is not None:
        encoded["latent.npy"] = npy_bytes(sample.latent)
    return encoded


def mds_columns(has_labels: bool, has_latents: bool = False) -> dict[str, str]:
    """The MDSWriter column spec for a dataset."""
    columns = {"key": "str", "image": "bytes", "caption": "str", "json": "json"}
    if has_labels:
        columns["cls"] = "int"
    if has_latents:
        columns["latent"] = "ndarray"
    return columns


def to_mds(sample: OutSample, columns: dict[str, str]) -> dict[str, Any]:
    """The MDSWriter sample dict for ``columns`` (see :func:`mds_columns`)."""
    row: dict[str, Any] = {"key": sample.key, "image": sample.image, "caption": sample.caption, "json": sample.meta}
    if "cls" in columns:
        row["cls"] = NO_LABEL if sample.label is None else sample.label
    if "latent" in columns:
        if sample.latent is None:
            raise ValueError(f"sample {sample.key!r}: the dataset has a 'latent' column but this sample has no latent")
        row["latent"] = np.ascontiguousarray(sample.latent)
    return row
