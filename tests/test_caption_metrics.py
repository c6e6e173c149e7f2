"""Caption metrics: pycocoevalcap's numbers, checked by hand on cases small enough to count."""
import json

import pytest

from mmtrain.eval.caption_metrics import METRICS, load_coco_references, score_captions


REFS = {
    "1": ["a red circle on the left", "a red circle at the left side"],
    "2": ["two blue squares at the top", "a pair of blue squares on top"],
    "3": ["a small green triangle", "a tiny green triangle in the middle"],
}
CANDS = {"1": "a red square on the left", "2": "two blue squares at the top", "3": "a large green triangle"}


def test_hand_checked_single_caption():
    # one reference, one candidate: 5 of 6 words match in order ("square" for "circle")
    s = score_captions({"x": ["a red circle on the left"]}, {"x": "a red square on the left"}, meteor=False)
    assert s["BLEU-1"] == pytest.approx(5 / 6, abs=1e-6)  # unigram precision, no brevity penalty
    assert s["BLEU-2"] == pytest.approx((5 / 6 * 3 / 5) ** 0.5, abs=1e-6)  # bigrams: a-red, on-the, the-left of 5
    assert s["ROUGE-L"] == pytest.approx(5 / 6, abs=1e-6)  # LCS 5, precision = recall = 5/6
    same = score_captions({"x": ["a red circle on the left"]}, {"x": "A red circle, on the left."}, meteor=False)
    assert same["BLEU-4"] == pytest.approx(1.0, abs=1e-6)  # PTB tokenization lowercases and drops punctuation


def pycocoevalcap_directly(refs: dict[str, list[str]], cands: dict[str, str]) -> dict[str, float]:
    """The COCO caption evaluation code called as its own examples do, without mmtrain: the reference
    that mmtrain's caption scores are checked against."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": r} for r in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in cands.items()})
    direct = dict(zip(METRICS[:4], Bleu(4).compute_score(gts, res)[0]))
    direct["METEOR"] = Meteor().compute_score(gts, res)[0]
    direct["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    direct["CIDEr"] = Cider().compute_score(gts, res)[0]
    return direct


def test_equal_to_pycocoevalcap_called_directly():
    direct = pycocoevalcap_directly(REFS, CANDS)
    ours = score_captions(REFS, CANDS)
    assert list(ours) == list(METRICS)
    for k in METRICS:
        assert ours[k] == pytest.approx(direct[k], abs=1e-9), k
    assert 0 < ours["CIDEr"] and ours["BLEU-1"] > ours["BLEU-4"] > 0 and 0 < ours["METEOR"] < 1


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="no reference caption"):
        score_captions(REFS, {"9": "a cat"}, meteor=False)
    ann = tmp_path / "captions_val.json"
    ann.write_text(json.dumps({"annotations": [{"image_id": 7, "caption": "a dog"}, {"image_id": 7, "caption": "one dog"}]}))
    assert load_coco_references(ann) == {"7": ["a dog", "one dog"]}
    ann.write_text(json.dumps({"annotations": [{"image_id": 7}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\] needs 'image_id' and a string 'caption'"):
        load_coco_references(ann)
    for text in ("[]", "{not json", '{"annotations": 3}'):
        ann.write_text(text)
        with pytest.raises(ValueError, match="captions_val.json: expected COCO captions JSON with an 'annotations' list"):
            load_coco_references(ann)


def test_without_java_the_error_names_the_runtime_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no java on it
    with pytest.raises(RuntimeError, match=r"need a Java runtime on PATH .*METEOR.*apt-get install default-jre-headless"):
        score_captions({"1": ["a red circle"]}, {"1": "a red circle"})
