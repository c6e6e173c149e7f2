"""What an evaluation reads: the first N samples of a shard set (webdataset or MDS) or of a
COCO-style caption annotation file, with images at the model's size."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmtrain.data.images import decode_image


@dataclass
class EvalSample:
    index: int
    key: str
    references: list[str]  # reference captions; the first is the generation prompt
    label: int | None
    attributes: dict | None  # the synthetic generator's ground truth, when the shards carry it
    image: np.ndarray | None = None  # H, W, 3 uint8 at the eval size; None when not asked for

    @property
    def prompt(self) -> str:
        return self.references[0]


class ShardEvalSet:
    """The first ``num`` samples of a webdataset or MDS source, in file order."""

    def __init__(self, path: str, num: int, image_size: int, resize_mode: str = "center_crop"):
        from mmtrain.data.sources import open_source

        self.source = open_source(path)
        if len(self.source) == 0:
            raise ValueError(f"eval shards {path}: no samples")
        self.name = path
        self.files = list(getattr(self.source, "shards", None) or self.source.files)
        self.size, self.resize_mode = image_size, resize_mode
        self.num = min(num, len(self.source))

    def __len__(self) -> int:
        return self.num

    def load(self, i: int, with_image: bool = True) -> EvalSample:
        raw = self.source.read(i, want_image=with_image)
        image = None
        if with_image:
            if raw.image is None:
                raise ValueError(f"{raw.where}: has no image to evaluate")
            image = decode_image(raw.image, self.size, self.resize_mode, where=raw.where)
        meta = self.source.read_metadata(i)
        attributes = meta if meta is not None and "shapes" in meta else None
        return EvalSample(i, raw.key, [raw.caption], raw.label, attributes, image)


class CocoEvalSet:
    """Images of a COCO ``captions_*.json`` (``images`` + ``annotations``) under ``image_dir``,
    in the file's image order; every caption of an image is a reference."""

    def __init__(self, annotation_file: str, image_dir: str, num: int, image_size: int, resize_mode: str = "center_crop"):
        from mmtrain.eval.caption_metrics import coco_references, read_coco_captions

        path = Path(annotation_file)
        data = read_coco_captions(path)
        refs = coco_references(data, path)
        images = data.get("images")
        if not isinstance(images, list):
            raise ValueError(f"{path}: expected an 'images' list of {{'id', 'file_name'}} next to 'annotations'")
        self.items = []
        for n, im in enumerate(images):
            if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                raise ValueError(f"{path}: images[{n}] needs 'id' and 'file_name', got {im!r:.80}")
            if str(im["id"]) in refs:
                self.items.append((str(im["id"]), Path(image_dir) / im["file_name"], refs[str(im["id"])]))
        if not self.items:
            raise ValueError(f"{path}: no image has a caption annotation")
        self.items = self.items[:num]
        self.name = str(path)
        self.files = [str(path)] + [str(p) for _, p, _ in self.items]
        self.size, self.resize_mode = image_size, resize_mode

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int, with_image: bool = True) -> EvalSample:
        key, file, refs = self.items[i]
        image = None
        if with_image:
            if not file.is_file():
                raise FileNotFoundError(f"{file}: image of COCO id {key} not found (check --coco-images)")
            image = decode_image(file.read_bytes(), self.size, self.resize_mode, where=str(file))
        return EvalSample(i, key, refs, None, None, image)


def open_eval_set(shards: str, coco_annotations: str, coco_images: str, num: int, image_size: int,
                  resize_mode: str) -> ShardEvalSet | CocoEvalSet:
    if coco_annotations:
        if not coco_images:
            raise ValueError("--coco-annotations needs --coco-images (the folder of the annotated images)")
        return CocoEvalSet(coco_annotations, coco_images, num, image_size, resize_mode)
    if not shards:
        raise ValueError("no evaluation data: pass --shards (or set eval.shards), or --coco-annotations with --coco-images; "
                         "the run's data.val_shards is not set")
    return ShardEvalSet(shards, num, image_size, resize_mode)


def training_hold_out(cfg) -> list[dict[str, str]]:
    """The attribute combinations the run's training data was made without: the ``hold_out`` of the
    ``stats.json`` next to each training source (``mmtrain prep synthetic --hold-out``); [] if none."""
    import json

    from mmtrain.data import storage
    from mmtrain.data.synthetic import parse_hold_out

    combos: list[dict[str, str]] = []
    if not cfg.data.sources and not cfg.data.train_shards:
        return combos  # a converted model: no training data to read
    for source in cfg.data.train_sources():
        try:
            stats = json.loads(storage.read_bytes(storage.join(source.path, "stats.json")))
        except (OSError, ValueError):
            continue  # not a synthetic dataset, or no stats: nothing was held out
        for combo in parse_hold_out(stats.get("hold_out") or []):
            if combo not in combos:
                combos.append(combo)
    return combos


def seen_unseen_scores(accuracies: list[dict], shapes: list[list[dict]], hold_out: list[dict]) -> dict[str, float]:
    """``attr_<k>_seen`` / ``attr_<k>_unseen`` (and ``images_seen`` / ``images_unseen``): the attribute
    accuracies of the samples without / with a held-out combination; {} without a hold-out."""
    from mmtrain.data.synthetic import is_held_out, mean_accuracy

    if not hold_out:
        return {}
    out: dict[str, float] = {}
    for name, want in (("seen", False), ("unseen", True)):
        part = [a for a, s in zip(accuracies, shapes) if is_held_out(s, hold_out) == want]
        out[f"images_{name}"] = len(part)
        if part:
            out.update({f"attr_{k}_{name}": v for k, v in mean_accuracy(part).items()})
    return out

