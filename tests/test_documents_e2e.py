"""Documents end to end through the CLI: shape stories mixed with image-caption pairs train on two
ZeRO-3 ranks, `mmtrain generate` continues a story (text, then an image, then text) and `mmtrain
eval documents` scores the stories benchmark, held-out change kinds apart."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from mmtrain import cli
from mmtrain.data.sources import iter_documents
from mmtrain.data.stories import StoryConfig, write_story_shards
from mmtrain.tokenize.text import TextTokenizerConfig, train_text_tokenizer

CONFIG = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def document_run(synthetic_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("documents")
    write_story_shards(root / "stories", 64, StoryConfig(image_size=32), hold_out_changes=["resize"], val_fraction=0.15,
                       samples_per_shard=16)
    texts = [t for doc in iter_documents(root / "stories" / "train") for t in doc.texts]
    from mmtrain.data.sources import iter_samples

    texts += [s["caption"] for s in iter_samples(synthetic_data["train"], want_image=False)]
    tok = train_text_tokenizer(texts, root / "tok" / "text", TextTokenizerConfig(vocab_size=300), progress=False)
    run_dir = root / "run"
    sources = f"[{{path: {root / 'stories' / 'train'}, weight: 3}}, {{path: {synthetic_data['train']}, weight: 1}}]"
    assert cli.main(["train", CONFIG, f"data.sources={sources}", f"tokenizer.text_model={tok.model_path}",
                     f"train.run_dir={run_dir}", f"data.index_cache={root / 'index_cache'}", "model.max_images=4",
                     "model.max_text_len=48", "train.steps=6", "checkpoint.every_steps=6", "logging.log_every=2"]) == 0
    return {"root": root, "run": run_dir, "stories": root / "stories"}


def test_documents_train_generate_and_score_through_the_cli(document_run, tmp_path, capsys):
    run, stories = document_run["run"], document_run["stories"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) and r["diffusion_loss"] > 0 and r["text_loss"] > 0 for r in records)

    # a story's caption and first image in, `--plan text,image,text` out
    doc = next(iter(iter_documents(stories / "val")))
    (tmp_path / "p.png").write_bytes(doc.images[0].data)
    (tmp_path / "prompt.json").write_text(json.dumps({"texts": [doc.segments[0], None], "images": [None, "p.png"]}))
    capsys.readouterr()
    assert cli.main(["generate", str(run), "--doc", str(tmp_path / "prompt.json"), "--out", str(tmp_path / "out"),
                     "--plan", "text,image,text", "--max-text-tokens", "6", "--set", "diffusion_steps=3",
                     "--set", "ar_steps=2", "--device", "cpu"]) == 0
    assert "+3 segment(s)" in capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "prompt.json").read_text())
    kinds = ["text" if t is not None else "image" for t in written["texts"]]
    assert kinds == ["text", "image", "text", "image", "text"]
    assert written["texts"][0] == doc.segments[0] and written["meta"]["prompt_segments"] == 2
    assert written["meta"]["checkpoint_step"] == 6
    drawn = Image.open(tmp_path / "out" / written["images"][3])
    assert drawn.size == (32, 32) and np.asarray(drawn).std() > 0  # the VAE-less pixels tokenizer drew something
    assert (tmp_path / "out" / written["images"][1]).read_bytes() == doc.images[0].data  # the prompt's image, as given

    # the benchmark: draw and tell per k, held-out change kinds apart
    out = tmp_path / "eval"
    assert cli.main(["eval", "documents", str(run), "--shards", str(stories / "val"), "--held-out",
                     str(stories / "holdout" / "train"), "--num", "3", "--out", str(out), "--set", "diffusion_steps=3",
                     "--set", "ar_steps=1", "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"eval", "held_out"} and metrics["step"] == 6
    for split, path in (("eval", stories / "val"), ("held_out", stories / "holdout" / "train")):
        docs = list(iter_documents(path))[:3]
        summary = metrics["splits"][split]
        assert summary["count"] == sum(len(d.meta["scenes"]) - 1 for d in docs)
        assert set(summary["by_k"]) == {str(k) for d in docs for k in range(1, len(d.meta["scenes"]))}
        for name in ("draw_attribute", "draw_consistency", "draw_exact", "tell_kind", "tell_object", "tell_value", "tell_exact"):
            assert 0.0 <= summary["overall"][name] <= 1.0
        assert all(row["true_text"] == d.meta["changes"][row["k"] - 1]["text"] for row, d in
                   zip(summary["rows"], [d for d in docs for _ in range(len(d.meta["scenes"]) - 1)]))
    held = {row["change"] for row in metrics["splits"]["held_out"]["rows"]}
    assert "resize" in {c["kind"] for d in list(iter_documents(stories / "holdout" / "train"))[:3] for c in d.meta["changes"]}
    assert held <= {"move", "appear", "recolor", "resize", "disappear"}
    assert "shape stories, step 6" in capsys.readouterr().out
