"""`mmtrain eval text`: NLL / perplexity of a text file on an untrained tiny model (a sentencepiece run and
one with a Hugging Face tokenizer in tokenizer/text_hf/), checked against log_softmax(text_logits) by hand."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mmtrain import cli
from mmtrain.eval.text import windows

REPO = Path(__file__).resolve().parent.parent
TEXTS = ["a red circle on the left", "a blue square above a green triangle", "two small yellow stars",
         "the big circle is red", "a green square and a blue circle"] * 8


def _hf_tokenizer(out: Path) -> Path:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(out)
    return out


def _model_dir(out: Path, kind: str) -> Path:
    """An untrained tiny model in the layout of `mmtrain export`, its tokenizer in the run's own place."""
    from safetensors.torch import save_file

    from mmtrain.config import load_config, save_config
    from mmtrain.models import build_model
    from mmtrain.tokenize.build import build_image_tokenizer
    from mmtrain.tokenize.run_text import copy_run_tokenizer, load_text_tokenizer
    from mmtrain.tokenize.text import TextTokenizerConfig, train_text_tokenizer

    out.mkdir(parents=True)
    src = out.parent / f"{out.name}_tok"
    if kind == "sp":
        path = train_text_tokenizer(TEXTS, src / "text", TextTokenizerConfig(vocab_size=64), progress=False).model_path
    else:
        path = _hf_tokenizer(src)
    tok = load_text_tokenizer(path)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"tokenizer.text_model={path}", f"train.run_dir={out}",
                                                       "model.max_text_len=8"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.image_size, tok, build_image_tokenizer(cfg.tokenizer.image))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    save_config(cfg, out / "config.yaml")
    copy_run_tokenizer(tok, out / "tokenizer")
    shutil.rmtree(src)  # the model directory's own copy is what loads
    return out


@pytest.mark.parametrize("kind", ["sp", "hf"])
def test_eval_text_nll_by_hand(kind, tmp_path, capsys):
    from mmtrain.inference import load_model_dir

    model_dir = _model_dir(tmp_path / "model", kind)
    lines = ["a red circle on the left and a blue square above a green triangle", "", "two stars", "  ",
             "the big circle is red"]
    text = tmp_path / "held_out.txt"
    text.write_text("\n".join(lines) + "\n")
    assert cli.main(["eval", "text", str(model_dir), "--file", str(text), "--batch-size", "2", "--device", "cpu"]) == 0
    out = model_dir / "eval" / "text" / "held_out"
    m = json.loads((out / "metrics.json").read_text())
    assert "perplexity" in capsys.readouterr().out

    run = load_model_dir(model_dir)
    assert type(run.text_tok).__name__ == ("TextTokenizer" if kind == "sp" else "HFTextTokenizer")
    size = run.model.max_text_positions
    assert m["window"] == size == 8
    by_hand, rows = [], []
    for line in (t for t in lines if t.strip()):
        ids = run.text_tok.encode(line)
        nll = []
        for w in windows(ids, size):
            with torch.no_grad():
                logits = run.model.text_logits(torch.tensor([w]), torch.tensor([len(w)]))[0]
            nll += (-torch.log_softmax(logits.float(), -1)[:-1].gather(-1, torch.tensor(w[1:])[:, None])[:, 0]).tolist()
        assert len(nll) == len(ids) - 1  # every token but bos, once
        by_hand.append(nll)
        rows.append(ids[1:])
    assert len(by_hand[0]) > size  # the long line took more than one window
    assert m["lines"] == 3 and m["tokens_scored"] == sum(map(len, by_hand))
    mean = sum(map(sum, by_hand)) / m["tokens_scored"]
    assert m["mean_nll"] == pytest.approx(mean, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(m["mean_nll"]), rel=1e-9)
    assert m["per_line_mean_nll"] == pytest.approx([sum(v) / len(v) for v in by_hand], rel=1e-5)
    tokens = [json.loads(r) for r in (out / "tokens.jsonl").read_text().splitlines()]
    assert [t["line"] for t in tokens] == [1, 3, 5] and [t["ids"] for t in tokens] == rows
    for t, nll in zip(tokens, by_hand):
        assert t["nll"] == pytest.approx(nll, rel=1e-5, abs=1e-6)

    # --max-len cuts smaller windows (padding rows in a batch change nothing): same tokens, close NLLs
    assert cli.main(["eval", "text", str(model_dir), "--file", str(text), "--max-len", "3", "--out", str(tmp_path / "w3"),
                     "--device", "cpu"]) == 0
    m3 = json.loads((tmp_path / "w3" / "metrics.json").read_text())
    assert m3["window"] == 3 and m3["tokens_scored"] == m["tokens_scored"]


def test_eval_text_errors(tmp_path):
    from mmtrain.eval.text import evaluate_text, read_lines

    with pytest.raises(FileNotFoundError, match=f"--file {tmp_path / 'none.txt'}: no such file"):
        read_lines(tmp_path / "none.txt")
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    with pytest.raises(ValueError, match=f"--file {tmp_path / 'blank.txt'}: no text in it"):
        read_lines(tmp_path / "blank.txt")
    assert windows([1, 2, 3, 4, 5], 3) == [[1, 2, 3], [3, 4, 5]] and windows([1, 2], 5) == [[1, 2]]
    with pytest.raises(ValueError, match=">= 2"):
        windows([1, 2, 3], 1)

    from types import SimpleNamespace

    from mmtrain.models import FAMILIES
    from mmtrain.models.config import ModelConfig

    no_text = [name for name, f in FAMILIES.items() if not f.captions]  # TransDiff: no text path
    assert no_text
    cfg = ModelConfig(family=no_text[0])
    run = SimpleNamespace(model=SimpleNamespace(cfg=cfg), text_tok=None, cfg=SimpleNamespace(model=cfg), checkpoint="x")
    with pytest.raises(ValueError, match=f"model.family={no_text[0]} has no text path"):
        evaluate_text(run, tmp_path / "blank.txt", tmp_path / "out")
