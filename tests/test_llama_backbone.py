"""CausalFusion on the LLaMA backbone, started from a Hugging Face checkpoint.

The checkpoints are tiny random models written with transformers' own ``save_pretrained``
(weights and a sentencepiece tokenizer trained on the synthetic captions); nothing is downloaded.
Against transformers: the converted model's text path gives its logits; ``export --hf`` gives a
checkpoint transformers loads with the run's logits. The training modes: ``frozen_text`` keeps
text-only logits bit for bit through multimodal training, on two ZeRO-3 ranks that build the
model partitioned and fill it one tensor at a time; ``new_only`` trains only the image layers;
``full`` gives the pretrained weights their own learning rate.
"""
import json
import random

import pytest
import sentencepiece as spm
import torch
import transformers

from conftest import REPO
from mmtrain import cli
from mmtrain.components.optimizer import param_groups
from mmtrain.config import load_config
from mmtrain.inference import load_model_dir, load_run
from mmtrain.models.causalfusion import training_inputs
from mmtrain.models.diffusion import DiffusionConfig, GaussianDiffusion
from mmtrain.models.pretrained import export_hf, hf_to_model_key
from mmtrain.tokenize.image import patchify

CONFIG = str(REPO / "configs" / "tiny.yaml")
TINY = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128)
KINDS = {"llama_gqa_untied": ("LlamaForCausalLM", dict(tie_word_embeddings=False)),
         "qwen2_bias_tied": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True))}


def hf_checkpoint(root, captions, kind="llama_gqa_untied"):
    """A local Hugging Face directory: a sentencepiece tokenizer (LlamaTokenizer) on ``captions`` and random
    weights of ``kind`` sized to it (norm weights and biases randomised, so they matter)."""
    root.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions), model_prefix=str(root / "sp"), vocab_size=120,
                                   model_type="bpe", num_threads=1, minloglevel=2, pad_id=0, unk_id=1, bos_id=2, eos_id=3)
    tok = transformers.LlamaTokenizer(vocab_file=str(root / "sp.model"), legacy=True, pad_token="<pad>")
    out = root / kind
    tok.save_pretrained(out)
    cls_name, extra = KINDS[kind]
    torch.manual_seed(0)
    config = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))(vocab_size=len(tok), **TINY, **extra,
                                                                                bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out, safe_serialization=True)
    return out, model


@pytest.fixture(scope="module")
def captions(synthetic_data):
    from mmtrain.data.sources import iter_samples

    return [s["caption"] for s in iter_samples(synthetic_data["train"], want_image=False)]


def _ids(tok, texts):
    ids, lens = tok.encode_batch(texts, max_len=24)
    return ids, lens


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_convert_hf_keeps_the_language_model_and_export_hf_gives_it_back(kind, captions, tmp_path):
    """`mmtrain convert hf`: text-only logits equal transformers' on the checkpoint (1e-5, fp32), <boi>/<eoi>
    added as mean rows; after changing every weight (as training would), `export --hf`'s checkpoint loads in
    transformers (AutoModelForCausalLM, AutoTokenizer) and gives the model's logits over the whole vocabulary."""
    llm, ref = hf_checkpoint(tmp_path / "hf", captions, kind)
    out = tmp_path / "converted"
    assert cli.main(["convert", "hf", str(llm), str(out), "--config", CONFIG]) == 0
    run = load_model_dir(out, weights="model")
    model, tok = run.model, run.text_tok
    assert run.cfg.model.backbone == "llama" and run.cfg.model.depth == 2 and run.cfg.model.llama.num_key_value_heads == 2
    assert run.cfg.model.llama.model_type == kind.split("_")[0]
    V0 = ref.config.vocab_size
    assert tok.added_tokens == ["<boi>", "<eoi>"] and model.vocab_size == V0 + 2 == tok.vocab_size
    ids, lens = _ids(tok, captions[:3])
    with torch.no_grad():
        ours = model.text_logits(ids, lens)
        theirs = ref(ids, attention_mask=(torch.arange(ids.shape[1])[None] < lens[:, None]).long()).logits
    valid = torch.arange(ids.shape[1])[None] < lens[:, None]
    torch.testing.assert_close(ours[valid][:, :V0], theirs[valid], rtol=1e-5, atol=1e-5)
    emb = model.tok_embed.weight.detach()
    torch.testing.assert_close(emb[V0:], emb[:V0].mean(0).expand(2, -1))  # the new rows: the mean row

    with torch.no_grad():  # as training would: every weight moves
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    exported = export_hf(model.state_dict(), run.cfg.model, tok, tmp_path / "hf_out")
    back = transformers.AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    back_tok = transformers.AutoTokenizer.from_pretrained(exported, local_files_only=True)
    assert type(back).__name__ == KINDS[kind][0] and back.config.vocab_size == V0 + 2
    assert back_tok.convert_tokens_to_ids(["<boi>", "<eoi>"]) == [tok.boi_id, tok.eoi_id]
    for text in captions[:3]:
        assert back_tok(text)["input_ids"] == tok.encode(text, eos=False)
    with torch.no_grad():
        again = back(ids, attention_mask=valid.long()).logits
        ours = model.text_logits(ids, lens)
    torch.testing.assert_close(again[valid], ours[valid], rtol=1e-5, atol=1e-5)


def _converted(captions, tmp_path, mode, kind="llama_gqa_untied"):
    llm, _ = hf_checkpoint(tmp_path / "hf", captions, kind)
    out = tmp_path / f"converted_{mode}"
    assert cli.main(["convert", "hf", str(llm), str(out), "--config", CONFIG, f"model.backbone_training={mode}"]) == 0
    return load_model_dir(out, weights="model")


def _train(run, steps=3, seed=0):
    """A few AdamW steps of multimodal training (random images, the captions) on the trainable weights."""
    model = run.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    diffusion = GaussianDiffusion(DiffusionConfig())
    g = torch.Generator().manual_seed(seed)
    text, text_len = _ids(run.text_tok, ["a red circle", "two blue squares", "a green triangle", "one small circle"])
    for step in range(steps):
        images = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
        tokens = patchify(run.image_tok.encode(images), run.cfg.model.patch_size)
        batch = training_inputs(model, tokens, diffusion, torch.Generator().manual_seed(step), random.Random(step),
                                text=text, text_len=text_len)
        loss = model(**batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_frozen_text_keeps_text_logits_bit_for_bit_and_trains_image_copies(captions, tmp_path):
    run = _converted(captions, tmp_path, "frozen_text")
    model = run.model
    ids, lens = _ids(run.text_tok, captions[:4])
    with torch.no_grad():
        before = model.text_logits(ids, lens)
    pretrained = model.pretrained_parameter_names()
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in pretrained)
    image_copy = {n: p.detach().clone() for n, p in model.named_parameters() if ".image." in n}
    assert image_copy and all(torch.equal(p, model.get_parameter(n.replace("image.", ""))) for n, p in image_copy.items())
    _train(run)
    with torch.no_grad():
        after = model.text_logits(ids, lens)
    assert torch.equal(before, after)  # bit for bit
    moved = [n for n, p in model.named_parameters() if ".image." in n and not torch.equal(p, image_copy[n])]
    assert len(moved) == len(image_copy)  # every image copy trained


def test_new_only_trains_only_the_image_layers_and_full_splits_the_learning_rates(captions, tmp_path):
    run = _converted(captions, tmp_path, "new_only")
    trainable = sorted(n for n, p in run.model.named_parameters() if p.requires_grad)
    assert trainable == ["diffusion_head.bias", "diffusion_head.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.0.weight",
                         "t_embedder.mlp.2.bias", "t_embedder.mlp.2.weight", "x_proj.bias", "x_proj.weight"]
    full = _converted(captions, tmp_path, "full").model
    names = full.pretrained_parameter_names()
    # exactly what the Hugging Face checkpoint provided
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "llama_gqa_untied" / "model.safetensors"), "pt") as f:
        assert names == {hf_to_model_key(k) for k in f.keys()}
    groups = param_groups(full, 0.0, "split", lr=1e-3, pretrained_lr_scale=0.1)
    by_id = {id(p): n for n, p in full.named_parameters()}
    for g in groups:
        assert {by_id[id(p)] in names for p in g["params"]} == {g["lr"] == pytest.approx(1e-4)}
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in full.parameters())


def test_zero3_run_from_a_hf_checkpoint_loads_partitioned_keeps_text_frozen_and_exports(synthetic_data, captions, tmp_path,
                                                                                        capfd):
    """`train.init_from` a Hugging Face directory on two ZeRO-3 ranks, frozen_text: the model is built
    partitioned and filled one tensor at a time (no rank holds more than the largest tensor in full); stopped
    and resumed; after multimodal steps the run's text-only logits (trained weights and EMA) are the
    checkpoint's, bit for bit; `eval text` and `export --hf` work on the run, and transformers reads the export
    back with the checkpoint's own weights."""
    llm, ref = hf_checkpoint(tmp_path / "hf", captions)
    run_dir = tmp_path / "run"
    args = ["train", CONFIG, f"data.train_shards={synthetic_data['train']}", f"train.run_dir={run_dir}",
            f"data.index_cache={tmp_path / 'index_cache'}", f"train.init_from={llm}", "model.backbone_training=frozen_text",
            "train.steps=3", "checkpoint.every_steps=3", "logging.log_every=1"]
    capfd.readouterr()
    assert cli.main(args + ["train.stop_at=2"]) == 0
    err = capfd.readouterr().err
    assert cli.main(args) == 0  # resumes at step 2 (init_from is not read again)
    assert "resumed from step00000002" in capfd.readouterr().err
    line = next(x for x in err.splitlines() if "initial weights from the Hugging Face checkpoint" in x)
    held, total = (int(v) for v in line.split("held at once: ")[1].split(" elements")[0].split(" of the model's "))
    biggest = max(p.numel() for p in ref.parameters())
    assert held == biggest + 2 * 64 and held < total / 5, line  # the embedding with its 2 new rows, never the model
    assert "ZeRO-3: built partitioned" in line and "2 rows added" in line
    saved = load_config(run_dir / "config.yaml")  # the resolved architecture and tokenizer
    assert saved.model.backbone == "llama" and saved.model.llama.num_key_value_heads == 2
    assert (run_dir / "tokenizer" / "text_hf").is_dir()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["diffusion_loss"] > 0 for r in records)

    trained = load_run(run_dir, weights="model")
    ids, lens = _ids(trained.text_tok, captions[:4])
    valid = torch.arange(ids.shape[1])[None] < lens[:, None]
    with torch.no_grad():
        theirs = ref(ids, attention_mask=valid.long()).logits
        ours = trained.model.text_logits(ids, lens)
    torch.testing.assert_close(ours[valid][:, :ref.config.vocab_size], theirs[valid], rtol=1e-5, atol=1e-5)
    start = _converted(captions, tmp_path / "again", "frozen_text").model  # step 0, in one process
    ema = load_run(run_dir, weights="ema").model
    with torch.no_grad():
        assert torch.equal(start.text_logits(ids, lens), ours)  # bit for bit after multimodal training on 2 ranks
        assert torch.equal(ema.text_logits(ids, lens), ours)  # the EMA of a frozen weight is the weight
    assert not torch.equal(start.x_proj.weight, trained.model.x_proj.weight)  # while the image side trained

    text_file = tmp_path / "held_out.txt"
    text_file.write_text("\n".join(captions[-5:]) + "\n")
    assert cli.main(["eval", "text", str(run_dir), "--file", str(text_file), "--device", "cpu"]) == 0
    metrics = json.loads((run_dir / "eval" / "text" / "held_out" / "metrics.json").read_text())
    assert metrics["perplexity"] > 1 and metrics["tokens_scored"] > 5

    assert cli.main(["export", str(run_dir), "--hf", str(tmp_path / "hf_out")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_out", local_files_only=True)
    for name, p in ref.state_dict().items():  # frozen: the checkpoint's own weights (plus the 2 new rows)
        q = back.state_dict()[name]
        assert torch.equal(q[:p.shape[0]], p), name
