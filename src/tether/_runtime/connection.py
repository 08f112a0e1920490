"""Opening a store from a URL."""

from __future__ import annotations

from urllib.parse import urlparse

from tether._store.base import Store
from tether._store.sqlite import SqliteStore
from tether.exceptions import InvalidArgumentError


def open_store(url: str) -> Store:
    """``sqlite:///relative.db``, ``sqlite:////absolute.db`` or ``sqlite:///:memory:``."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = url[len("sqlite://") :]
        if path.startswith("/"):
            path = path[1:]
        if not path:
            raise InvalidArgumentError(
                f"store URL {url!r} names no file: use sqlite:///path/to/file.db"
            )
        return SqliteStore(path)
    if parsed.scheme in ("postgres", "postgresql"):
        raise InvalidArgumentError(
            "the PostgreSQL store is not available in this version; use sqlite:///file.db"
        )
    raise InvalidArgumentError(f"unsupported store URL {url!r}: expected sqlite:///path/to/file.db")
