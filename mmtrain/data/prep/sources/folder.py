"""Folder source: images with same-named ``.txt`` captions, found recursively.

``photos/cat.jpg`` is captioned by ``photos/cat.txt``. Files are listed in sorted
order (directories too), so candidate order and keys are the same on every run.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmtrain.data.images import IMAGE_EXTENSIONS
from mmtrain.data.prep.candidate import Candidate, KeyAllocator, Source

SUFFIXES: tuple[str, ...] = tuple(f".{e}" for e in IMAGE_EXTENSIONS)


def list_folder(folder: str | os.PathLike[str], extensions: tuple[str, ...] = SUFFIXES) -> Source:
    """List every image under ``folder`` (recursively) with its caption file.

    Args:
        folder: Root directory.
        extensions: Image file extensions, matched case-insensitively
            (default ``.jpg .jpeg .png .webp``).

    Keys are the relative path without extension, sanitized (``a/b.jpg`` -> ``a_b``).
    An image without a ``.txt`` is not an error here: it is dropped as
    ``missing_caption`` by the workers, so it shows up in the stats.

    Raises:
        FileNotFoundError: ``folder`` is not a directory.
        ValueError: no image with one of ``extensions`` is found.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    root = root.resolve()
    exts = tuple(e.lower() for e in extensions)
    keys = KeyAllocator()
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()  # os.walk order is file-system order; sorting makes the listing reproducible
        names = set(filenames)
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in exts:
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            caption = f"{stem}.txt"
            candidates.append(Candidate(
                key=keys.allocate(os.path.splitext(rel)[0]),
                source=rel,
                group=rel,
                image=path,
                caption_ref=os.path.join(dirpath, caption) if caption in names else None,
            ))
    if not candidates:
        raise ValueError(f"image folder {str(root)!r} contains no images with extensions {list(exts)}")
    return Source(kind="folder", spec={"extensions": list(exts)}, candidates=candidates)
