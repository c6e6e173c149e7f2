"""The training loader on documents (several images and text spans per sample): what it reads,
exact resume over ranks and workers, mixing with pair sources by weight, shuffle windows, S3,
bad-sample substitution -- the pair loader's guarantees (tests/test_loader.py), extended -- and
micro-batches of documents compile to a bounded set of static shapes (tests/test_static_shapes.py).

Real data throughout: shape stories (``write_story_shards``), synthetic pairs
(``write_synthetic_shards``), a sentencepiece tokenizer trained on both, real DataLoader workers,
the session's moto S3 server.
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from storage_servers import BUCKET, restore_env, set_env
from test_loader import keys, take

from mmtrain.components.data import Batch, DataConfig, build_train_loader
from mmtrain.data import storage
from mmtrain.data.documents import DocImage, Document, to_wds_members, write_document_shards
from mmtrain.data.images import decode_image
from mmtrain.data.order import CHUNK
from mmtrain.data.shards import ShardDataError, ShardWriter
from mmtrain.data.sources import iter_documents, iter_samples
from mmtrain.data.stories import StoryConfig, make_story, story_document, write_story_shards
from mmtrain.data.synthetic import SyntheticConfig, write_synthetic_shards
from mmtrain.tokenize.text import TextTokenizer, TextTokenizerConfig, train_text_tokenizer

N_STORIES, N_PAIRS, PER_SHARD = 48, 24, 8  # 6 story shards, 3 pair shards
N_TEXTS = 12  # text-only documents (prep text's output), 2 shards
SIZE = 32  # stored and loaded image size: decoding is exact (PNG, no resize)
MAX_IMAGES = 3  # stories have 2-4 scenes: some are cut
MAX_TEXT = 48


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("doc_loader")
    story_cfg = StoryConfig(image_size=SIZE)
    write_story_shards(root / "stories", N_STORIES, story_cfg, samples_per_shard=PER_SHARD)
    write_synthetic_shards(root / "pairs", N_PAIRS, SyntheticConfig(seed=0, image_size=SIZE), samples_per_shard=PER_SHARD,
                           progress=False)
    stories = {d.key: d for d in iter_documents(root / "stories" / "train")}
    pairs = {s["key"]: s for s in iter_samples(root / "pairs")}
    texts = [t for d in stories.values() for t in d.texts] + [s["caption"] for s in pairs.values()]
    tok = train_text_tokenizer(texts, root / "tok", TextTokenizerConfig(), progress=False)
    # a document shard with an undecodable image in document 2 (its 2nd image), written member by member:
    # write_document_shards checks images and would leave it out (asserted below)
    bad_docs = [story_document(make_story(i, story_cfg)) for i in range(6)]
    segs = list(bad_docs[2].segments)
    second = [n for n, s in enumerate(segs) if isinstance(s, DocImage)][1]
    segs[second] = DocImage(b"not an image", "png")
    bad_docs[2].segments = segs
    with ShardWriter(root / "bad", "bad", samples_per_shard=100) as writer:
        for doc in bad_docs:
            writer.write({"__key__": doc.key, **to_wds_members(doc)})
    # a text corpus as text-only documents, as `prep text` writes it (some two spans, as --max-text-tokens cuts)
    texts = [Document(f"t{i}", [f"plain text {i}: the red circle is above the blue square"] + ["and it stays"] * (i % 2))
             for i in range(N_TEXTS)]
    write_document_shards(texts, root / "texts", samples_per_shard=PER_SHARD)
    return {"root": root, "stories": str(root / "stories" / "train"), "pairs": str(root / "pairs"), "bad": str(root / "bad"),
            "texts": str(root / "texts" / "train"), "text_docs": {d.key: d for d in texts},
            "cache": str(root / "index_cache"), "tok": tok, "story_docs": stories, "pair_samples": pairs,
            "bad_docs": bad_docs}


def cfg_for(docs: dict, sources: list[dict], **kw) -> DataConfig:
    return DataConfig(sources=sources, index_cache=kw.pop("index_cache", docs["cache"]), image_size=SIZE,
                      num_workers=kw.pop("num_workers", 0), **kw)


def doc_take(docs: dict, cfg: DataConfig, n: int, B: int, **kw) -> list[Batch]:
    return take(cfg, n, B, text_tokenizer=docs["tok"], max_text_len=MAX_TEXT, max_images=MAX_IMAGES, **kw)


def expected_segments(tok: TextTokenizer, stored: list, max_images: int = MAX_IMAGES) -> tuple[list, str]:
    """A stored document as the loader must give it: text spans as token ids (no <s>/</s>), images
    decoded, cut before the image over ``max_images``; and the text it keeps (``Batch.captions``)."""
    out, texts, n = [], [], 0
    for seg in stored:
        if isinstance(seg, str):
            out.append(np.asarray(tok.encode(seg, bos=False, eos=False), dtype=np.int64))
            texts.append(seg)
            continue
        if n == max_images:
            break
        out.append(decode_image(seg, SIZE, "center_crop", True, "expected"))
        n += 1
    return out, " ".join(texts)


def content(b: Batch, i: int) -> list[np.ndarray]:
    """Document ``i`` of ``b`` with its images as pixels (rows resolved)."""
    return [b.pixels[s].numpy() if isinstance(s, int) else s for s in b.documents[i]]


def assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys == y.keys and x.pairs == y.pairs and x.captions == y.captions and x.substituted == y.substituted
        assert torch.equal(x.positions, y.positions) and torch.equal(x.pixels, y.pixels)
        assert len(x.documents) == len(y.documents)
        for dx, dy in zip(x.documents, y.documents):
            assert len(dx) == len(dy)
            for sx, sy in zip(dx, dy):
                if isinstance(sx, int):
                    assert isinstance(sy, int) and sx == sy
                else:
                    assert not isinstance(sy, int) and np.array_equal(sx, sy)


# --------------------------------------------------------------------------- what a batch holds


def test_document_batches_hold_what_the_shards_store_tokenized_decoded_cut_and_padded(docs):
    tok, B = docs["tok"], 4
    cfg = cfg_for(docs, [{"path": docs["stories"]}, {"path": docs["pairs"]}])
    batches = doc_take(docs, cfg, 10, B, seed=4)
    padded = cut = n_pairs = 0
    for b in batches:
        assert len(b.documents) == len(b.pairs) == len(b.keys) == B and b.text is None
        row = 0
        for k, doc, pair, caption in zip(b.keys, b.documents, b.pairs, b.captions):
            source, key = k.split(":")
            if source == "0":
                stored = docs["story_docs"][key].segments
                want, text = expected_segments(tok, [s if isinstance(s, str) else s.data for s in stored])
                assert pair is False and caption == text
                cut += sum(isinstance(s, DocImage) for s in stored) > MAX_IMAGES
            else:
                sample = docs["pair_samples"][key]
                want = [np.asarray(tok.encode(sample["caption"], bos=False, eos=False), dtype=np.int64),
                        np.asarray(sample["image"])]
                assert pair is True and caption == sample["caption"]
                n_pairs += 1
            assert len(doc) == len(want), k
            for got, ref in zip(doc, want):
                if ref.ndim == 1:  # a text span
                    assert isinstance(got, np.ndarray) and got.dtype == np.int64 and np.array_equal(got, ref), k
                else:  # an image: the next row of pixels, in reading order
                    assert isinstance(got, int) and got == row, k
                    assert np.array_equal(b.pixels[row].numpy(), ref), k
                    row += 1
        assert b.pixels.dtype == torch.uint8 and b.pixels.shape[1:] == (SIZE, SIZE, 3)
        assert b.pixels.shape[0] == max(-(-row // B) * B, B)  # a multiple of B: at most MAX_IMAGES shapes
        assert not b.pixels[row:].any()  # padding rows are black
        padded += b.pixels.shape[0] > row
    assert padded and cut and n_pairs  # every case was met


# --------------------------------------------------------------------------- resume, ranks, workers


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_resume_is_exact_over_two_ranks_and_does_not_depend_on_num_workers(docs, mode):
    cfg = cfg_for(docs, [{"path": docs["stories"], "weight": 1}, {"path": docs["pairs"], "weight": 2}], mode=mode)
    B, W, N = 3, 2, 9  # 2N * B * W = 108 positions: past the end of the epoch (48 + 2 * 24 = 96)
    for r in range(W):
        full = doc_take(docs, cfg, 2 * N, B, rank=r, W=W, seed=5)
        with_workers = doc_take(docs, cfg_for(docs, cfg.sources, mode=mode, num_workers=2), 2 * N, B, rank=r, W=W, seed=5)
        assert_same_batches(with_workers, full)
        resumed = doc_take(docs, cfg, N, B, rank=r, W=W, seed=5, start=N * B * W)  # start_sample = samples_seen
        assert_same_batches(resumed, full[N:])
        assert [p for b in full for p in b.positions.tolist()] == \
            [g * B * W + r * B + i for g in range(2 * N) for i in range(B)]
        assert max(e for b in full for e in b.epochs.tolist()) >= 1  # resumed past an epoch (resampled: a source pass)
    assert keys(doc_take(docs, cfg, 2, B, seed=6)) != keys(doc_take(docs, cfg, 2, B, seed=5))  # the seed matters


# --------------------------------------------------------------------------- mixing with pairs


def test_documents_and_pairs_mix_by_weight(docs):
    B = 4
    sources = [{"path": docs["stories"], "weight": 3}, {"path": docs["pairs"], "weight": 1}]
    epoch_len = 3 * N_STORIES + N_PAIRS  # 168 = 42 batches
    batches = doc_take(docs, cfg_for(docs, sources), epoch_len // B, B, seed=2)
    counts = Counter(keys(batches))
    # epoch mode: every story three times, every pair once in the epoch
    assert counts == {**{f"0:{k}": 3 for k in docs["story_docs"]}, **{f"1:{k}": 1 for k in docs["pair_samples"]}}
    for b in batches:
        for k, doc, pair in zip(b.keys, b.documents, b.pairs):
            assert pair == k.startswith("1:")
            if pair:  # [caption, image]
                assert len(doc) == 2 and isinstance(doc[0], np.ndarray) and isinstance(doc[1], int)
    # resampled: each source's share of the stream is its weight's, the loader reading the order's draws
    resampled = cfg_for(docs, sources, mode="resampled")
    batches = doc_take(docs, resampled, 100, 8, seed=1)
    got = np.array([int(k.split(":")[0]) for k in keys(batches)])
    assert abs(got.mean() - 0.25) < 0.04
    order = build_train_loader(resampled, 8, 0, world_size=1, seed=1, start_sample=0, text_tokenizer=docs["tok"],
                               max_text_len=MAX_TEXT, max_images=MAX_IMAGES).dataset.order
    assert np.array_equal(order.lookup(np.arange(800))[0], got)
    assert abs(order.lookup(np.arange(CHUNK))[0].mean() - 0.25) < 1e-4  # exact over a chunk of the stream


def test_text_only_documents_mix_by_weight_keep_static_shapes_and_train_the_text_path(docs):
    """A text corpus (text-only documents) mixed by weight with pairs and stories: its documents hold
    text spans only and no image row; a batch of only text documents still has B black pixel rows
    (static shapes); laid out, it has no image slot, and the training forward + backward gives a
    diffusion loss of exactly 0 (not NaN: no noisy token) and a finite text loss whose gradient
    reaches the text path; a batch mixing them with images trains both. Resume stays exact."""
    from mmtrain.models.causalfusion import CLEAN, NOISY, CausalFusion, ModelConfig
    from mmtrain.models.diffusion import DiffusionConfig, build_diffusion
    from mmtrain.models.document_layout import document_training_inputs
    from mmtrain.tokenize.image import patchify

    tok, B = docs["tok"], 4
    sources = [{"path": docs["texts"], "weight": 2}, {"path": docs["pairs"], "weight": 1},
               {"path": docs["stories"], "weight": 0.25}]
    epoch_len = 2 * N_TEXTS + N_PAIRS + N_STORIES // 4  # 60 = 15 batches
    batches = doc_take(docs, cfg_for(docs, sources), epoch_len // B, B, seed=3)
    counts = Counter(keys(batches))
    assert {k: n for k, n in counts.items() if k[0] != "2"} == {**{f"0:{k}": 2 for k in docs["text_docs"]},
                                                               **{f"1:{k}": 1 for k in docs["pair_samples"]}}
    assert sum(k[0] == "2" for k in counts) == N_STORIES // 4 and set(counts.values()) == {1, 2}
    for b in batches:
        for k, doc, pair, caption in zip(b.keys, b.documents, b.pairs, b.captions):
            if k.startswith("0:"):
                stored = docs["text_docs"][k[2:]].segments
                assert pair is False and caption == " ".join(stored) and len(doc) == len(stored)
                for got, text in zip(doc, stored):
                    assert isinstance(got, np.ndarray) and got.tolist() == tok.encode(text, bos=False, eos=False)
    assert_same_batches(doc_take(docs, cfg_for(docs, sources), 3, B, seed=3, start=9 * B), batches[9:12])
    only_text = doc_take(docs, cfg_for(docs, [{"path": docs["texts"]}]), 2, B, seed=1)
    for b in only_text:
        assert b.pixels.shape == (B, SIZE, SIZE, 3) and b.pixels.dtype == torch.uint8 and not b.pixels.any()
        assert not any(isinstance(s, int) for d in b.documents for s in d) and b.pairs == [False] * B
    mixed = next(b for b in batches if any(k.startswith("0:") for k in b.keys) and b.pixels.any())

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, depth=1, num_heads=2, patch_size=8, max_text_len=MAX_TEXT, max_images=MAX_IMAGES,
                      caption_prob=0.0, cond_drop_prob=0.0)
    special = {"pad": tok.pad_id, "bos": tok.bos_id, "eos": tok.eos_id, "boi": tok.boi_id, "eoi": tok.eoi_id}
    model = CausalFusion(cfg, latent_channels=3, latent_size=SIZE, vocab_size=tok.vocab_size, special_ids=special).train()
    torch.nn.init.normal_(model.diffusion_head.weight, std=0.05)  # zero at init: give the diffusion loss a gradient
    diffusion = build_diffusion(DiffusionConfig())
    for b, has_images in ((only_text[0], False), (mixed, True)):
        model.zero_grad()
        inputs = document_training_inputs(model, patchify(b.images, cfg.patch_size), b.documents, b.pairs, diffusion,
                                          torch.Generator().manual_seed(0), random.Random(0))
        kind = inputs["layout"].kind
        assert bool(((kind == CLEAN) | (kind == NOISY)).any()) == has_images
        out = model(**inputs)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and torch.isfinite(out["text_loss"]) and out["text_loss"] > 0
        assert int(out["text_tokens"]) > 0 and (int(out["image_tokens"]) > 0) == has_images
        assert (out["diffusion_loss"] > 0) if has_images else (out["diffusion_loss"] == 0)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert grads["lm_head.weight"].abs().sum() > 0 and grads["tok_embed.weight"].abs().sum() > 0
        assert (grads["diffusion_head.weight"].abs().sum() > 0) == has_images


# --------------------------------------------------------------------------- shuffle windows


def test_shuffle_window_reads_document_shards_window_by_window(docs):
    B, window = 4, 2
    tars = sorted(Path(docs["stories"]).glob("*.tar"))
    shard_of = {d.key: n for n, tar in enumerate(tars) for d in iter_documents(tar)}
    assert len(tars) == N_STORIES // PER_SHARD and len(shard_of) == N_STORIES
    cfg = cfg_for(docs, [{"path": docs["stories"]}], shuffle_window=window)
    batches = doc_take(docs, cfg, 2 * N_STORIES // B, B, seed=3)  # two epochs
    stream = [k.split(":")[1] for k in keys(batches)]
    per_window = window * PER_SHARD
    windows = []
    for e in range(2):
        epoch = stream[e * N_STORIES:(e + 1) * N_STORIES]
        assert sorted(epoch) == sorted(docs["story_docs"])  # every document once per epoch
        for w in range(N_STORIES // per_window):
            shards = {shard_of[k] for k in epoch[w * per_window:(w + 1) * per_window]}
            assert len(shards) == window  # a window reads its shards only
            windows.append(frozenset(shards))
            # and mixes them: not one shard, then the other
            assert len({shard_of[k] for k in epoch[w * per_window:w * per_window + PER_SHARD]}) > 1
    assert windows[:3] != windows[3:]  # the next epoch draws other windows
    # without windows, the first 16 positions draw from all over the dataset
    whole = keys(doc_take(docs, cfg_for(docs, [{"path": docs["stories"]}]), per_window // B, B, seed=3))
    assert len({shard_of[k.split(":")[1]] for k in whole}) > window


# --------------------------------------------------------------------------- remote


@pytest.fixture(scope="module")
def s3_docs(s3_server, docs, tmp_path_factory) -> dict:
    """The stories and pairs uploaded to the session's S3 server (shards and their sidecar indexes)."""
    scratch = tmp_path_factory.mktemp("doc_s3env")
    old = set_env({**s3_server.env(), "MMTRAIN_IO_BACKOFF_S": "0.01", "MMTRAIN_STAGING_DIR": str(scratch / "staging"),
                   "MMTRAIN_CACHE_DIR": str(scratch / "default_cache")})
    urls = {}
    for name in ("stories", "pairs"):
        url = f"s3://{BUCKET}/doc_loader/{name}"
        for f in sorted(Path(docs[name]).iterdir()):
            if f.name.endswith((".tar", ".tar.index.json")):
                storage.store_for(url).upload(str(f), f"{url}/{f.name}")
        urls[name] = url
    yield urls
    restore_env(old)


def test_documents_from_s3_are_the_local_batches(docs, s3_docs, tmp_path):
    B, n = 4, 10
    weights = (2, 1)
    local = doc_take(docs, cfg_for(docs, [{"path": docs[s], "weight": w} for s, w in zip(("stories", "pairs"), weights)],
                                   shuffle_window=2), n, B, seed=9)
    before = storage.io_snapshot()
    remote_cfg = cfg_for(docs, [{"path": s3_docs[s], "weight": w} for s, w in zip(("stories", "pairs"), weights)],
                         shuffle_window=2, index_cache="", cache_dir=str(tmp_path / "cache"))
    remote = doc_take(docs, remote_cfg, n, B, seed=9)
    assert storage.io_snapshot()["shard_downloads"] - before["shard_downloads"] > 0  # it did read the bucket
    assert_same_batches(remote, local)
    assert_same_batches(doc_take(docs, cfg_for(docs, remote_cfg.sources, shuffle_window=2, index_cache="", num_workers=2,
                                               cache_dir=str(tmp_path / "cache2")), n, B, seed=9), local)


# --------------------------------------------------------------------------- bad samples


def test_write_document_shards_would_drop_the_bad_image(docs, tmp_path):
    """Why the bad shard is written member by member: the writer checks images and leaves this one out."""
    stats = write_document_shards([docs["bad_docs"][2]], tmp_path / "w")
    assert stats["dropped_images"]["image_undecodable"] == 1
    (stored,) = [d for d in iter_documents(docs["bad"]) if d.key == docs["bad_docs"][2].key]
    assert b"not an image" in [s.data for s in stored.images]  # what the loader meets


def test_document_with_an_undecodable_image_is_replaced_by_the_next_one(docs, caplog):
    cfg = DataConfig(train_shards=docs["bad"], shuffle=False, image_size=SIZE, index_cache="", num_workers=0)
    k = [d.key for d in docs["bad_docs"]]
    with caplog.at_level(logging.WARNING, logger="mmtrain.data"):
        (b,) = doc_take(docs, cfg, 1, 6)
    assert b.keys == [f"0:{k[0]}", f"0:{k[1]}", f"0:{k[3]}", f"0:{k[3]}", f"0:{k[4]}", f"0:{k[5]}"]
    assert b.substituted == 1
    # the substitute is the next document, read whole
    assert all(np.array_equal(x, y) for x, y in zip(content(b, 2), content(b, 3))) and len(content(b, 2)) == len(content(b, 3))
    assert b.captions[2] == b.captions[3] and b.pairs == [False] * 6
    rows = [s for d in b.documents for s in d if isinstance(s, int)]
    assert rows == list(range(len(rows))) and b.pixels.shape[0] == -(-len(rows) // 6) * 6  # no row of the bad one left
    assert "bad-000000.tar" in caplog.text and k[2] in caplog.text and "cannot decode image" in caplog.text
    # deterministic: the same in worker processes
    assert_same_batches(doc_take(docs, DataConfig(train_shards=docs["bad"], shuffle=False, image_size=SIZE, index_cache="",
                                                  num_workers=2), 1, 6), [b])
    with pytest.raises(ShardDataError, match=rf"bad-000000\.tar.*{k[2]}"):
        doc_take(docs, DataConfig(train_shards=docs["bad"], shuffle=False, image_size=SIZE, index_cache="", num_workers=0,
                                  max_bad_samples=0), 1, 6)


def test_a_document_over_the_text_budget_is_reported_once(docs, caplog):
    """The layout keeps the first model.max_text_len text slots of a document; the loader says so
    once, naming the document and both lengths, as it does for captions."""
    cfg = DataConfig(train_shards=docs["stories"], shuffle=False, image_size=SIZE, index_cache=docs["cache"], num_workers=0)
    with caplog.at_level(logging.WARNING, logger="mmtrain.data"):
        take(cfg, 2, 4, text_tokenizer=docs["tok"], max_text_len=6, max_images=MAX_IMAGES)
    cut = [r.getMessage() for r in caplog.records if "max_text_len" in r.getMessage()]
    assert len(cut) == 1 and cut[0].startswith("text of document 0:") and "model.max_text_len=6 keeps the first 6" in cut[0]
    assert "documents read were cut" in cut[0]


# --------------------------------------------------------------------------- static shapes


def test_document_micro_batches_compile_fullgraph_to_a_bounded_set_of_graphs(docs):
    """Micro-batches of documents as the loader gives them (2-4 images cut to MAX_IMAGES, pairs mixed
    in, text of every length), laid out by ``document_training_inputs``, through the training
    forward and backward compiled with ``fullgraph=True`` (a host read would be a graph break, an
    error here) -- tests/test_static_shapes.py's way, graphs counted with ``aot_eager``.

    The bound: the image rows M are a multiple of B (<= MAX_IMAGES * B: MAX_IMAGES values), the
    row length N is fixed (``model.pack_length``, else the budget's longest document), the row
    count R a multiple of ``ceil(B / seq_buckets)`` that is <= B (every document fits one row):
    at most MAX_IMAGES * seq_buckets shapes, each one graph, whatever the documents."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from mmtrain.models.causalfusion import CausalFusion, ModelConfig
    from mmtrain.models.diffusion import DiffusionConfig, build_diffusion
    from mmtrain.models.document_layout import document_slots_length, document_training_inputs
    from mmtrain.tokenize.image import patchify

    tok, B, buckets = docs["tok"], 4, 2
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, depth=1, num_heads=2, patch_size=8, max_text_len=MAX_TEXT, max_images=MAX_IMAGES,
                      seq_buckets=buckets, caption_prob=0.3)
    special = {"pad": tok.pad_id, "bos": tok.bos_id, "eos": tok.eos_id, "boi": tok.boi_id, "eoi": tok.eoi_id}
    model = CausalFusion(cfg, latent_channels=3, latent_size=SIZE, vocab_size=tok.vocab_size, special_ids=special).train()
    torch.nn.init.normal_(model.diffusion_head.weight, std=0.05)  # zero at init: give the loss a gradient everywhere
    diffusion = build_diffusion(DiffusionConfig())
    batches = doc_take(docs, cfg_for(docs, [{"path": docs["stories"], "weight": 1}, {"path": docs["pairs"], "weight": 2}]),
                       12, B, seed=8)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(lambda **batch: model(**batch)["loss"], backend=counter, fullgraph=True, dynamic=False)
    shapes, image_counts = set(), set()
    try:
        for seed, b in enumerate(batches):
            tokens = patchify(b.images, cfg.patch_size)  # M, L, P (pixel space: the identity image tokenizer)
            inputs = document_training_inputs(model, tokens, b.documents, b.pairs, diffusion,
                                              torch.Generator().manual_seed(seed), random.Random(seed))
            M, R, N = tokens.shape[0], *inputs["layout"].kind.shape
            assert M % B == 0 and R % -(-B // buckets) == 0 and R <= B
            assert N == document_slots_length(cfg, model.num_image_tokens)
            shapes.add((M, R))
            image_counts.add(sum(isinstance(s, int) for d in b.documents for s in d))
            loss = forward(**inputs)
            loss.backward()
            assert torch.isfinite(loss)
    finally:
        torch._dynamo.reset()
    assert len(image_counts) > len({m for m, _ in shapes}) > 1  # the documents did vary, the shapes less
    assert counter.frame_count == len(shapes) <= MAX_IMAGES * buckets, (counter.frame_count, shapes)
