"""One call per raw dataset kind: list the source, then :func:`run_prep` it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from mmtrain.data.prep.candidate import Source
from mmtrain.data.prep.config import PrepConfig
from mmtrain.data.prep.pipeline import run_prep
from mmtrain.data.prep.sources.coco import list_coco
from mmtrain.data.prep.sources.folder import list_folder
from mmtrain.data.prep.sources.manifest import list_manifest
from mmtrain.data.prep.sources.wds import list_wds

PathLike = str | os.PathLike[str]
logger = logging.getLogger("mmtrain.data.prep")


def _checked(cfg: PrepConfig | None) -> PrepConfig:
    # Validate before listing: a typo should not wait for a walk over millions of files.
    return (cfg or PrepConfig()).validate()


def _listed(what: str, lister: Callable[[], Source]) -> Source:
    # Listing millions of files or rows takes a while before the progress bar appears; say so.
    logger.info("listing %s ...", what)
    start = time.perf_counter()
    source = lister()
    logger.info("listed %d candidates (%d rejected while listing) in %.1fs",
                len(source.candidates), len(source.drops), time.perf_counter() - start)
    return source


def prep_folder(folder: PathLike, out_dir: PathLike, cfg: PrepConfig | None = None) -> dict[str, Any]:
    """Images with same-named ``.txt`` captions under ``folder`` -> shards; returns stats."""
    cfg = _checked(cfg)
    return run_prep(_listed(str(folder), lambda: list_folder(folder)), out_dir, cfg)


def prep_manifest(manifest: PathLike, out_dir: PathLike, cfg: PrepConfig | None = None, *,
                  image_column: str = "image", caption_column: str = "caption",
                  label_column: str | None = None, manifest_format: str = "auto") -> dict[str, Any]:
    """CSV/TSV/JSONL/JSON/parquet manifest -> shards (see ``list_manifest``); returns stats."""
    cfg = _checked(cfg)
    source = _listed(str(manifest), lambda: list_manifest(
        manifest, image_column=image_column, caption_column=caption_column, label_column=label_column,
        manifest_format=manifest_format))
    return run_prep(source, out_dir, cfg)


def prep_coco(annotations: PathLike, out_dir: PathLike, cfg: PrepConfig | None = None, *,
              images_dir: PathLike | None = None, all_captions: bool = False) -> dict[str, Any]:
    """COCO captions JSON -> shards (see ``list_coco``); returns stats."""
    cfg = _checked(cfg)
    source = _listed(str(annotations), lambda: list_coco(annotations, images_dir=images_dir, all_captions=all_captions))
    return run_prep(source, out_dir, cfg)


def prep_wds(shards: PathLike | Iterable[PathLike], out_dir: PathLike, cfg: PrepConfig | None = None) -> dict[str, Any]:
    """Existing webdataset shards (e.g. img2dataset output) -> re-sharded, filtered, resized shards."""
    cfg = _checked(cfg)
    return run_prep(_listed("webdataset shards", lambda: list_wds(shards)), out_dir, cfg)
