"""Raw datasets -> training shards (webdataset tar or mosaicml-streaming MDS).

Converters: :func:`prep_folder`, :func:`prep_manifest`, :func:`prep_coco`,
:func:`prep_wds` (all taking a :class:`PrepConfig`), the generic
:func:`run_prep` over a listed :class:`Source`, and :func:`precompute_latents`. Prepared
datasets are read back with :func:`mmtrain.data.sources.iter_shards` (the one reader).
The CLI entry is ``mmtrain.data.prep.cli.add_prep_subcommands``.

Exports resolve lazily: worker processes import ``mmtrain.data.prep.process``
through this package and should not pay for torch/webdataset/streaming imports.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PrepConfig": "config",
    "DROP_REASONS": "config",
    "Candidate": "candidate",
    "Source": "candidate",
    "run_prep": "pipeline",
    "prep_folder": "convert",
    "prep_manifest": "convert",
    "prep_coco": "convert",
    "prep_wds": "convert",
    "list_folder": "sources.folder",
    "list_manifest": "sources.manifest",
    "list_coco": "sources.coco",
    "list_wds": "sources.wds",
    "OutSample": "sample",
    "precompute_latents": "latents",
}

__all__ = [  # noqa: RUF022 -- grouped by module, like _EXPORTS
    "PrepConfig", "DROP_REASONS", "Candidate", "Source", "run_prep",
    "prep_folder", "prep_manifest", "prep_coco", "prep_wds",
    "list_folder", "list_manifest", "list_coco", "list_wds",
    "OutSample", "precompute_latents",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
