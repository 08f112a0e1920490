"""``tether server``: the HTTP/JSON API over a store (see ``tether.server.app``)."""

from tether.server.app import DEFAULT_MAX_BODY_BYTES, create_app
from tether.server.auth import ApiKeys, load_api_keys

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ApiKeys", "create_app", "load_api_keys"]
