"""Real servers and workers for the HTTP API tests: uvicorn and a Worker, each in a thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from tether import Client, Worker
from tether.server import ApiKeys, create_app


class ServerThread:
    """A real uvicorn server on a free port, in a background thread."""

    def __init__(self, url: str, api_keys: ApiKeys | None = None, **options: Any) -> None:
        app = create_app(url, api_keys=api_keys, **options)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


class WorkerThread:
    """Workers from ``factory(client)`` running on their own event loop in a thread."""

    def __init__(self, url: str, factory: Callable[[Client], Worker]) -> None:
        self.url = url
        self.factory = factory
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as e:
            self.error = e
            self.ready.set()

    async def _run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        client = await Client.connect(self.url)
        try:
            async with self.factory(client):
                self.ready.set()
                await self.stop.wait()
        finally:
            await client.close()

    def __enter__(self) -> WorkerThread:
        self.thread.start()
        self.ready.wait(15)
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(20)
