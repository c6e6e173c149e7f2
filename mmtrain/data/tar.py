"""The one webdataset tar reader: member headers grouped into samples, member bytes read by offset.

Every part of mmtrain that reads a tar shard goes through here: the member index
(:mod:`mmtrain.data.index`) behind every webdataset source of :mod:`mmtrain.data.sources`
(the training loader, eval, ``iter_samples`` for captioning, tokenizer and VAE training),
the re-sharding prep source, the latent precompute.

Grouping rule (webdataset's, made strict): a member's sample key is its path up to the
first dot of its basename and the rest is its extension (``webdataset.tariterators.
base_plus_ext``; the extension is lower-cased); consecutive members with the same key form
one sample. A key that comes back after another key's members is an error naming the shard
and key: webdataset's own reader would split it into two broken samples. Directories,
hidden members (``.name``), webdataset meta members (``__name__``) and names without an
extension are skipped. When a sample holds one extension twice, the first member is kept.

Only ``"r:"`` (uncompressed) tars are read: a compressed tar has no byte offsets to seek to.
"""
from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from webdataset.tariterators import base_plus_ext

from mmtrain.data.errors import ShardDataError


def split_member(name: str) -> tuple[str, str] | None:
    """``(sample key, lower-case extension)`` of a member name; None for a member that is not part of a sample."""
    name = name.removeprefix("./")
    if os.path.basename(name).startswith((".", "__")):
        return None
    key, ext = base_plus_ext(name)
    if key is None:
        return None
    return key, ext.lower()


BLOCK = 512  # tar's block: every header and every member's padded data is a whole number of them


@dataclass
class TarSample:
    """One sample's members: ``{extension: (offset of the data in the file, size)}``, in member order.

    ``start``/``end``: the sample's byte span in the file, from its first member's first header
    (extended headers included) to the end of its last member's padded data, so a reader that
    needs every member (a document: :mod:`mmtrain.data.documents`) gets them with one read
    (:func:`parse_sample_span`) without an index entry per member name.
    """

    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)
    start: int = -1
    end: int = -1


def iter_tar_samples(path: str, where: str = "") -> Iterator[TarSample]:
    """The samples of the tar at ``path``, from its headers alone (``tarfile`` seeks past the data).

    ``where`` names the shard in errors (default: ``path``; e.g. the URL of a downloaded shard).
    Raises ShardDataError naming the shard when it is not an uncompressed tar, is damaged
    (the samples before the damage have been yielded) or breaks the grouping rule.
    """
    where = where or path
    seen: set[str] = set()
    current: TarSample | None = None
    try:
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                split = split_member(member.name)
                if split is None:
                    continue
                key, ext = split
                if current is None or key != current.key:
                    if key in seen:
                        raise ShardDataError(f"shard {where}: sample key {key!r} appears in two separate runs of "
                                             "members (members of a sample must be consecutive in the tar)")
                    if current is not None:
                        yield current
                    seen.add(key)
                    current = TarSample(key, start=member.offset)
                current.members.setdefault(ext, (member.offset_data, member.size))
                current.end = member.offset_data + -(-member.size // BLOCK) * BLOCK
    except tarfile.ReadError as exc:
        after = f" after sample {current.key!r}" if current is not None else ""
        raise ShardDataError(f"shard {where}: not a readable uncompressed tar archive{after} ({exc}); "
                             "shards must be plain .tar files, not .tar.gz") from exc
    except (tarfile.TarError, OSError, EOFError) as exc:
        after = f" after sample {current.key!r}" if current is not None else ""
        raise ShardDataError(f"shard {where}: cannot read tar archive{after}: {exc}") from exc
    if current is not None:
        yield current


def parse_sample_span(data: bytes, key: str, where: str) -> dict[str, bytes]:
    """``{extension: bytes}`` of sample ``key`` from its byte span (:attr:`TarSample.start`/``end``),
    by the grouping rule above; ShardDataError naming ``where`` when the span is not that sample's members."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            for member in archive:
                split = split_member(member.name) if member.isfile() else None
                if split is None:
                    continue
                if split[0] != key:
                    raise ShardDataError(f"{where}: the index's span of sample {key!r} holds member {member.name!r} "
                                         "of another sample (a stale index? rewrite it with `mmtrain prep index`)")
                if member.offset_data + member.size > len(data):
                    raise ShardDataError(f"{where}: member {member.name!r} runs past the indexed span of the sample")
                members.setdefault(split[1], data[member.offset_data:member.offset_data + member.size])
    except tarfile.TarError as exc:
        raise ShardDataError(f"{where}: cannot read the sample's tar members: {exc}") from exc
    return members


def read_member(fd: int, offset: int, size: int, where: str) -> bytes:
    """``size`` bytes at ``offset`` of an open shard; ShardDataError naming ``where`` on a short read."""
    try:
        data = os.pread(fd, size, offset)
    except OSError as exc:
        raise ShardDataError(f"shard {where}: cannot read: {exc}") from exc
    if len(data) != size:
        raise ShardDataError(f"shard {where}: cannot read tar archive: short read, {len(data)} of {size} bytes at "
                             f"offset {offset} (truncated file?)")
    return data


def read_tar_samples(path: str, where: str = "") -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` per sample of the tar at ``path``, in file order (see :func:`iter_tar_samples`)."""
    where = where or path
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ShardDataError(f"shard {where}: cannot open: {exc}") from exc
    try:
        for sample in iter_tar_samples(path, where):
            yield sample.key, {ext: read_member(fd, off, size, where) for ext, (off, size) in sample.members.items()}
    finally:
        os.close(fd)
