"""MMC4 source: JSON lines, one web document per line.

Per document (allenai/mmc4's layout): ``text_list``, the document's sentences; ``image_info``,
a list of ``{"image_name", "raw_url", "matched_text_index", "matched_sim", ...}``; ``url``.
An image is read from ``IMAGES_DIR/image_name`` (``images_dir``; the name must be a plain
file name) or fetched from ``raw_url`` (``fetch``).

Placement: each image goes right before the sentence it is matched to
(``matched_text_index``), several images before one sentence in ``image_info`` order;
consecutive sentences are merged into one text segment, joined by a space.

Filters, per image, counted in stats.json:

- ``image_below_min_sim``: ``matched_sim`` (CLIP ViT-L/14 image-sentence similarity) below
  ``min_sim``. Default :data:`DEFAULT_MIN_SIM` 0.24: the MMC4 repository recommends no
  threshold; 0.24 is the one OpenFlamingo, by MMC4's authors, trains on MMC4 with
  (``--mmc4_textsim_threshold 0.24``). 0 keeps every image.
- ``image_over_max_images``: beyond ``max_images`` images per document (``prep mmc4
  --max-images-per-doc``; those with the highest ``matched_sim`` are kept, ties by
  ``image_info`` order). Default :data:`DEFAULT_MAX_IMAGES` 6, OpenFlamingo's
  ``--mmc4_max_num_images``; 0 = no cap. (``--max-images``, the sequence budget of every
  document prep, splits a document instead of leaving images out.)

An image whose file is not under ``images_dir`` is left out as ``image_missing_file``, one
whose URL is dead as ``image_unfetchable`` (:mod:`mmtrain.data.prep.fetch`).

A line that is not a JSON object, lacks ``text_list`` (a list of strings) or has an
``image_info`` entry without a valid ``matched_text_index`` (an int indexing ``text_list``),
a numeric ``matched_sim`` or the name / URL the image is read from is dropped as
``document_bad_row``, with an example naming the file, the line (1-based) and what was wrong.
Blank lines are skipped. A ``.zip`` holding one JSON-lines file (MMC4's downloads,
``docs_no_face_shard_N_v2.jsonl.zip``) is read as that file. Only a missing file raises.

Keys: ``STEM-LINE`` (the file's name without ``.jsonl``, the line number, 8 digits), sanitized.
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

from mmtrain.data.documents import DocumentStats
from mmtrain.data.prep.candidate import KeyAllocator
from mmtrain.data.prep.fetch import ImageRef
from mmtrain.data.prep.web_documents import RawDocument, drop_document, drop_filtered_image

DEFAULT_MIN_SIM = 0.24
DEFAULT_MAX_IMAGES = 6
DOCUMENT_KEYS: tuple[str, ...] = ("url", "could_have_url_duplicate")  # top-level keys stored in the document's meta
IMAGE_KEYS: tuple[str, ...] = ("image_name", "raw_url", "matched_text_index", "matched_sim")  # stored with each image


class _BadLine(ValueError):
    pass


def parse_line(doc: Any, where: str, *, images_dir: str | None, min_sim: float, max_images: int,
               stats: DocumentStats, key: str) -> tuple[list[str | ImageRef], dict[str, Any]]:
    """``(items, document metadata)`` of one parsed line; raises _BadLine naming what was wrong."""
    if not isinstance(doc, dict):
        raise _BadLine(f"expected a JSON object, got {type(doc).__name__}")
    sentences = doc.get("text_list")
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise _BadLine("text_list: expected a list of strings")
    infos = doc.get("image_info") or []
    if not isinstance(infos, list):
        raise _BadLine(f"image_info: expected a list, got {type(infos).__name__}")
    images: list[tuple[float, int, int, ImageRef]] = []  # (sim, order, sentence, ref)
    for i, info in enumerate(infos):
        at = f"image_info[{i}]"
        if not isinstance(info, dict):
            raise _BadLine(f"{at}: expected an object, got {type(info).__name__}")
        index, sim = info.get("matched_text_index"), info.get("matched_sim")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(sentences):
            raise _BadLine(f"{at}: matched_text_index {index!r} is not an index of text_list "
                           f"({len(sentences)} sentences)")
        if isinstance(sim, bool) or not isinstance(sim, (int, float)) or not math.isfinite(sim):
            raise _BadLine(f"{at}: matched_sim {sim!r} is not a number")
        if images_dir is not None:
            name = info.get("image_name")
            if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
                raise _BadLine(f"{at}: image_name {name!r} is not a plain file name")
            source = os.path.join(images_dir, name)
        else:
            source = info.get("raw_url")
            if not isinstance(source, str) or not source.startswith(("http://", "https://")):
                raise _BadLine(f"{at}: raw_url {source!r} is not an http(s) URL")
        meta = {k: info[k] for k in IMAGE_KEYS if k in info}
        images.append((float(sim), i, index, ImageRef(source, f"{where} {at}", meta)))
    kept = []
    for sim, i, index, ref in images:
        if sim < min_sim:
            drop_filtered_image(stats, "image_below_min_sim", f"{where} (key {key!r}) image_info[{i}]: matched_sim {sim:.4f} < "
                                             f"--min-sim {min_sim}")
        else:
            kept.append((sim, i, index, ref))
    if max_images and len(kept) > max_images:
        ranked = sorted(kept, key=lambda t: (-t[0], t[1]))
        for sim, i, _, _ in ranked[max_images:]:
            drop_filtered_image(stats, "image_over_max_images", f"{where} (key {key!r}) image_info[{i}]: matched_sim {sim:.4f}, "
                                               f"not among the {max_images} highest (--max-images-per-doc)")
        kept = sorted(ranked[:max_images], key=lambda t: t[1])
    before: dict[int, list[ImageRef]] = {}
    for _, _, index, ref in kept:
        before.setdefault(index, []).append(ref)
    items: list[str | ImageRef] = []
    text: list[str] = []
    for j, sentence in enumerate(sentences):
        if j in before:
            if text:
                items.append(" ".join(text))
                text = []
            items.extend(before[j])
        if sentence.strip():
            text.append(sentence.strip())
    if text:
        items.append(" ".join(text))
    return items, {**{k: doc[k] for k in DOCUMENT_KEYS if k in doc}, "source": where}


def iter_mmc4(paths: Sequence[str | os.PathLike[str]], stats: DocumentStats, *, images_dir: str | None = None,
              fetch: bool = False, min_sim: float = DEFAULT_MIN_SIM, max_images: int = DEFAULT_MAX_IMAGES,
              keys: KeyAllocator | None = None) -> Iterator[RawDocument]:
    """The documents of the JSON-lines files ``paths``, in order; exactly one of ``images_dir`` and ``fetch``
    says where images come from (module docstring). Malformed lines are counted in ``stats``. The arguments and
    the files are checked before the first document is read, so a mistake fails before any output."""
    if (images_dir is None) == (not fetch):
        raise ValueError("prep mmc4: give exactly one of --images DIR (images by image_name) and --fetch (by raw_url)")
    if images_dir is not None and not os.path.isdir(images_dir):
        raise FileNotFoundError(f"--images {images_dir}: no such directory")
    if not math.isfinite(min_sim):
        raise ValueError(f"--min-sim: expected a number, got {min_sim}")
    if max_images < 0:
        raise ValueError(f"--max-images-per-doc: expected an int >= 0 (0 = no cap), got {max_images}")
    files = [os.fspath(p) for p in paths]
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such JSON-lines file")
    return _documents(files, stats, images_dir, min_sim, max_images, keys or KeyAllocator())


def _lines(path: str) -> Iterator[bytes]:
    """The lines of a JSON-lines file, or of the one file in a ``.zip`` (MMC4's ``docs_*.jsonl.zip`` as downloaded)."""
    if not path.endswith(".zip"):
        with open(path, "rb") as fh:
            yield from fh
        return
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.namelist() if not m.endswith("/")]
        if len(members) != 1:
            raise ValueError(f"{path}: expected a zip of one JSON-lines file, found {len(members)} files")
        with archive.open(members[0]) as fh:
            yield from fh


def _documents(paths: list[str], stats: DocumentStats, images_dir: str | None, min_sim: float, max_images: int,
               keys: KeyAllocator) -> Iterator[RawDocument]:
    for path in paths:
        stem = os.path.basename(path).removesuffix(".zip").removesuffix(".jsonl").removesuffix(".json")
        for line_number, raw in enumerate(_lines(path), 1):
            if not raw.strip():
                continue
            where = f"{path} line {line_number}"
            key = keys.allocate(f"{stem}-{line_number:08d}")
            try:
                doc = json.loads(raw)
                items, meta = parse_line(doc, where, images_dir=images_dir, min_sim=min_sim,
                                         max_images=max_images, stats=stats, key=key)
            except (ValueError, UnicodeDecodeError) as exc:  # _BadLine and json's errors
                drop_document(stats, "document_bad_row", f"{where} (key {key!r}): {exc}")
                continue
            yield RawDocument(key, items, meta)
