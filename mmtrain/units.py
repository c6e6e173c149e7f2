"""Byte counts written by people: one rule for every option that takes one.

``parse_bytes`` reads a number with an optional unit, case and spaces ignored:

- none or ``B``: bytes;
- ``K``/``KB``, ``M``/``MB``, ``G``/``GB``, ``T``/``TB``: decimal, powers of 1000 (as disks and
  object stores count);
- ``KiB``, ``MiB``, ``GiB``, ``TiB``: binary, powers of 1024.

So ``500MB`` is 500 000 000 bytes and ``500MiB`` 524 288 000. Fractions are allowed (``1.5GB``).
Used by ``data.cache_limit`` and ``mmtrain prep --shard-size``.
"""
from __future__ import annotations

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(value: int | str, name: str) -> int:
    """``0``, ``123456``, ``"500MB"``, ``"20GiB"`` -> bytes; ``name`` (the option or key) is named in the error."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a byte count such as 20GiB, 500MB or 0, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name}: expected >= 0, got {value}")
        return value
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number):]
    try:
        amount = float(number) if number else float("nan")
    except ValueError:
        amount = float("nan")
    if unit not in _UNITS or not amount >= 0:
        raise ValueError(f"{name}: expected a byte count such as 20GiB, 500MB or 0, got {value!r} "
                         "(K/M/G/T[B]: powers of 1000; KiB/MiB/GiB/TiB: powers of 1024)")
    return int(amount * _UNITS[unit])
