"""Time as the runtime sees it: the wall clock, or a test clock that can jump ahead."""

from __future__ import annotations

import asyncio
import time


class Clock:
    """Wall-clock time (epoch seconds)."""

    def now(self) -> float:
        return time.time()

    async def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` real seconds; a test clock returns early when it jumps."""
        await asyncio.sleep(max(timeout, 0.0))

    async def wait_until(self, deadline: float) -> None:
        """Sleep until this clock reads ``deadline`` (at once if it has already passed)."""
        await asyncio.sleep(max(deadline - self.now(), 0.0))

    def begin_result_wait(self) -> None:
        """A client started waiting for a workflow result (time may skip meanwhile)."""

    def end_result_wait(self) -> None:
        """That wait ended."""


class SkippingClock(Clock):
    """Wall-clock time plus an offset that the time-skipping test environment advances."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.result_waiters = 0
        self._sleepers: list[asyncio.Future[None]] = []

    def now(self) -> float:
        return time.time() + self.offset

    def advance_to(self, when: float) -> None:
        delta = when - self.now()
        if delta > 0:
            self.offset += delta
        sleepers, self._sleepers = self._sleepers, []
        for fut in sleepers:
            if not fut.done():
                fut.get_loop().call_soon_threadsafe(_set_done, fut)

    async def wait(self, timeout: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append(fut)
        try:
            await asyncio.wait_for(fut, max(timeout, 0.0))
        except TimeoutError:
            pass
        finally:
            if fut in self._sleepers:
                self._sleepers.remove(fut)

    async def wait_until(self, deadline: float) -> None:
        # A jump may have happened before this call: look at the clock, not a timeout
        # computed earlier, or a jump past the deadline would go unnoticed.
        while (remaining := deadline - self.now()) > 0:
            await self.wait(remaining)

    def begin_result_wait(self) -> None:
        self.result_waiters += 1

    def end_result_wait(self) -> None:
        self.result_waiters -= 1


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
