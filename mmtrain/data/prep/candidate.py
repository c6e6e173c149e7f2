"""What a source listing produces: candidates (one future sample each) and early drops.

Listing is cheap and single-process (paths, rows, tar headers); everything that
touches image bytes happens later in the workers. A candidate is plain picklable
data so it can travel to a worker process and be fingerprinted for resuming.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

# A file path, or (tar path, data offset, size) of a member inside an uncompressed tar.
ByteRef = str | tuple[str, int, int]

# Member names stay below tar's 100-byte name field ("KEY.latent.npy"), so no
# PAX/GNU long-name headers appear and shard sizes can be computed exactly.
MAX_KEY_CHARS = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Candidate:
    """One input sample before it is read.

    Attributes:
        key: Output sample key: unique within the run, only ``[A-Za-z0-9_-]``.
        source: Human-readable origin (path, ``file:row``, ``tar#key``), stored as
            ``json["source"]`` and used in log lines.
        group: Identity of the source image. Samples of one group share a split and
            never count as duplicates of each other (COCO ``all_captions``, manifests
            listing one image with several captions).
        image: Where the image bytes are.
        caption: The caption when the listing already knows it, else None.
        caption_ref: Where to read the caption from when ``caption`` is None.
        label: Class label, or None.
        label_ref: Where to read a decimal label from (webdataset ``.cls``), or None.
        meta: Extra JSON metadata merged into the output ``json`` (our fields win).
        meta_ref: A JSON object to merge first (webdataset ``.json``), or None.
    """

    key: str
    source: str
    group: str
    image: ByteRef
    caption: str | None = None
    caption_ref: ByteRef | None = None
    label: int | None = None
    label_ref: ByteRef | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    meta_ref: ByteRef | None = None

    def identity(self) -> dict[str, Any]:
        """Everything that defines this candidate's output, for fingerprints."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Drop:
    """A candidate rejected while listing (before any worker saw it)."""

    reason: str
    where: str
    detail: str


def sanitize_key(text: str) -> str:
    """Map any identifier to ``[A-Za-z0-9_-]``, short enough for a tar member name.

    WebDataset splits member names at the first '.', and '/' would create
    directories, so both must go; long names keep a hash suffix to stay distinct.
    """
    key = _UNSAFE.sub("_", text).strip("_") or "sample"
    if len(key) > MAX_KEY_CHARS - 20:
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=6).hexdigest()
        key = f"{key[: MAX_KEY_CHARS - 34]}_{digest}"
    return key


class KeyAllocator:
    """Hands out unique sanitized keys in listing order.

    A collision (``a/b.jpg`` and ``a_b.png`` both sanitize to ``a_b``) gets ``-1``,
    ``-2``, ... in listing order, which is sorted/file order, so keys are the same
    on every run over the same input.
    """

    def __init__(self) -> None:
        self._used: set[str] = set()

    def allocate(self, text: str) -> str:
        key = sanitize_key(text)
        if key in self._used:
            n = 1
            while f"{key}-{n}" in self._used:
                n += 1
            key = f"{key}-{n}"
        self._used.add(key)
        return key


def group_hash(group: str) -> str:
    """Short stable digest of a candidate's group, stored next to pixel hashes."""
    return hashlib.blake2b(group.encode("utf-8"), digest_size=8).hexdigest()


@dataclass
class Source:
    """A listed input dataset, ready for :func:`mmtrain.data.prep.pipeline.run_prep`.

    Attributes:
        kind: ``"folder"``, ``"manifest"``, ``"coco"`` or ``"wds"``.
        spec: Source options that shape the output (column names, all_captions...),
            part of the options fingerprint. Input paths are not: they are covered
            by the per-chunk candidate fingerprints.
        candidates: The samples to process, in a deterministic order.
        drops: Candidates rejected while listing.
        has_labels: Whether samples carry class labels (adds the MDS ``cls`` column).
    """

    kind: str
    spec: dict[str, Any]
    candidates: list[Candidate]
    drops: list[Drop] = field(default_factory=list)
    has_labels: bool = False
