"""A run's text tokenizer: a sentencepiece ``.model`` (+ sidecar) trained by mmtrain
(:class:`~mmtrain.tokenize.text.TextTokenizer`), or a Hugging Face tokenizer directory, e.g. a pretrained
LLaMA-family model's (:class:`~mmtrain.tokenize.hf_text.HFTextTokenizer`, which imports transformers only
when one is loaded). Both have the same interface (ids, encode, encode_batch, decode, fingerprint,
check_matches, state). The run keeps its own copy under ``<run_dir>/tokenizer/``: ``text.model`` +
``text.json``, or ``text_hf/``.
"""
from __future__ import annotations

from pathlib import Path

from mmtrain.atomic import atomic_write_bytes
from mmtrain.tokenize.hf_text import HFTextTokenizer, is_hf_tokenizer_dir
from mmtrain.tokenize.text import TextTokenizer

AnyTextTokenizer = TextTokenizer | HFTextTokenizer
RUN_SENTENCEPIECE = "text.model"
RUN_HF_DIR = "text_hf"


def load_text_tokenizer(path: str | Path) -> AnyTextTokenizer:
    """The text tokenizer at ``path``: a :class:`TextTokenizer` for a sentencepiece ``.model`` (its ``.json``
    sidecar beside it), an :class:`~mmtrain.tokenize.hf_text.HFTextTokenizer` for a directory holding a
    Hugging Face tokenizer (``tokenizer.json``, or ``tokenizer.model`` with ``tokenizer_config.json``).

    Raises:
        FileNotFoundError / ValueError: naming ``path`` and what was expected there.
    """
    path = Path(path)
    expected = ("a sentencepiece .model file (with its .json sidecar beside it, as `mmtrain tokenizer train` writes) "
                "or a Hugging Face tokenizer directory (tokenizer.json, or tokenizer.model with tokenizer_config.json)")
    if path.is_dir():
        if is_hf_tokenizer_dir(path):
            return HFTextTokenizer(path)
        present = sorted(p.name for p in path.iterdir())[:8]
        raise FileNotFoundError(f"text tokenizer {path}: a directory without a Hugging Face tokenizer in it "
                                f"(it holds {present or 'nothing'}); expected {expected}")
    if path.suffix == ".model":
        if not path.is_file():
            raise FileNotFoundError(f"text tokenizer {path} not found; expected {expected}")
        return TextTokenizer.from_file(path)
    if not path.exists():
        raise FileNotFoundError(f"text tokenizer {path} not found; expected {expected}")
    raise ValueError(f"text tokenizer {path}: not a .model file or a directory; expected {expected}")


def run_text_tokenizer_path(run_dir: str | Path) -> Path:
    """The run's own copy of its text tokenizer: ``tokenizer/text.model`` when present, else ``tokenizer/text_hf``
    when present, else ``tokenizer/text.model`` (where a new sentencepiece copy goes)."""
    tok_dir = Path(run_dir) / "tokenizer"
    if not (tok_dir / RUN_SENTENCEPIECE).is_file() and (tok_dir / RUN_HF_DIR).is_dir():
        return tok_dir / RUN_HF_DIR
    return tok_dir / RUN_SENTENCEPIECE


def copy_run_tokenizer(tok: AnyTextTokenizer, tok_dir: str | Path) -> Path:
    """Copy ``tok`` into a run's ``tokenizer/`` folder ``tok_dir``: a sentencepiece tokenizer as ``text.model`` +
    ``text.json`` (sidecar first: a reader that sees ``text.model`` always finds ``text.json``), a Hugging Face
    one as ``text_hf/``; every file written under a temp name, then renamed. A copy onto itself writes nothing.
    Returns the copy's path (what :func:`run_text_tokenizer_path` then finds)."""
    tok_dir = Path(tok_dir)
    tok_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(tok, TextTokenizer):
        if tok.model_path is None:
            raise ValueError("copy_run_tokenizer: the sentencepiece tokenizer was not loaded from a file (no model_path)")
        src, dst = Path(tok.model_path), tok_dir / RUN_SENTENCEPIECE
        for suffix in (".json", ".model"):
            if src.with_suffix(suffix).resolve() != dst.with_suffix(suffix).resolve():
                atomic_write_bytes(dst.with_suffix(suffix), src.with_suffix(suffix).read_bytes())
        return dst
    return tok.save_to(tok_dir / RUN_HF_DIR)
