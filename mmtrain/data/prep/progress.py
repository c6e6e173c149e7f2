"""Resume state of a prep output directory: per-chunk records and ``progress.json``.

Layout under ``out``::

    progress.json                  summary: options, chunk counts, one entry per run
    .prep/lock                     flock held while a run writes here
    .prep/chunks/{split}-{i:06d}.json   one record per finished chunk

A chunk's record is written (atomically) only after all its shards were renamed
into place, so "record present, chain fingerprint equal, shard files present
with the recorded sizes" means the chunk is finished. The chain fingerprint
hashes the options and every candidate of this chunk and of all chunks before
it: chunk outputs depend on earlier chunks (duplicates, shard numbering), so an
input change invalidates the changed chunk and everything after it, and nothing
before it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from mmtrain.atomic import atomic_write_text

logger = logging.getLogger("mmtrain.data.prep")

PROGRESS = "progress.json"
STATE_DIR = ".prep"
STATS = "stats.json"
SPLIT_DIRS = ("train", "val")


def _has_dataset_files(directory: Path) -> bool:
    if not directory.is_dir():
        return False
    return any(n.endswith((".tar", ".mds")) or n == "index.json" for n in os.listdir(directory))


def _clear_outputs(out: Path, data_dirs: list[Path], records: str) -> None:
    """What --overwrite deletes: shards/index in the data dirs, our state and stats."""
    for directory in data_dirs:
        if not directory.is_dir():
            continue
        for name in os.listdir(directory):
            path = directory / name
            if name.startswith(".tmp-") and path.is_dir():
                shutil.rmtree(path)
            elif name.endswith((".tar", ".mds", ".tmp")) or name == "index.json":
                path.unlink()
    chunks = out / STATE_DIR / records
    if chunks.is_dir():
        shutil.rmtree(chunks)
    for name in (PROGRESS, STATS):
        (out / name).unlink(missing_ok=True)


class ProgressStore:
    """Owns ``out`` for one run: lock, option check, chunk records, progress summary.

    Args:
        out: Output directory (created).
        options: The output-defining options (config + source spec), stored in
            ``progress.json`` and compared on the next run.
        options_fingerprint: ``fingerprint(options)``.
        overwrite: Clear a previous run with other options (or foreign shards)
            instead of raising ValueError.
        data_dirs: Where shards go, checked for shards of someone else (default
            ``out/train`` and ``out/val``).
        records: Name of the record folder under ``.prep`` (default ``"chunks"``).
    """

    def __init__(self, out: Path, options: dict[str, Any], options_fingerprint: str, overwrite: bool,
                 data_dirs: list[Path] | None = None, records: str = "chunks") -> None:
        self.out = out
        self.options = options
        self.options_fingerprint = options_fingerprint
        self.overwrite = overwrite
        self.data_dirs = data_dirs if data_dirs is not None else [out / split for split in SPLIT_DIRS]
        self.records = records
        self.chunks_dir = out / STATE_DIR / records
        self._lock_file: Any = None
        self.runs: list[dict[str, Any]] = []

    def __enter__(self) -> ProgressStore:  # noqa: PYI034 -- Self needs Python 3.11; we support 3.10
        (self.out / STATE_DIR).mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.out / STATE_DIR / "lock", "a")
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise ValueError(f"{self.out}: another prep run is writing to this directory (lock {self.out / STATE_DIR / 'lock'} is held)") from None
        try:
            self._check_previous()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.chunks_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _check_previous(self) -> None:
        path = self.out / PROGRESS
        if path.is_file():
            try:
                previous = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}: cannot read the previous run's progress file ({exc}); "
                                 "pass overwrite=True (--overwrite) to start over") from exc
            if previous.get("options_fingerprint") == self.options_fingerprint:
                self.runs = list(previous.get("runs", []))
                return
            if not self.overwrite:
                changed = _diff(previous.get("options", {}), self.options)
                raise ValueError(
                    f"{self.out} holds a prep run with different options ({changed}); "
                    "pass overwrite=True (--overwrite) to replace it, or choose another output directory"
                )
            logger.warning("overwrite: clearing the previous prep output in %s", self.out)
            _clear_outputs(self.out, self.data_dirs, self.records)
            return
        foreign = [d for d in self.data_dirs if _has_dataset_files(d)]
        if foreign:
            if not self.overwrite:
                raise ValueError(
                    f"{foreign[0]} already holds shards that this prep did not write "
                    f"(no {path}); pass overwrite=True (--overwrite) to replace them, or choose another output directory"
                )
            logger.warning("overwrite: clearing existing shards in %s", self.out)
            _clear_outputs(self.out, self.data_dirs, self.records)

    def record_path(self, name: str) -> Path:
        return self.chunks_dir / f"{name}.json"

    def load(self, name: str) -> dict[str, Any] | None:
        path = self.record_path(name)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            # Records are written atomically, so this is outside damage; redoing the chunk repairs it.
            logger.warning("ignoring unreadable chunk record %s (%s); the chunk will be redone", path, exc)
            return None

    def save(self, name: str, record: dict[str, Any]) -> None:
        atomic_write_text(self.record_path(name), json.dumps(record, separators=(",", ":")))

    def prune(self, valid: set[str]) -> None:
        """Delete records of chunks that are not part of this run's plan (a shrunken input)."""
        for name in os.listdir(self.chunks_dir):
            if name.endswith(".json") and name[: -len(".json")] not in valid:
                (self.chunks_dir / name).unlink()

    def write_progress(self, summary: dict[str, Any]) -> None:
        payload = {"version": 1, "options_fingerprint": self.options_fingerprint, "options": self.options,
                   **summary, "runs": self.runs}
        atomic_write_text(self.out / PROGRESS, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _diff(a, b, f"{prefix}{key}.")
            if inner:
                changes.append(inner)
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return "; ".join(changes)
