"""Caption metrics through pycocoevalcap, the COCO caption evaluation code: BLEU-1..4,
METEOR, ROUGE-L and CIDEr, corpus level, after the same Stanford PTB tokenization (Java).

Scores are pycocoevalcap's own, not re-implemented: numbers comparable to published
COCO captioning results need exactly its tokenizer, smoothing and CIDEr-D idf.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def _check_inputs(references: dict, candidates: dict) -> None:
    if not candidates:
        raise ValueError("no candidate captions to score")
    missing = [k for k in candidates if not references.get(k)]
    if missing:
        raise ValueError(f"{len(missing)} candidate id(s) have no reference caption, e.g. {missing[:3]}")
    bad = [k for k, c in candidates.items() if not isinstance(c, str)]
    if bad:
        raise ValueError(f"candidate captions must be strings; id(s) {bad[:3]} are not")


def score_captions(references: dict[str, list[str]], candidates: dict[str, str], meteor: bool = True) -> dict[str, float]:
    """Corpus scores of ``candidates`` (one caption per id) against ``references`` (one or
    more per id). METEOR and the tokenizer run Java; ``meteor=False`` leaves METEOR out."""
    _check_inputs(references, candidates)
    if shutil.which("java") is None:
        raise RuntimeError("caption metrics need a Java runtime on PATH (pycocoevalcap's PTB tokenizer and METEOR "
                           "are Java): `make java` installs one as root, or e.g. apt-get install default-jre-headless")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = list(candidates)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": r} for r in references[k]] for k in ids})
    res = tokenizer.tokenize({k: [{"caption": candidates[k]}] for k in ids})
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])  # its Java process ends with the object
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def read_coco_captions(annotation_file: str | Path) -> dict:
    """Parse a COCO ``captions_*.json``; errors name the file."""
    path = Path(annotation_file)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such annotation file") from None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: expected COCO captions JSON with an 'annotations' list")
    return data


def coco_references(data: dict, annotation_file: str | Path) -> dict[str, list[str]]:
    """Parsed COCO captions (``{"annotations": [{"image_id", "caption"}, ...]}``) ->
    image id (as a string) -> its reference captions."""
    refs: dict[str, list[str]] = {}
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise ValueError(f"{annotation_file}: annotations[{n}] needs 'image_id' and a string 'caption', got {ann!r:.80}")
        refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])
    return refs


def load_coco_references(annotation_file: str | Path) -> dict[str, list[str]]:
    """``captions_*.json`` of COCO -> image id (as a string) -> its reference captions."""
    return coco_references(read_coco_captions(annotation_file), annotation_file)
