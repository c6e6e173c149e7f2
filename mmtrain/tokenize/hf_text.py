"""A Hugging Face tokenizer in a local directory, with the interface of :class:`~mmtrain.tokenize.text.TextTokenizer`.

The directory is what ``save_pretrained`` writes (``tokenizer.json`` and/or a sentencepiece
``tokenizer.model`` with ``tokenizer_config.json``); it is loaded with transformers'
``AutoTokenizer.from_pretrained(dir, local_files_only=True)``, so nothing is downloaded.

Ids:

* ``<boi>``/``<eoi>`` are the tokenizer's own tokens of those names if its vocabulary has
  them, else they are added as special tokens with new ids past the old vocabulary
  (:attr:`HFTextTokenizer.added_tokens` names those added; loading a checkpoint
  (:func:`mmtrain.models.pretrained.load_hf_weights`) gives them the mean embedding row).
* pad is the tokenizer's pad token, else its eos.
* bos is the tokenizer's bos token, else its eos (Qwen-style tokenizers have no bos).

The *fingerprint* (what checkpoints record and :meth:`HFTextTokenizer.check_matches` compares) is
the sha256 over the names and bytes of the tokenizer files in the directory
(:data:`TOKENIZER_FILES`); a run keeps its own copy of them (:meth:`HFTextTokenizer.save_to`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmtrain.atomic import atomic_write_bytes
from mmtrain.tokenize.text import TokenizerMismatchError, batch_ids, visible_ids

BOI, EOI = "<boi>", "<eoi>"
# The files of a saved tokenizer that decide its ids (what AutoTokenizer reads), hashed into the fingerprint.
TOKENIZER_FILES = ("added_tokens.json", "merges.txt", "special_tokens_map.json", "spiece.model", "tokenizer.json",
                   "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt")
# Copied along (AutoTokenizer reads config.json for the tokenizer class when tokenizer_config.json does not
# name one) but not hashed: a model directory's config says nothing about the ids.
COPIED_ALONG = ("config.json",)


def is_hf_tokenizer_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a saved Hugging Face tokenizer (``tokenizer.json``, or
    ``tokenizer.model`` with ``tokenizer_config.json``)."""
    d = Path(path)
    return d.is_dir() and ((d / "tokenizer.json").is_file()
                           or ((d / "tokenizer.model").is_file() and (d / "tokenizer_config.json").is_file()))


def tokenizer_files(directory: str | os.PathLike) -> list[str]:
    """The names of :data:`TOKENIZER_FILES` present in ``directory``, sorted."""
    return sorted(name for name in TOKENIZER_FILES if (Path(directory) / name).is_file())


def fingerprint_dir(directory: str | os.PathLike) -> str:
    """sha256 over the sorted (file name, bytes) of the tokenizer files in ``directory``."""
    h = hashlib.sha256()
    for name in tokenizer_files(directory):
        data = (Path(directory) / name).read_bytes()
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class HFTextTokenizer:
    """A local Hugging Face tokenizer exposing pad/bos/eos/boi/eoi ids, encode, encode_batch and decode."""

    def __init__(self, directory: str | os.PathLike):
        path = os.fspath(directory)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"{path!r} is not a local directory: give the path of a downloaded Hugging Face tokenizer "
                "(tokenizer.json or tokenizer.model with tokenizer_config.json); nothing is downloaded")
        from transformers import AutoTokenizer

        self.directory = path
        self.model_path = Path(path)  # as TextTokenizer.model_path: where it was loaded from
        self._fingerprint = fingerprint_dir(path)  # before loading: the files as they are now
        self.hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.old_vocab_size = len(self.hf)
        vocab = self.hf.get_vocab()
        missing = [t for t in (BOI, EOI) if t not in vocab]
        if missing:
            self.hf.add_special_tokens({"additional_special_tokens": missing},
                                       replace_additional_special_tokens=False)
        self.added_tokens: list[str] = missing
        if self.hf.eos_token_id is None:
            raise ValueError(f"{path}: the tokenizer has no eos token; mmtrain needs one to end sequences")
        self._eos = int(self.hf.eos_token_id)
        self._bos = int(self.hf.bos_token_id) if self.hf.bos_token_id is not None else self._eos
        self._pad = int(self.hf.pad_token_id) if self.hf.pad_token_id is not None else self._eos
        self._boi = int(self.hf.convert_tokens_to_ids(BOI))
        self._eoi = int(self.hf.convert_tokens_to_ids(EOI))
        # Ids that decode() never renders as text.
        self._hidden_ids = frozenset({self._pad, self._bos, self._boi, self._eoi} - {self._eos})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "HFTextTokenizer":
        return cls(directory)

    # Workers of a DataLoader read the same filesystem: the directory is the whole state.
    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "fingerprint": self._fingerprint}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"])  # type: ignore[misc]
        self.check_matches(state["fingerprint"], where=f"the pickled tokenizer of {state['directory']}")

    # ------------------------------------------------------- fingerprinting
    @property
    def fingerprint(self) -> str:
        """sha256 over the sorted (name, bytes) of the tokenizer files of the directory (see :func:`fingerprint_dir`)."""
        return self._fingerprint

    def check_matches(self, expected_fingerprint: str, where: str) -> None:
        """Raise :class:`~mmtrain.tokenize.text.TokenizerMismatchError` unless this is the expected tokenizer
        (``where``: the origin of the expectation, e.g. a checkpoint, for the message)."""
        if expected_fingerprint == self.fingerprint:
            return
        raise TokenizerMismatchError(
            f"text tokenizer mismatch for {where}: it was made with tokenizer sha256 {expected_fingerprint}, but the "
            f"loaded Hugging Face tokenizer {self.directory} has sha256 {self.fingerprint} (over its files "
            f"{', '.join(tokenizer_files(self.directory))}). Token ids would mean different things. Fix: point the "
            f"tokenizer path at the exact tokenizer directory {where} was created with, or re-create {where} with this tokenizer.")

    def state(self) -> dict[str, Any]:
        """JSON-safe facts for checkpoints and reports: kind, sha256, sizes, added tokens, special ids."""
        return {
            "kind": "hf",
            "sha256": self.fingerprint,
            "tokenizer_class": type(self.hf).__name__,
            "files": tokenizer_files(self.directory),
            "vocab_size": self.vocab_size,
            "old_vocab_size": self.old_vocab_size,
            "added_tokens": list(self.added_tokens),
            "special_token_ids": {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id, "boi": self.boi_id,
                                  "eoi": self.eoi_id},
        }

    def save_hf(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer with the tokens mmtrain added (``<boi>``, ``<eoi>``) into ``directory``
        (``save_pretrained``), for ``mmtrain export --hf``."""
        self.hf.save_pretrained(os.fspath(directory))

    def save_to(self, directory: str | os.PathLike) -> Path:
        """Copy the tokenizer files (and ``config.json``, when present) into ``directory``, each written under
        a temp name and renamed; a copy onto itself writes nothing. Returns ``directory``; the copy has
        this tokenizer's fingerprint."""
        dst = Path(directory)
        if dst.exists() and dst.resolve() == Path(self.directory).resolve():
            return dst
        dst.mkdir(parents=True, exist_ok=True)
        names = [*tokenizer_files(self.directory), *(n for n in COPIED_ALONG if (Path(self.directory) / n).is_file())]
        # tokenizer_config.json last: a copy that has it (what is_hf_tokenizer_dir looks for with
        # tokenizer.model) is complete, whichever of the files another reader looks at first
        for name in sorted(names, key=lambda n: (n in ("tokenizer_config.json", "tokenizer.json"), n)):
            atomic_write_bytes(dst / name, (Path(self.directory) / name).read_bytes())
        copied = fingerprint_dir(dst)
        if copied != self.fingerprint:
            raise OSError(f"copying the tokenizer {self.directory} to {dst}: the copy hashes to {copied}, not "
                          f"{self.fingerprint} (did {dst} already hold other tokenizer files, or did {self.directory} change?)")
        return dst

    # ------------------------------------------------------------ properties
    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def boi_id(self) -> int:
        return self._boi

    @property
    def eoi_id(self) -> int:
        return self._eoi

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding needs at least this many rows)."""
        return len(self.hf)

    def id_to_piece(self, tok_id: int) -> str:
        return self.hf.convert_ids_to_tokens(int(tok_id))

    # -------------------------------------------------------------- encoding
    def _body(self, texts: list[str]) -> list[list[int]]:
        return self.hf(texts, add_special_tokens=False)["input_ids"] if texts else []

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        """Token ids for ``text`` (the tokenizer's own, without its special-token template), optionally wrapped in bos/eos."""
        if not isinstance(text, str):
            raise TypeError(f"HFTextTokenizer.encode: expected str, got {type(text).__name__}")
        ids = self._body([text])[0]
        return ([self.bos_id] if bos else []) + list(ids) + ([self.eos_id] if eos else [])

    def encode_batch(
        self, texts: Sequence[str], max_len: int, bos: bool = True, eos: bool = True,
        cut: list[tuple[int, int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode, truncate and right-pad a batch, as :meth:`TextTokenizer.encode_batch` does.

        Returns ids ``# B, max_len`` padded with ``pad_id`` and lengths ``# B``; ``cut`` gets
        ``(row, tokens before the cut)`` for each text longer than ``max_len``.
        """
        return batch_ids("HFTextTokenizer", texts, self._body, max_len, self.pad_id, self.bos_id, self.eos_id, bos, eos, cut)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text for ``ids``: stops at the first eos (a leading bos that is the eos is skipped), drops pad/bos/boi/eoi."""
        kept = visible_ids("HFTextTokenizer", ids, self.vocab_size, self.bos_id, self.eos_id, self._hidden_ids)
        return self.hf.decode(kept, skip_special_tokens=False)
