"""Seeds derived from values: DomainBed's ``seed_hash`` (its split, hyperparameter draws and sweep) and
this project's :func:`stable_seed` (per-sample augmentation, views, splits).

DomainBed (``domainbed/lib/misc.py``, ``seed_hash``) turns any tuple of values into a seed with the md5
of the tuple's ``repr``, modulo 2^31. The same values give the same seed in every process and Python
version, which is what lets a run's split, hyperparameters and seed be rebuilt from its arguments.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any


def stable_seed(*parts: Any) -> int:
    """A seed from values, stable across processes and Python versions (unlike ``hash``): crc32 of the
    values joined by ``/``."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def seed_hash(*args) -> int:
    """A seed in [0, 2^31) from ``args`` (md5 of ``repr(args)``), DomainBed's ``seed_hash``.

    Pass plain Python values (``int``, ``str``, lists of them): the repr of a NumPy integer differs
    from an ``int``'s, so it would give another seed; NumPy integers are therefore converted.
    """
    return int(hashlib.md5(repr(tuple(_plain(a) for a in args)).encode("utf-8")).hexdigest(), 16) % (2**31)


def _plain(value):
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # NumPy / torch scalars
        return value.item()
    return value
