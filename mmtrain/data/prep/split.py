"""Deterministic train/val assignment by hashing a sample's source identity.

Hashing (instead of drawing random numbers in listing order) makes the split a
pure function of the sample: it survives re-runs, resumes, any worker count and
input growth, and all captions of one image (same group) land in the same split.
"""

from __future__ import annotations

import hashlib

SPLITS: tuple[str, ...] = ("train", "val")


def split_of(group: str, val_fraction: float, seed: int = 0) -> str:
    """``"val"`` for about ``val_fraction`` of groups, ``"train"`` for the rest."""
    if val_fraction <= 0.0:
        return "train"
    digest = hashlib.blake2b(f"{seed}:{group}".encode(), digest_size=8).digest()
    # Uniform in [0, 1): 64 bits of a cryptographic hash.
    return "val" if int.from_bytes(digest, "big") / 2.0**64 < val_fraction else "train"
