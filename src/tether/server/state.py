"""What one server process holds: the store, a client per namespace, the auth config."""

from __future__ import annotations

from tether._store.base import Store
from tether.client import Client
from tether.converter import DEFAULT_MAX_PAYLOAD_BYTES, PayloadConverter
from tether.server.auth import ApiKeys


class ServerState:
    def __init__(
        self,
        store: Store,
        api_keys: ApiKeys | None,
        max_body_bytes: int,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self.store = store
        self.max_payload_bytes = max_payload_bytes
        self.api_keys = api_keys
        self.max_body_bytes = max_body_bytes
        self._clients: dict[str, Client] = {}

    def client(self, namespace: str) -> Client:
        """Clients share the one store; each is bound to its namespace."""
        client = self._clients.get(namespace)
        if client is None:
            if len(self._clients) > 10_000:
                self._clients.clear()
            client = self._clients[namespace] = Client(
                self.store,
                namespace=namespace,
                converter=PayloadConverter(self.max_payload_bytes),
            )
        return client

    async def check_ready(self) -> None:
        await self.store.list_runs("default", limit=1)

    async def close(self) -> None:
        await self.store.close()
