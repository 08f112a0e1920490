"""Identifiers the runtime creates."""

from __future__ import annotations

import os
import time
import uuid

_RANDOM_BITS = 74
_RANDOM_MASK_62 = (1 << 62) - 1


def new_run_id() -> str:
    """A new run id: a UUID version 7 (RFC 9562), unique and ordered by creation time.

    Time order keeps a store's inserts and the updates of runs created together on
    neighbouring B-tree pages (runs, history, tasks are keyed by run id): a commit
    writes a few pages instead of one per run, and the pages a batch touches stay in
    the page cache. Random (version 4) ids scattered them; ids are opaque either way.
    """
    unix_ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big") >> (80 - _RANDOM_BITS)
    value = (
        (unix_ms & ((1 << 48) - 1)) << 80
        | 0x7 << 76  # version
        | (rand >> 62) << 64  # 12 random bits
        | 0b10 << 62  # variant
        | (rand & _RANDOM_MASK_62)  # 62 random bits
    )
    return str(uuid.UUID(int=value))
