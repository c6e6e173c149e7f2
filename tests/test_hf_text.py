"""HFTextTokenizer on tiny tokenizers made locally (sentencepiece + LlamaTokenizer, tokenizers BPE), and
llama.add_token_rows. Nothing is downloaded."""
import pytest
import sentencepiece as spm
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

from mmtrain.tokenize.hf_text import HFTextTokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog", "a cat sat on the mat", "hello world, hello tokenizer",
         "images and text go together", "the dog and the cat are friends"] * 20


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A sentencepiece tokenizer.model wrapped by transformers' LlamaTokenizer (slow), saved."""
    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_prefix=str(d / "sp"), vocab_size=60,
                                   model_type="bpe", hard_vocab_limit=False, num_threads=1, minloglevel=2,
                                   pad_id=-1, unk_id=0, bos_id=1, eos_id=2)
    tok = transformers.LlamaTokenizer(vocab_file=str(d / "sp.model"), legacy=False)
    out = d / "tok"
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A tokenizers BPE in tokenizer.json with no bos (Qwen-like) but a pad token, saved."""
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>", "<pad>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<pad>",
                                               unk_token="<unk>")
    out = tmp_path_factory.mktemp("bpe") / "tok"
    tok.save_pretrained(out)
    return out


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        HFTextTokenizer(tmp_path / "meta-llama/Llama-3-8B")


@pytest.mark.parametrize("which", ["sp", "bpe"])
def test_ids_match_hf_and_round_trip(which, sp_dir, bpe_dir):
    d = sp_dir if which == "sp" else bpe_dir
    ref = transformers.AutoTokenizer.from_pretrained(d, local_files_only=True)
    tok = HFTextTokenizer(d)
    old = len(ref)
    # <boi>/<eoi> are new special tokens past the old vocab
    assert tok.added_tokens == ["<boi>", "<eoi>"]
    assert tok.old_vocab_size == old and tok.vocab_size == old + 2
    assert {tok.boi_id, tok.eoi_id} == {old, old + 1}
    assert tok.eos_id == ref.eos_token_id
    if which == "sp":
        assert tok.bos_id == ref.bos_token_id and tok.pad_id == ref.eos_token_id  # no pad: eos
    else:
        assert tok.bos_id == tok.eos_id and tok.pad_id == ref.pad_token_id  # no bos: eos
    text = "the cat and the dog say hello"
    body = ref.encode(text, add_special_tokens=False)
    assert tok.encode(text, bos=False, eos=False) == body
    assert tok.encode(text) == [tok.bos_id] + body + [tok.eos_id]
    assert tok.decode(tok.encode(text)) == ref.decode(body) == text
    # boi/eoi are dropped by decode; written literally in text, they are one token each
    assert tok.decode([tok.bos_id, tok.boi_id] + body + [tok.eoi_id, tok.eos_id, *body]) == text
    assert tok.encode("<boi>", bos=False, eos=False) == [tok.boi_id]


def test_encode_batch_pads_and_cuts_like_text_tokenizer(bpe_dir):
    tok = HFTextTokenizer(bpe_dir)
    texts = ["the cat", "the quick brown fox jumps over the lazy dog"]
    full = [tok.encode(t) for t in texts]
    max_len = len(full[0]) + 2
    assert len(full[1]) > max_len
    cut = []
    ids, lengths = tok.encode_batch(texts, max_len=max_len, cut=cut)
    assert ids.shape == (2, max_len) and lengths.tolist() == [len(full[0]), max_len]
    assert ids[0].tolist() == full[0] + [tok.pad_id] * 2
    assert ids[1].tolist() == full[1][: max_len - 1] + [tok.eos_id]
    assert cut == [(1, len(full[1]))]
    with pytest.raises(ValueError, match="max_len"):
        tok.encode_batch(texts, max_len=1)


# --------------------------------------------------------------------------- a run's text tokenizer


def test_load_text_tokenizer_dispatch_and_errors(sp_dir, bpe_dir, tmp_path):
    from mmtrain.tokenize.run_text import load_text_tokenizer
    from mmtrain.tokenize.text import TextTokenizer, TextTokenizerConfig, train_text_tokenizer

    spm_tok = train_text_tokenizer(TEXTS, tmp_path / "own" / "text", TextTokenizerConfig(vocab_size=64), progress=False)
    assert isinstance(load_text_tokenizer(spm_tok.model_path), TextTokenizer)
    for d in (sp_dir, bpe_dir):  # tokenizer.model + tokenizer_config.json; tokenizer.json
        assert isinstance(load_text_tokenizer(d), HFTextTokenizer)
    expected = "expected a sentencepiece .model file"
    with pytest.raises(FileNotFoundError, match=f"text tokenizer {tmp_path / 'none.model'} not found; {expected}"):
        load_text_tokenizer(tmp_path / "none.model")
    with pytest.raises(FileNotFoundError, match=f"text tokenizer {tmp_path / 'own'}: a directory without a Hugging Face tokenizer"):
        load_text_tokenizer(tmp_path / "own")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=f"text tokenizer {tmp_path / 'notes.txt'}: not a .model file or a directory"):
        load_text_tokenizer(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="meta-llama/Llama-3-8B not found"):
        load_text_tokenizer(tmp_path / "meta-llama/Llama-3-8B")


def test_fingerprint_state_pickle_and_run_copy(sp_dir, bpe_dir, tmp_path):
    import json
    import pickle
    import shutil

    from mmtrain.components.checkpoint import _copy_run_files
    from mmtrain.tokenize.hf_text import fingerprint_dir
    from mmtrain.tokenize.run_text import copy_run_tokenizer, load_text_tokenizer, run_text_tokenizer_path
    from mmtrain.tokenize.text import TextTokenizerConfig, TokenizerMismatchError, train_text_tokenizer

    tok = HFTextTokenizer(bpe_dir)
    assert tok.fingerprint == HFTextTokenizer(bpe_dir).fingerprint == fingerprint_dir(bpe_dir)
    assert tok.fingerprint != HFTextTokenizer(sp_dir).fingerprint
    state = json.loads(json.dumps(tok.state()))
    assert state["kind"] == "hf" and state["sha256"] == tok.fingerprint and state["vocab_size"] == tok.vocab_size
    assert state["added_tokens"] == ["<boi>", "<eoi>"] and state["special_token_ids"]["boi"] == tok.boi_id
    assert "tokenizer.json" in state["files"]

    # pickled for DataLoader workers: the directory, reloaded
    blob = pickle.dumps(tok)
    assert len(blob) < 1000
    again = pickle.loads(blob)
    assert again.fingerprint == tok.fingerprint and again.encode("the cat") == tok.encode("the cat")

    # the run's copy: tokenizer/text_hf/, same fingerprint; checkpoints carry it along
    run = tmp_path / "run"
    assert run_text_tokenizer_path(run) == run / "tokenizer" / "text.model"  # nothing yet: where sentencepiece goes
    assert copy_run_tokenizer(tok, run / "tokenizer") == run / "tokenizer" / "text_hf"
    assert not [p for p in (run / "tokenizer" / "text_hf").iterdir() if p.name.startswith(".")]  # no temp files left
    kept = load_text_tokenizer(run_text_tokenizer_path(run))
    assert run_text_tokenizer_path(run) == run / "tokenizer" / "text_hf" and kept.fingerprint == tok.fingerprint
    kept.check_matches(tok.fingerprint, where="checkpoint step 10")
    copy_run_tokenizer(kept, run / "tokenizer")  # onto itself: nothing written
    _copy_run_files(run, run / "checkpoints" / "step00000010")
    ckpt_tok = load_text_tokenizer(run_text_tokenizer_path(run / "checkpoints" / "step00000010"))
    assert ckpt_tok.fingerprint == tok.fingerprint

    # another tokenizer, or one of its files changed: refused, naming both
    with pytest.raises(TokenizerMismatchError, match=f"checkpoint in {run}: it was made with tokenizer sha256 "
                                                     f"{HFTextTokenizer(sp_dir).fingerprint}.*{run / 'tokenizer' / 'text_hf'}"):
        kept.check_matches(HFTextTokenizer(sp_dir).fingerprint, where=f"checkpoint in {run}")
    changed = tmp_path / "changed"
    shutil.copytree(bpe_dir, changed)
    cfg = json.loads((changed / "tokenizer_config.json").read_text())
    (changed / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 7}))
    with pytest.raises(TokenizerMismatchError):
        HFTextTokenizer(changed).check_matches(tok.fingerprint, where="the run")

    # sentencepiece: text.model + text.json, which run_text_tokenizer_path prefers
    spm_tok = train_text_tokenizer(TEXTS, tmp_path / "own" / "text", TextTokenizerConfig(vocab_size=64), progress=False)
    assert copy_run_tokenizer(spm_tok, run / "tokenizer") == run / "tokenizer" / "text.model"
    assert (run / "tokenizer" / "text.json").is_file() and run_text_tokenizer_path(run) == run / "tokenizer" / "text.model"
    assert load_text_tokenizer(run_text_tokenizer_path(run)).fingerprint == spm_tok.fingerprint


def test_a_run_keeps_its_hf_tokenizer(sp_dir, bpe_dir, tmp_path):
    """_prepare_run_dir copies it to tokenizer/text_hf/, config.text_model_path then finds that copy, and
    check_run_tokenizer refuses another tokenizer for the run (before anything is written)."""
    from pathlib import Path

    from mmtrain.config import load_config
    from mmtrain.tokenize.run_text import load_text_tokenizer
    from mmtrain.tokenize.text import TokenizerMismatchError
    from mmtrain.train import _prepare_run_dir, check_run_tokenizer

    tiny = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    run = tmp_path / "run"
    cfg = load_config(tiny, [f"tokenizer.text_model={bpe_dir}", f"train.run_dir={run}"])
    tok = load_text_tokenizer(cfg.text_model_path)
    _prepare_run_dir(cfg, 0, tok)
    kept = load_config(run / "config.yaml", ["tokenizer.text_model="])
    assert kept.text_model_path == str(run / "tokenizer" / "text_hf")
    assert load_text_tokenizer(kept.text_model_path).fingerprint == tok.fingerprint
    check_run_tokenizer(kept, tok)
    other = load_config(tiny, [f"tokenizer.text_model={sp_dir}", f"train.run_dir={run}"])
    with pytest.raises(TokenizerMismatchError, match=f"tokenizer.text_model={sp_dir} vs the copy in {run / 'tokenizer' / 'text_hf'}"):
        check_run_tokenizer(other, load_text_tokenizer(sp_dir))
