"""Tests for mmtrain.tokenize (text + image tokenizers)."""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import random
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mmtrain.tokenize.build import build_image_tokenizer
from mmtrain.tokenize.image import (
    ImageTokenizer,
    ImageTokenizerConfig,
    PixelTokenizer,
    patchify,
    pil_to_tensor,
    tensor_to_pil,
    unpatchify,
)
from mmtrain.tokenize.text import (
    SPECIAL_TOKENS,
    TextTokenizer,
    TextTokenizerConfig,
    TokenizerMismatchError,
    train_text_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]

SIZES = ["small", "large", "tiny", "big", "medium"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon"]
PLACES = ["top left", "top right", "bottom left", "bottom right", "center"]


def make_captions(n: int, seed: int = 0) -> list[str]:
    """Distinct synthetic captions like those of the toy shapes dataset."""
    rng = random.Random(seed)
    caps: set[str] = set()
    while len(caps) < n:
        a = f"a {rng.choice(SIZES)} {rng.choice(COLORS)} {rng.choice(SHAPES)} at the {rng.choice(PLACES)}"
        b = f"a {rng.choice(SIZES)} {rng.choice(COLORS)} {rng.choice(SHAPES)} at the {rng.choice(PLACES)}"
        caps.add(a if rng.random() < 0.3 else f"{a} and {b}")
    return sorted(caps)


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return make_captions(500)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def tok(captions: list[str], tok_dir: Path) -> TextTokenizer:
    # Default config on purpose: it must train on a tiny caption corpus.
    return train_text_tokenizer(captions, tok_dir / "bpe", TextTokenizerConfig(), progress=False)


# ------------------------------------------------------------------ text
def test_default_config_trains_and_writes_both_files(tok: TextTokenizer, tok_dir: Path) -> None:
    assert (tok_dir / "bpe.model").is_file()
    assert (tok_dir / "bpe.json").is_file()
    # Atomic writes must not leave temp files behind.
    assert sorted(p.name for p in tok_dir.iterdir()) == ["bpe.json", "bpe.model"]
    assert 6 < tok.vocab_size <= 256


def test_sidecar_json(tok: TextTokenizer, tok_dir: Path, captions: list[str]) -> None:
    meta = json.loads((tok_dir / "bpe.json").read_text())
    model_bytes = (tok_dir / "bpe.model").read_bytes()
    assert meta["sha256"] == hashlib.sha256(model_bytes).hexdigest() == tok.fingerprint
    assert meta["vocab_size"] == tok.vocab_size  # actual, not the requested 256
    assert meta["requested_vocab_size"] == 256
    assert meta["model_type"] == "bpe"
    assert meta["num_training_sentences"] == len(captions)
    assert meta["special_token_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "boi": 4, "eoi": 5}
    assert tok.state() == meta


def test_special_token_ids(tok: TextTokenizer) -> None:
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id) == (0, 1, 2, 3, 4, 5)
    for name, (piece, tok_id) in SPECIAL_TOKENS.items():
        assert tok.id_to_piece(tok_id) == piece, name


def test_round_trip_captions(tok: TextTokenizer, captions: list[str]) -> None:
    for cap in captions[:100] + make_captions(20, seed=123):
        ids = tok.encode(cap)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert all(6 <= i < tok.vocab_size for i in ids[1:-1]), "plain text must not produce specials"
        assert tok.decode(ids) == cap
    assert tok.encode("a red star", bos=False, eos=False)[0] not in (tok.bos_id,)
    assert tok.encode("a red star", bos=False, eos=False)[-1] != tok.eos_id


def test_boi_is_single_piece_and_decode_drops_specials(tok: TextTokenizer) -> None:
    ids = tok.encode("<boi>", bos=False, eos=False)
    # SentencePiece may emit a lone word-boundary piece before it; <boi> itself is never split.
    assert ids[-1] == tok.boi_id and tok.boi_id in ids and len([i for i in ids if i != tok.boi_id]) <= 1
    assert tok.encode("<eoi>", bos=False, eos=False)[-1] == tok.eoi_id
    body = tok.encode("a red circle", bos=False, eos=False)
    ids = [tok.bos_id] + body + [tok.boi_id, tok.eoi_id, tok.pad_id] + [tok.eos_id] + body + [tok.pad_id]
    assert tok.decode(ids) == "a red circle"  # stops at eos, drops pad/bos/boi/eoi
    assert tok.decode(torch.tensor(ids)) == "a red circle"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_encode_batch_padding_and_truncation(tok: TextTokenizer, captions: list[str]) -> None:
    texts = [captions[0], "a red star", captions[-1]]
    full = [tok.encode(t) for t in texts]
    max_len = max(len(f) for f in full) + 3
    ids, lengths = tok.encode_batch(texts, max_len)
    assert ids.shape == (3, max_len) and ids.dtype == torch.long
    assert lengths.shape == (3,) and lengths.dtype == torch.long
    for row, f in enumerate(full):
        assert lengths[row] == len(f)
        assert ids[row, : len(f)].tolist() == f
        assert (ids[row, len(f) :] == tok.pad_id).all()

    short = 5
    ids, lengths = tok.encode_batch(texts, short)
    assert ids.shape == (3, short) and (lengths == short).all()
    for row, f in enumerate(full):
        assert ids[row, 0] == tok.bos_id and ids[row, -1] == tok.eos_id
        assert ids[row, 1:-1].tolist() == f[1 : short - 1]

    ids, lengths = tok.encode_batch(texts, short, bos=False, eos=False)
    assert ids[0].tolist() == tok.encode(texts[0], bos=False, eos=False)[:short]

    ids, lengths = tok.encode_batch([], 4)
    assert ids.shape == (0, 4) and lengths.shape == (0,)
    with pytest.raises(ValueError, match="max_len"):
        tok.encode_batch(texts, 1)


def test_from_file_and_pickle(tok: TextTokenizer, tok_dir: Path) -> None:
    loaded = TextTokenizer.from_file(tok_dir / "bpe.model")
    assert loaded.fingerprint == tok.fingerprint and loaded.vocab_size == tok.vocab_size
    assert loaded.encode("a big blue hexagon") == tok.encode("a big blue hexagon")
    clone = pickle.loads(pickle.dumps(loaded))
    assert clone.encode("a big blue hexagon") == tok.encode("a big blue hexagon")


def test_missing_files_error_clearly(tok: TextTokenizer, tok_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        TextTokenizer.from_file(missing)
    # Model present but sidecar missing -> the error names the .json.
    lonely = tmp_path / "lonely.model"
    lonely.write_bytes((tok_dir / "bpe.model").read_bytes())
    with pytest.raises(FileNotFoundError, match="lonely.json"):
        TextTokenizer.from_file(lonely)
    # Sidecar from another model -> sha mismatch names the field.
    (tmp_path / "lonely.json").write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(ValueError, match="sha256"):
        TextTokenizer.from_file(lonely)


def test_check_matches(tok: TextTokenizer, captions: list[str], tmp_path: Path) -> None:
    tok.check_matches(tok.fingerprint, "ckpt/step_100")  # same model: no error
    other = train_text_tokenizer(
        captions[:200], tmp_path / "small", TextTokenizerConfig(vocab_size=64), progress=False
    )
    assert other.fingerprint != tok.fingerprint
    with pytest.raises(TokenizerMismatchError) as err:
        other.check_matches(tok.fingerprint, "ckpt/step_100")
    msg = str(err.value)
    assert "ckpt/step_100" in msg and tok.fingerprint in msg and other.fingerprint in msg
    assert "Fix" in msg
    assert isinstance(err.value, ValueError)


def test_training_is_deterministic(captions: list[str], tok: TextTokenizer, tmp_path: Path) -> None:
    again = train_text_tokenizer(captions, tmp_path / "again", TextTokenizerConfig(), progress=False)
    assert again.fingerprint == tok.fingerprint


def test_unigram_and_byte_fallback(captions: list[str], tmp_path: Path) -> None:
    uni = train_text_tokenizer(captions, tmp_path / "uni", TextTokenizerConfig(model_type="unigram"), progress=False)
    assert uni.decode(uni.encode(captions[3])) == captions[3]
    bf = train_text_tokenizer(
        captions, tmp_path / "bf", TextTokenizerConfig(vocab_size=320, byte_fallback=True), progress=False
    )
    text = "a Zébra ✓"  # characters never seen in training
    assert bf.unk_id not in bf.encode(text)
    assert bf.decode(bf.encode(text)) == text


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_type.*'wordpiece'"):
        TextTokenizerConfig(model_type="wordpiece")
    with pytest.raises(ValueError, match="262"):
        TextTokenizerConfig(vocab_size=256, byte_fallback=True)
    with pytest.raises(ValueError, match="no non-empty"):
        train_text_tokenizer(["", "  "], tmp_path / "empty", TextTokenizerConfig(), progress=False)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        train_text_tokenizer(["a", 3], tmp_path / "bad", TextTokenizerConfig(), progress=False)  # type: ignore[list-item]


def test_max_sentences_caps_an_endless_stream(tmp_path: Path) -> None:
    stream = itertools.cycle(make_captions(50))
    t = train_text_tokenizer(stream, tmp_path / "cap", TextTokenizerConfig(max_sentences=120), progress=False)
    assert t.state()["num_training_sentences"] == 120


def test_yaml_recipes_match_configs() -> None:
    text_cfg = yaml.safe_load((REPO / "tokenizers" / "text_bpe.yaml").read_text())
    assert set(text_cfg) == {f.name for f in fields(TextTokenizerConfig)}
    assert TextTokenizerConfig(**text_cfg) == TextTokenizerConfig()
    img_cfg = yaml.safe_load((REPO / "tokenizers" / "pixels.yaml").read_text())
    assert ImageTokenizerConfig(**img_cfg) == ImageTokenizerConfig()


# ----------------------------------------------------------------- image
@pytest.mark.parametrize(
    "shape,p",
    [((2, 3, 8, 8), 2), ((1, 4, 6, 10), 2), ((3, 3, 12, 6), 3), ((2, 16, 4, 4), 4), ((1, 2, 5, 7), 1)],
)
def test_patchify_round_trip(shape: tuple[int, int, int, int], p: int) -> None:
    x = torch.randn(shape)
    b, c, h, w = shape
    tokens = patchify(x, p)
    assert tokens.shape == (b, (h // p) * (w // p), p * p * c)
    assert torch.equal(unpatchify(tokens, p, h, w), x)


def test_patchify_token_order_by_hand() -> None:
    # B=1, C=2, H=2, W=4; channel 1 = channel 0 + 100 so channels are distinguishable.
    c0 = torch.tensor([[0.0, 1, 2, 3], [4, 5, 6, 7]])
    x = torch.stack([c0, c0 + 100])[None]  # 1, 2, 2, 4
    tokens = patchify(x, 2)  # grid 1 x 2, token dim 2*2*2
    assert tokens.shape == (1, 2, 8)
    # Patch order row-major over the grid; inside: (p_row, p_col, channel).
    assert tokens[0, 0].tolist() == [0, 100, 1, 101, 4, 104, 5, 105]
    assert tokens[0, 1].tolist() == [2, 102, 3, 103, 6, 106, 7, 107]


def test_patchify_errors() -> None:
    with pytest.raises(ValueError, match="divisible by patch_size 2"):
        patchify(torch.zeros(1, 3, 5, 4), 2)
    with pytest.raises(ValueError, match="divisible by patch_size 2"):
        unpatchify(torch.zeros(1, 4, 12), 2, 4, 5)
    with pytest.raises(ValueError, match="tokens"):
        unpatchify(torch.zeros(1, 3, 12), 2, 4, 4)


def test_pixel_tokenizer_round_trip() -> None:
    tok = PixelTokenizer(scale_factor=2.0, shift_factor=0.5)
    assert isinstance(tok, ImageTokenizer) and isinstance(tok, torch.nn.Module)
    assert (tok.latent_channels, tok.downsample) == (3, 1)
    x = torch.rand(2, 3, 8, 6) * 2 - 1
    z = tok.encode(x)
    assert z.shape == (2, 3, 8, 6)
    assert torch.allclose(z, (x - 0.5) * 2.0)
    assert torch.allclose(tok.decode(z), x, atol=1e-6)
    assert torch.equal(PixelTokenizer().decode(PixelTokenizer().encode(x)), x)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tok.encode(torch.zeros(2, 1, 8, 8))


def test_pil_tensor_round_trip_exact() -> None:
    rng = torch.Generator().manual_seed(0)
    arr = torch.randint(0, 256, (2, 5, 7, 3), generator=rng, dtype=torch.uint8)
    arr[0, 0, :, 0] = torch.tensor([0, 1, 127, 128, 254, 255, 64], dtype=torch.uint8)  # edge values
    images = [Image.fromarray(a.numpy()) for a in arr]
    x = pil_to_tensor(images)
    assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    back = tensor_to_pil(x)
    for a, im in zip(arr, back):
        assert im.mode == "RGB" and im.size == (7, 5)
        assert torch.equal(torch.from_numpy(np.array(im)), a)
    # Every uint8 value survives.
    ramp = torch.arange(256, dtype=torch.uint8).reshape(16, 16, 1).expand(16, 16, 3).contiguous()
    im = tensor_to_pil(pil_to_tensor([Image.fromarray(ramp.numpy())]))[0]
    assert torch.equal(torch.from_numpy(np.array(im)), ramp)
    # Out-of-range values are clamped, not wrapped.
    im = tensor_to_pil(torch.full((1, 3, 2, 2), 3.0))[0]
    assert im.getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match=r"images\[1\]"):
        pil_to_tensor([Image.new("RGB", (4, 4)), Image.new("RGB", (4, 5))])


def test_build_image_tokenizer() -> None:
    tok = build_image_tokenizer(ImageTokenizerConfig(scale_factor=0.5))
    assert isinstance(tok, PixelTokenizer) and tok.scale_factor == 0.5
    with pytest.raises(ValueError, match=r"image_tokenizer\.kind.*'vqgan'.*pixels"):
        build_image_tokenizer(ImageTokenizerConfig(kind="vqgan"))
    with pytest.raises(ValueError, match="scale_factor"):
        build_image_tokenizer(ImageTokenizerConfig(scale_factor=0.0))


def test_cli_trains_unigram_from_mds_shards_and_text_files(tmp_path: Path, capsys) -> None:
    """`mmtrain tokenizer train` over an MDS dataset plus a text file: unigram, byte fallback, specials JSON."""
    from mmtrain import cli

    raw = tmp_path / "raw"
    raw.mkdir()
    rng = random.Random(0)
    words = ["red", "blue", "green", "circle", "square", "small", "large", "left", "right", "top"]
    for i in range(12):
        Image.new("RGB", (16, 16), (rng.randrange(256), 0, 0)).save(raw / f"im{i}.png")
        (raw / f"im{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(6)))
    assert cli.main(["prep", "folder", str(raw), "--out", str(tmp_path / "mds"), "--format", "mds", "--quiet"]) == 0
    extra = tmp_path / "extra.txt"
    extra.write_text("ünïcödé captions from a text file\nand a second line\n", encoding="utf-8")
    out = tmp_path / "tok" / "text"
    assert cli.main(["tokenizer", "train", "--shards", str(tmp_path / "mds" / "train"), "--text", str(extra), "--out", str(out),
                     "--model-type", "unigram", "--vocab-size", "320", "--byte-fallback", "--quiet"]) == 0
    tok = TextTokenizer.from_file(out.with_suffix(".model"))
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["special_token_ids"]["boi"] == tok.boi_id and side["config"]["model_type"] == "unigram"
    # every caption of the MDS train split and both lines of the text file were read (byte
    # fallback would round-trip any text below even if the shards had been skipped)
    index = json.loads((tmp_path / "mds" / "train" / "index.json").read_text())
    in_shards = sum(shard["samples"] for shard in index["shards"])
    assert in_shards >= 6 and side["num_training_sentences"] == in_shards + 2
    for text in ("red circle top left", "ünïcödé", "零"):  # the last one was never seen: byte fallback
        assert tok.decode(tok.encode(text)) == text
    assert cli.main(["tokenizer", "train", "--out", str(out)]) == 2
    assert "--shards" in capsys.readouterr().err


def test_tokenizer_trains_on_the_text_spans_of_document_shards_beside_captions(tmp_path: Path) -> None:
    """`mmtrain tokenizer train --shards` reads a document source's text spans (each source opened once)
    and a pair source's captions, in order; no image is decoded."""
    from mmtrain.data.sources import iter_documents, iter_samples
    from mmtrain.data.stories import StoryConfig, write_story_shards
    from mmtrain.data.synthetic import SyntheticConfig, write_synthetic_shards
    from mmtrain.tokenize.text import training_texts

    write_story_shards(tmp_path / "stories", 6, StoryConfig(image_size=32), samples_per_shard=4)
    write_synthetic_shards(tmp_path / "pairs", 5, SyntheticConfig(seed=0), progress=False)
    texts = list(training_texts([str(tmp_path / "stories" / "train"), str(tmp_path / "pairs")], []))
    spans = [t for d in iter_documents(tmp_path / "stories" / "train") for t in d.texts]
    captions = [s["caption"] for s in iter_samples(tmp_path / "pairs", want_image=False)]
    assert texts == spans + captions and any("appears" in t or "moves" in t or "disappears" in t
                                             or "turns" in t or "grows" in t or "shrinks" in t for t in spans)
