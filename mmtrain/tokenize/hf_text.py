"""A Hugging Face tokenizer in a local directory, with the interface of :class:`~mmtrain.tokenize.text.TextTokenizer`.

The directory is what ``save_pretrained`` writes (``tokenizer.json`` and/or a sentencepiece
``tokenizer.model`` with ``tokenizer_config.json``); it is loaded with transformers'
``AutoTokenizer.from_pretrained(dir, local_files_only=True)``, so nothing is downloaded.

Ids:

* ``<boi>``/``<eoi>`` are the tokenizer's own tokens of those names if its vocabulary has
  them, else they are added as special tokens with new ids past the old vocabulary
  (:attr:`HFTextTokenizer.added_tokens` names those added; grow the model's embedding with
  :func:`mmtrain.models.llama.add_token_rows`).
* pad is the tokenizer's pad token, else its eos.
* bos is the tokenizer's bos token, else its eos (Qwen-style tokenizers have no bos).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

BOI, EOI = "<boi>", "<eoi>"


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
        min_len = int(bos) + int(eos)
        if max_len < max(1, min_len):
            raise ValueError(
                f"HFTextTokenizer.encode_batch: max_len must be >= {max(1, min_len)} "
                f"(bos={bos}, eos={eos}), got {max_len}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"HFTextTokenizer.encode_batch: texts[{i}] must be str, got {type(t).__name__}")
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)  # B, L
        lengths = torch.zeros(len(texts), dtype=torch.long)  # B
        for row, body in enumerate(self._body(list(texts))):
            seq = ([self.bos_id] if bos else []) + list(body) + ([self.eos_id] if eos else [])
            if len(seq) > max_len:
                if cut is not None:
                    cut.append((row, len(seq)))
                seq = seq[:max_len]
                if eos:
                    seq[-1] = self.eos_id
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            lengths[row] = len(seq)
        return ids, lengths

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text for ``ids``: stops at the first eos (a leading bos that is the eos is skipped), drops pad/bos/boi/eoi."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"HFTextTokenizer.decode: expected a 1-D tensor, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        kept: list[int] = []
        n = self.vocab_size
        for i, tok in enumerate(ids):
            tok = int(tok)
            if not 0 <= tok < n:
                raise ValueError(f"HFTextTokenizer.decode: token id {tok} is out of range [0, {n})")
            if tok == self.eos_id:
                if i == 0 and self.bos_id == self.eos_id:
                    continue
                break
            if tok not in self._hidden_ids:
                kept.append(tok)
        return self.hf.decode(kept, skip_special_tokens=False)
