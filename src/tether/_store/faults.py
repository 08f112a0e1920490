"""Fault injection for testing: make a fraction of store calls fail transiently.

Off unless asked for. ``TETHER_FAULT_RATE=0.005`` in a process's environment (or
``store.faults = FaultInjector(0.005)``) makes about one store call in 200 raise
``StoreError(retryable=True)``. Most injected faults happen *before* the call does
anything; a share of those on writes (``TETHER_FAULT_LOST_SHARE``, default one half)
happen *after* the call committed, with its result lost, as when a connection drops
while the commit is acknowledged. Callers must cope with both: retry the first, and
find their retry refused (a stale lease token, a task version that moved on, a
repeated request id) after the second.
"""

from __future__ import annotations

import os
import random
import threading
from collections import Counter

from tether.exceptions import StoreError

RATE_ENV = "TETHER_FAULT_RATE"
LOST_SHARE_ENV = "TETHER_FAULT_LOST_SHARE"
SEED_ENV = "TETHER_FAULT_SEED"


class FaultInjector:
    """Decides, call by call, whether the store fails it (thread-safe)."""

    def __init__(self, rate: float, *, lost_share: float = 0.5, seed: int | None = None) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate must be between 0 and 1 (got {rate})")
        if not 0.0 <= lost_share <= 1.0:
            raise ValueError(f"lost-result share must be between 0 and 1 (got {lost_share})")
        self.rate = rate
        self.lost_share = lost_share
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.injected = Counter[str]()
        """How many faults were injected: ``before`` and ``after_commit``."""

    @classmethod
    def from_env(cls) -> FaultInjector | None:
        """The injector ``TETHER_FAULT_RATE`` asks for, or None (the default: no faults)."""
        raw = os.environ.get(RATE_ENV, "").strip()
        if not raw:
            return None
        try:
            rate = float(raw)
            share = float(os.environ.get(LOST_SHARE_ENV, "0.5"))
            seed_text = os.environ.get(SEED_ENV)
            seed = int(seed_text) if seed_text else None
        except ValueError:
            raise ValueError(
                f"{RATE_ENV}={raw!r} (and {LOST_SHARE_ENV}, {SEED_ENV}) must be numbers"
            ) from None
        return cls(rate, lost_share=share, seed=seed) if rate > 0 else None

    def _roll(self) -> float:
        with self._lock:
            return self._random.random()

    def before(self, writes: bool) -> None:
        """Called before a store call does anything; may raise."""
        threshold = self.rate * (1.0 - self.lost_share) if writes else self.rate
        if threshold and self._roll() < threshold:
            self.injected["before"] += 1
            raise StoreError(
                f"injected store fault ({RATE_ENV}={self.rate}): the call was not made",
                retryable=True,
            )

    def after(self, writes: bool) -> None:
        """Called after a store call committed; may raise, losing its result."""
        if not writes or not self.lost_share:
            return
        if self._roll() < self.rate * self.lost_share:
            self.injected["after_commit"] += 1
            raise StoreError(
                f"injected store fault ({RATE_ENV}={self.rate}): the call committed but its "
                "result was lost",
                retryable=True,
            )
