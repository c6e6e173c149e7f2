"""SentencePiece text tokenizer: training, loading, encoding and fingerprinting.

A trained tokenizer is two files written side by side:

* ``{prefix}.model`` -- the raw SentencePiece model proto.
* ``{prefix}.json``  -- a sidecar with the facts the rest of the system checks
  (actual vocab size, special token ids, sha256 of the ``.model`` bytes, ...).

The sha256 of the ``.model`` bytes is the tokenizer's *fingerprint*. Token ids
only mean something relative to one exact model, so checkpoints and
pre-tokenized shards record the fingerprint and compare it on load with
:meth:`TextTokenizer.check_matches`.

Special tokens have fixed ids (see :data:`SPECIAL_TOKENS`) so that model code
can rely on them without loading the tokenizer:

====  ==========  ===  =====================================================
name  piece       id   how it is produced
====  ==========  ===  =====================================================
pad   ``<pad>``   0    SentencePiece control symbol (never from text)
unk   ``<unk>``   1    characters the model cannot represent
bos   ``<s>``     2    SentencePiece control symbol (never from text)
eos   ``</s>``    3    SentencePiece control symbol (never from text)
boi   ``<boi>``   4    user-defined symbol: only if literally written in text
eoi   ``<eoi>``   5    user-defined symbol: only if literally written in text
====  ==========  ===  =====================================================
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from tqdm import tqdm

from mmtrain.atomic import atomic_write_bytes
from mmtrain.errors import ConfigError

# name -> (piece, fixed id). Order matters: ids are assigned by position below.
SPECIAL_TOKENS: dict[str, tuple[str, int]] = {
    "pad": ("<pad>", 0),
    "unk": ("<unk>", 1),
    "bos": ("<s>", 2),
    "eos": ("</s>", 3),
    "boi": ("<boi>", 4),
    "eoi": ("<eoi>", 5),
}

MODEL_TYPES = ("bpe", "unigram")
# byte_fallback reserves one piece per byte value on top of the special tokens.
BYTE_FALLBACK_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
SIDECAR_FORMAT_VERSION = 1


class TokenizerMismatchError(ValueError):
    """Raised when a tokenizer differs from the one data/checkpoints were made with."""


@dataclass
class TextTokenizerConfig:
    """Recipe for training a SentencePiece tokenizer (see ``tokenizers/text_bpe.yaml``).

    Attributes:
        vocab_size: Requested number of pieces, specials included. Default 256.
            This is an upper bound: training uses ``hard_vocab_limit=False`` so a
            small corpus that cannot fill it still trains; the sidecar JSON
            records the actual size.
        model_type: ``"bpe"`` or ``"unigram"``. Default ``"bpe"``.
        character_coverage: Fraction of characters the model must cover; rarer
            characters become ``<unk>`` (or bytes with byte_fallback).
            Default 1.0 (keep every character seen in training).
        byte_fallback: Encode unseen characters as UTF-8 byte pieces instead of
            ``<unk>``. Needs ``vocab_size >= 262`` (256 bytes + 6 specials) plus
            room for the corpus' characters. Default False so that the default
            vocab_size of 256 trains; enable it with a larger vocab.
        max_sentences: Training uses at most the first this-many non-empty
            texts (the rest of the iterable is not read). Default 1_000_000.
        seed: Seed for SentencePiece's random generator (sentence sampling,
            unigram EM). Default 0.
    """

    vocab_size: int = 256
    model_type: str = "bpe"
    character_coverage: float = 1.0
    byte_fallback: bool = False
    max_sentences: int = 1_000_000
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the offending field; called on construction and before training."""
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"TextTokenizerConfig.model_type: expected one of {list(MODEL_TYPES)}, "
                f"got {self.model_type!r}"
            )
        if not isinstance(self.vocab_size, int) or self.vocab_size <= len(SPECIAL_TOKENS):
            raise ConfigError(
                f"TextTokenizerConfig.vocab_size: expected an int > {len(SPECIAL_TOKENS)} "
                f"(the special tokens alone take {len(SPECIAL_TOKENS)}), got {self.vocab_size!r}"
            )
        if not 0.0 < float(self.character_coverage) <= 1.0:
            raise ConfigError(
                "TextTokenizerConfig.character_coverage: expected a value in (0, 1], "
                f"got {self.character_coverage!r}"
            )
        if not isinstance(self.max_sentences, int) or self.max_sentences < 1:
            raise ConfigError(
                f"TextTokenizerConfig.max_sentences: expected an int >= 1, got {self.max_sentences!r}"
            )
        if self.byte_fallback and self.vocab_size < BYTE_FALLBACK_MIN_VOCAB:
            raise ConfigError(
                f"TextTokenizerConfig: byte_fallback=True needs vocab_size >= "
                f"{BYTE_FALLBACK_MIN_VOCAB} (256 byte pieces + {len(SPECIAL_TOKENS)} special "
                f"tokens, plus one per distinct character in the corpus), got "
                f"vocab_size={self.vocab_size}; raise vocab_size or set byte_fallback: false"
            )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def training_texts(shards: Sequence[str], text_files: Sequence[str]) -> Iterator[str]:
    """What ``mmtrain tokenizer train`` trains on: the captions of ``shards`` (webdataset or MDS, local
    or URLs; images are neither read nor decoded), or the text spans of document shards, then the
    lines of ``text_files``."""
    from mmtrain.data.sources import iter_texts

    for path in shards:
        yield from iter_texts(path)
    for path in text_files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--text {path}: no such file")
        with open(path, encoding="utf-8") as fh:
            yield from (line.rstrip("\n") for line in fh)


def train_text_tokenizer(
    texts: Iterable[str],
    out_prefix: str | Path,
    cfg: TextTokenizerConfig,
    progress: bool = True,
) -> "TextTokenizer":
    """Train a SentencePiece model and write ``{out_prefix}.model`` + ``{out_prefix}.json``.

    Args:
        texts: Training strings; empty/whitespace-only ones are skipped. Only
            the first ``cfg.max_sentences`` non-empty texts are consumed, so an
            endless stream is fine.
        out_prefix: Output path without extension; parent dirs are created.
        cfg: Training recipe.
        progress: Show a tqdm bar while collecting texts. Default True.

    Returns:
        The trained tokenizer (same bytes as the written .model, model_path set).
    """
    cfg.validate()  # fields may have been edited after construction
    out_prefix = Path(out_prefix)
    model_path = Path(f"{out_prefix}.model")
    json_path = Path(f"{out_prefix}.json")

    # Collect first (instead of streaming into the trainer) so we can count
    # sentences, type-check them and fail before SentencePiece's C++ does.
    sentences: list[str] = []
    # A sized input gives the bar a real total; a stream just counts (its length is
    # unknown, and the cap as a total would show a false ETA)
    total = min(len(texts), cfg.max_sentences) if isinstance(texts, Sized) else None
    with tqdm(total=total, desc="collect texts", unit="txt", disable=not progress) as bar:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(
                    f"train_text_tokenizer: texts[{i}] must be str, got {type(text).__name__}"
                )
            if not text.strip():
                continue
            sentences.append(text)
            bar.update(1)
            if len(sentences) >= cfg.max_sentences:
                break
    if not sentences:
        raise ValueError(f"train_text_tokenizer({model_path}): no non-empty training texts were given")

    specials = SPECIAL_TOKENS
    model_buf = io.BytesIO()
    # The generator seed is process-global in SentencePiece; set it right before training.
    spm.set_random_generator_seed(cfg.seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model_buf,
            vocab_size=cfg.vocab_size,
            model_type=cfg.model_type,
            character_coverage=cfg.character_coverage,
            byte_fallback=cfg.byte_fallback,
            # A tiny corpus cannot fill a big vocab; treat vocab_size as a cap.
            hard_vocab_limit=False,
            pad_id=specials["pad"][1],
            pad_piece=specials["pad"][0],
            unk_id=specials["unk"][1],
            unk_piece=specials["unk"][0],
            bos_id=specials["bos"][1],
            bos_piece=specials["bos"][0],
            eos_id=specials["eos"][1],
            eos_piece=specials["eos"][0],
            # User-defined symbols are placed right after the control ids (4, 5)
            # and are never split into smaller pieces.
            user_defined_symbols=[specials["boi"][0], specials["eoi"][0]],
            # One thread keeps the result (and so the fingerprint) reproducible.
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"train_text_tokenizer({model_path}): SentencePiece training failed with "
            f"vocab_size={cfg.vocab_size}, model_type={cfg.model_type!r}, "
            f"byte_fallback={cfg.byte_fallback}: {e}"
        ) from e

    model_bytes = model_buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    meta: dict[str, Any] = {
        "format_version": SIDECAR_FORMAT_VERSION,
        "model_file": model_path.name,
        "vocab_size": sp.get_piece_size(),  # actual, may be < requested
        "requested_vocab_size": cfg.vocab_size,
        "model_type": cfg.model_type,
        "character_coverage": cfg.character_coverage,
        "byte_fallback": cfg.byte_fallback,
        "seed": cfg.seed,
        "special_token_ids": {name: tok_id for name, (_, tok_id) in specials.items()},
        "special_token_pieces": {name: piece for name, (piece, _) in specials.items()},
        "sha256": _sha256(model_bytes),
        "num_training_sentences": len(sentences),
        "config": asdict(cfg),
    }
    # Model first, sidecar last: a present sidecar implies a complete model.
    atomic_write_bytes(model_path, model_bytes)
    atomic_write_bytes(json_path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return TextTokenizer(model_bytes, meta, model_path=model_path)


def batch_ids(owner: str, texts: Sequence[str], body_ids: Callable[[list[str]], list[list[int]]], max_len: int, pad_id: int,
              bos_id: int, eos_id: int, bos: bool = True, eos: bool = True,
              cut: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_batch`` of every text tokenizer: ``body_ids`` (a batch of texts -> their ids without
    specials) wrapped in bos/eos, truncated (keeping the leading bos and, if ``eos``, ending in eos) and
    right-padded to ``max_len``; ``cut`` gets ``(row, tokens before the cut)`` of each text longer.
    ``owner`` names the tokenizer in errors."""
    min_len = int(bos) + int(eos)
    if max_len < max(1, min_len):
        raise ValueError(f"{owner}.encode_batch: max_len must be >= {max(1, min_len)} (bos={bos}, eos={eos}), got {max_len}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{owner}.encode_batch: texts[{i}] must be str, got {type(t).__name__}")
    ids = torch.full((len(texts), max_len), pad_id, dtype=torch.long)  # B, L
    lengths = torch.zeros(len(texts), dtype=torch.long)  # B
    for row, body in enumerate(body_ids(list(texts)) if texts else []):
        seq = ([bos_id] if bos else []) + list(body) + ([eos_id] if eos else [])
        if len(seq) > max_len:
            if cut is not None:
                cut.append((row, len(seq)))
            seq = seq[:max_len]
            if eos:
                seq[-1] = eos_id
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        lengths[row] = len(seq)
    return ids, lengths


def visible_ids(owner: str, ids: Sequence[int] | torch.Tensor, vocab_size: int, bos_id: int, eos_id: int,
                hidden: frozenset[int]) -> list[int]:
    """``decode`` of every text tokenizer: the ids of ``ids`` (1-D) up to the first eos (a leading eos that is
    also the bos, as in tokenizers without a bos, is skipped), without the ``hidden`` ones (pad, bos, boi, eoi);
    an id outside ``[0, vocab_size)`` is an error naming ``owner``."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"{owner}.decode: expected a 1-D tensor, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    kept: list[int] = []
    for i, tok in enumerate(ids):
        tok = int(tok)
        if not 0 <= tok < vocab_size:
            raise ValueError(f"{owner}.decode: token id {tok} is out of range [0, {vocab_size})")
        if tok == eos_id:
            if i == 0 and bos_id == eos_id:
                continue
            break
        if tok not in hidden:
            kept.append(tok)
    return kept


class TextTokenizer:
    """A loaded SentencePiece model plus its sidecar metadata.

    Picklable (holds the raw model bytes), so it can be shipped to DataLoader
    workers. Build it with :func:`train_text_tokenizer` or :meth:`from_file`.
    """

    def __init__(self, model_bytes: bytes, meta: dict[str, Any], model_path: Path | None = None) -> None:
        self._model_bytes = model_bytes
        self._meta = dict(meta)
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self._fingerprint = _sha256(model_bytes)
        where = str(model_path) if model_path is not None else "<in-memory model>"
        # Model code hard-codes these ids; refuse a model that disagrees.
        for name, (piece, tok_id) in SPECIAL_TOKENS.items():
            got = self._sp.piece_to_id(piece)
            if got != tok_id:
                raise ValueError(
                    f"{where}: special token {name} {piece!r} has id {got}, expected {tok_id}; "
                    "retrain it with mmtrain.tokenize.text.train_text_tokenizer"
                )
        # Ids that decode() never renders as text.
        self._hidden_ids = frozenset({self.pad_id, self.bos_id, self.boi_id, self.eoi_id})

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        """Load ``{prefix}.model`` and its ``{prefix}.json`` sidecar.

        Raises:
            FileNotFoundError: naming whichever of the two files is missing.
            ValueError: if the path does not end in ``.model`` or the sidecar's
                sha256 does not match the model bytes.
        """
        model_path = Path(path)
        if model_path.suffix != ".model":
            raise ValueError(f"TextTokenizer.from_file: expected a path ending in .model, got {model_path}")
        json_path = model_path.with_suffix(".json")
        for p, what in ((model_path, "tokenizer model"), (json_path, "tokenizer sidecar JSON")):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{what} not found: {p} (train one with mmtrain.tokenize.text.train_text_tokenizer, "
                    "which writes both {prefix}.model and {prefix}.json)"
                )
        model_bytes = model_path.read_bytes()
        try:
            meta = json.loads(json_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_path}: not valid JSON: {e}") from e
        actual = _sha256(model_bytes)
        if meta.get("sha256") != actual:
            raise ValueError(
                f"{json_path}: field 'sha256' is {meta.get('sha256')!r} but {model_path} hashes to "
                f"{actual}; the two files do not belong together (retrain or restore the pair)"
            )
        return cls(model_bytes, meta, model_path=model_path)

    def __getstate__(self) -> dict[str, Any]:
        return {"model_bytes": self._model_bytes, "meta": self._meta, "model_path": self.model_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_bytes"], state["meta"], model_path=state["model_path"])  # type: ignore[misc]

    # ------------------------------------------------------------ properties
    @property
    def pad_id(self) -> int:
        return SPECIAL_TOKENS["pad"][1]

    @property
    def unk_id(self) -> int:
        return SPECIAL_TOKENS["unk"][1]

    @property
    def bos_id(self) -> int:
        return SPECIAL_TOKENS["bos"][1]

    @property
    def eos_id(self) -> int:
        return SPECIAL_TOKENS["eos"][1]

    @property
    def boi_id(self) -> int:
        return SPECIAL_TOKENS["boi"][1]

    @property
    def eoi_id(self) -> int:
        return SPECIAL_TOKENS["eoi"][1]

    @property
    def vocab_size(self) -> int:
        """Actual number of pieces (size the embedding table with this)."""
        return self._sp.get_piece_size()

    @property
    def fingerprint(self) -> str:
        """sha256 hex digest of the ``.model`` bytes."""
        return self._fingerprint

    def id_to_piece(self, tok_id: int) -> str:
        return self._sp.id_to_piece(tok_id)

    # -------------------------------------------------------------- encoding
    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        """Token ids for ``text``, optionally wrapped in bos/eos."""
        if not isinstance(text, str):
            raise TypeError(f"TextTokenizer.encode: expected str, got {type(text).__name__}")
        ids: list[int] = self._sp.encode(text, out_type=int)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(
        self, texts: Sequence[str], max_len: int, bos: bool = True, eos: bool = True,
        cut: list[tuple[int, int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode, truncate and right-pad a batch.

        Truncation keeps the leading bos and, if ``eos``, overwrites the last
        kept token with eos so every sequence is still properly terminated.
        ``cut``: a list that gets ``(row, tokens before the cut)`` for each text longer than
        ``max_len`` (tokens counted with bos/eos), so that the caller can say what it cut
        (a silent cut changes what a prompt asks for).

        Returns:
            ids: LongTensor ``# B, max_len`` padded with ``pad_id``.
            lengths: LongTensor ``# B`` number of non-pad tokens per row.
        """
        # Batch call into C++ rather than a Python loop over encode().
        return batch_ids("TextTokenizer", texts, lambda batch: self._sp.encode(batch, out_type=int), max_len, self.pad_id,
                         self.bos_id, self.eos_id, bos, eos, cut)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text for ``ids``: stops at the first eos, drops pad/bos/boi/eoi."""
        kept = visible_ids("TextTokenizer", ids, self.vocab_size, self.bos_id, self.eos_id, self._hidden_ids)
        return self._sp.decode(kept)

    # ------------------------------------------------------- fingerprinting
    def check_matches(self, expected_fingerprint: str, where: str) -> None:
        """Raise :class:`TokenizerMismatchError` unless this is the expected model.

        Args:
            expected_fingerprint: sha256 recorded by ``where`` (e.g. a checkpoint).
            where: Human-readable origin of the expectation, used in the message.
        """
        if expected_fingerprint == self.fingerprint:
            return
        loaded = str(self.model_path) if self.model_path is not None else "<in-memory model>"
        raise TokenizerMismatchError(
            f"text tokenizer mismatch for {where}: it was made with tokenizer sha256 "
            f"{expected_fingerprint}, but the loaded tokenizer {loaded} has sha256 {self.fingerprint}. "
            "Token ids would mean different things. Fix: point the tokenizer path at the exact "
            f".model file {where} was created with, or re-create {where} with this tokenizer."
        )

    def save_hf(self, directory: str | Path) -> None:
        """Write this model as a Hugging Face tokenizer (``LlamaTokenizer`` over the same sentencepiece
        model, legacy mode, the special pieces as special tokens) into ``directory``, for
        ``mmtrain export --hf``. It gives this tokenizer's ids on single-spaced text; runs of spaces
        and a leading space are normalised by sentencepiece here but not by transformers' fast tokenizer."""
        import tempfile

        from transformers import LlamaTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            vocab = Path(tmp) / "tokenizer.model"
            vocab.write_bytes(self._model_bytes)
            hf = LlamaTokenizer(vocab_file=str(vocab), unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                add_bos_token=True, add_eos_token=False, legacy=True,
                                additional_special_tokens=[SPECIAL_TOKENS["boi"][0], SPECIAL_TOKENS["eoi"][0]])
            hf.save_pretrained(str(directory))

    def state(self) -> dict[str, Any]:
        """The sidecar JSON content, for storing in checkpoints."""
        state = json.loads(json.dumps(self._meta))  # deep copy, JSON-safe
        # The model bytes are the source of truth for these two.
        state["sha256"] = self.fingerprint
        state["vocab_size"] = self.vocab_size
        return state
