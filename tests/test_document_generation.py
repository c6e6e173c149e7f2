"""Interleaved generation: the KV-cached lockstep sampler reads and writes documents under the
very mask the model trains with (checked against a full forward of the document layout), keeps
its limits, batches documents of different shapes, and runs through ``mmtrain generate``."""
import random

import numpy as np
import pytest
import torch

from mmtrain.models.causalfusion import CausalFusion, ModelConfig, even_ar_split
from mmtrain.models.diffusion import DiffusionConfig, GaussianDiffusion
from mmtrain.models.document_layout import IGNORE, ImageRun, TextRun, document_runs, layout_from_slots, run_slots
from mmtrain.models.document_sampling import GenerationLimits, continue_documents

IDS = dict(pad=0, bos=2, eos=3, boi=4, eoi=5)
T = 24


def _model(seed=0, backbone="dit") -> CausalFusion:
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=32, depth=2, num_heads=2, patch_size=8, max_text_len=T, max_images=3, backbone=backbone)
    model = CausalFusion(cfg, latent_channels=3, latent_size=16, vocab_size=40, special_ids=IDS)  # L = 4
    torch.nn.init.normal_(model.diffusion_head.weight, std=0.1)
    # keep <boi>/<eos>/<pad> unlikely so that greedy text runs to its limit: a biased LM head
    head = torch.nn.Linear(32, 40)
    with torch.no_grad():
        torch.nn.init.normal_(head.weight, std=0.5)
        head.bias.zero_()
        head.bias[[0, 2, 3, 4, 5]] = -50
    model.lm_head = head
    return model.eval()


def _full_logits(model, runs, images):
    """Text logits (N, V) of one document laid out as in training, run as one sequence."""
    slots = run_slots(runs, IDS, T)
    lay = layout_from_slots({k: v[None] for k, v in slots.items()}, "cpu")
    with torch.no_grad():
        h = model.run_blocks(model.embed(lay, images, None, None), lay.attention_mask(), positions=lay.rope_positions(),
                             image_slots=lay.image_slots())
        return model.lm_head(h[0]), slots


@pytest.mark.parametrize("backbone", ["dit", "llama"])
def test_cached_generation_follows_the_training_layout_through_text_image_text(backbone):
    """Prompt [text, image (given)], then an image drawn first (plan image, text) and text after it:
    every greedy token is the argmax of a full forward of the whole document under the training
    mask (the given image a context image, the drawn one a generated image with its clean copy in
    the sampler's AR order), so the one KV cache kept across segments is exact (on the LLaMA
    backbone, its rotary positions too)."""
    model = _model(backbone=backbone)
    L, P = model.num_image_tokens, model.token_dim
    diffusion = GaussianDiffusion(DiffusionConfig(), 4)
    given = torch.randn(2, L, P)
    prompts = [[np.array([7, 8, 9]), 0], [np.array([10]), 1, np.array([11, 12])]]  # two shapes of documents, one batch
    seed, ar_steps = 5, 2
    limits = GenerationLimits(max_text_tokens=5, plan=("image", "text"))
    out, drawn = continue_documents(model, diffusion, prompts, given,
                                    generator=torch.Generator().manual_seed(seed), limits=limits, ar_steps=ar_steps)
    assert [[k for k, _ in segs] for segs in out] == [["image", "text"], ["image", "text"]]
    assert drawn.shape == (2, L, P) and all(len(segs[1][1]) == 5 for segs in out)
    perm = torch.argsort(torch.rand(2, L, generator=torch.Generator().manual_seed(seed)), dim=1)  # the sampler's first draw
    images = torch.cat([given, drawn])
    for b, prompt in enumerate(prompts):
        runs = document_runs(prompt, IDS, T, L, model.cfg, random.Random(0), context_prob=1.0)  # the prompt as the sampler reads it
        pos = sum(len(r.ids) for r in runs if isinstance(r, TextRun))
        text = np.array(out[b][1][1], dtype=np.int64)
        runs += [ImageRun(2 + b, perm[b].numpy(), even_ar_split(L, ar_steps), np.ones(L, np.float32), keep_last_clean=True,
                          eoi_target=int(text[0])),
                 TextRun(text, np.full(len(text), IGNORE), np.arange(pos, pos + len(text)))]
        logits, slots = _full_logits(model, runs, images)
        eoi = int(np.flatnonzero(slots["token"] == IDS["eoi"])[-1])
        predicted = logits[eoi:eoi + len(text)].argmax(-1)  # <eoi> predicts the first token, each token the next
        assert predicted.tolist() == text.tolist(), b


def test_text_first_opens_an_image_when_the_model_asks_and_keeps_the_limits():
    """Decoding stops a span at max_text_tokens, then the caller's limits open the image; a model
    that emits <boi> gets its image at once; no row draws more than max_images."""
    model = _model(1)
    L, P = model.num_image_tokens, model.token_dim
    diffusion = GaussianDiffusion(DiffusionConfig(), 3)
    limits = GenerationLimits(max_images=1, max_text_tokens=3, max_segments=3)
    out, drawn = continue_documents(model, diffusion, [[np.array([7])], [np.array([8, 9])]], torch.zeros(0, L, P),
                                    generator=torch.Generator().manual_seed(0), limits=limits, ar_steps=2)
    for segs in out:
        assert [k for k, _ in segs] == ["text", "image", "text"]
        assert all(len(v) == 3 for k, v in segs if k == "text")
    assert drawn.shape[0] == 2
    with torch.no_grad():  # now <boi> wins at once: the image comes first, text after
        model.lm_head.bias[4] = 500  # <boi> wins
    out, _ = continue_documents(model, diffusion, [[np.array([7])]], torch.zeros(0, L, P),
                                generator=torch.Generator().manual_seed(0), limits=limits, ar_steps=2)
    kinds = [k for k, _ in out[0]]
    assert kinds[0] == "image" and kinds.count("image") == 1


def test_a_plan_places_the_images_whatever_the_model_would_do():
    """plan text,image,text: the model ends the document at once (</s> always wins here), yet the
    plan goes on: an empty text span, the image the plan asks for, then text again."""
    model = _model(2)
    with torch.no_grad():
        model.lm_head.bias[3] = 500  # </s> wins
    L, P = model.num_image_tokens, model.token_dim
    diffusion = GaussianDiffusion(DiffusionConfig(), 3)
    out, drawn = continue_documents(model, diffusion, [[np.array([7])]], torch.zeros(0, L, P),
                                    generator=torch.Generator().manual_seed(0), limits=GenerationLimits(plan=("text", "image", "text")),
                                    ar_steps=2)
    assert out[0] == [("text", []), ("image", 0), ("text", [])] and drawn.shape == (1, L, P)
    # without a plan the same model just ends the document
    out, drawn = continue_documents(model, diffusion, [[np.array([7])]], torch.zeros(0, L, P),
                                    generator=torch.Generator().manual_seed(0), limits=GenerationLimits(), ar_steps=2)
    assert out[0] == [] and drawn.shape[0] == 0
    with pytest.raises(ValueError, match="two text segments in a row"):
        GenerationLimits(plan=("text", "text"))
    with pytest.raises(ValueError, match="segments are 'text' or 'image'"):
        GenerationLimits(plan=("picture",))


def test_document_files_round_trip_and_bad_files_are_named(tmp_path):
    from mmtrain.data.documents import Document, DocImage, read_document_file, write_document_file

    png = _png()
    doc = Document("d", ["a caption", DocImage(png, "png"), "then"], {"source": "test"})
    files = write_document_file(doc, tmp_path / "out" / "d.json")
    assert [f.name for f in files] == ["d.0.png", "d.json"]
    back = read_document_file(tmp_path / "out" / "d.json")
    assert back.segments[0] == "a caption" and back.images[0].data == png and back.meta == {"source": "test"}
    (tmp_path / "bad.json").write_text('{"texts": ["x", null], "images": [null, "missing.png"]}')
    with pytest.raises(ValueError, match=r"bad.json: images\[1\] = 'missing.png': cannot read"):
        read_document_file(tmp_path / "bad.json")
    (tmp_path / "both.json").write_text('{"texts": ["x"], "images": ["y.png"]}')
    with pytest.raises(ValueError, match=r"both.json: segment 0: texts\[0\] and images\[0\] are both set"):
        read_document_file(tmp_path / "both.json")


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()
