"""API keys for ``tether server``.

Keys come from ``TETHER_API_KEYS`` (or a file named by ``TETHER_API_KEYS_FILE`` or
``--api-keys-file``). Either form holds JSON::

    {"k3y-for-ci": {"namespaces": ["default", "ci"], "access": "write"},
     "dashboard-key": {"namespaces": ["*"], "access": "read"}}

or a compact text form, entries separated by ``;`` or newlines::

    k3y-for-ci=default,ci:write; dashboard-key=*:read

``write`` access includes ``read``; ``*`` means every namespace. With no keys
configured the server is open. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

from tether.exceptions import InvalidArgumentError

__all__ = ["ApiKey", "ApiKeys", "load_api_keys"]

ACCESS_LEVELS = ("read", "write")


@dataclass(frozen=True)
class ApiKey:
    namespaces: frozenset[str]
    access: str

    def allows(self, namespace: str, write: bool) -> bool:
        in_scope = "*" in self.namespaces or namespace in self.namespaces
        return in_scope and (self.access == "write" or not write)


class ApiKeys:
    """The configured keys; ``lookup`` finds one by its secret in constant time per key."""

    def __init__(self, keys: Mapping[str, ApiKey]) -> None:
        self._keys = [(secret.encode(), key) for secret, key in keys.items()]

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:  # never show the secrets
        return f"ApiKeys({len(self._keys)} keys)"

    def lookup(self, secret: str) -> ApiKey | None:
        given = secret.encode()
        found = None
        for stored, key in self._keys:
            if hmac.compare_digest(stored, given):
                found = key
        return found

    @classmethod
    def parse(cls, text: str) -> ApiKeys:
        text = text.strip()
        if not text:
            return cls({})
        if text.startswith("{"):
            return cls._parse_json(text)
        keys: dict[str, ApiKey] = {}
        for raw in text.replace("\n", ";").split(";"):
            entry = raw.strip()
            if not entry:
                continue
            secret, sep, scope = entry.partition("=")
            namespaces, sep2, access = scope.rpartition(":")
            if not sep or not sep2 or not secret.strip() or not namespaces.strip():
                raise InvalidArgumentError(
                    "API key entries look like KEY=NAMESPACE[,NAMESPACE...]:read|write "
                    f"(entry {len(keys) + 1} does not)"
                )
            keys[secret.strip()] = _key([n.strip() for n in namespaces.split(",")], access, keys)
        return cls(keys)

    @classmethod
    def _parse_json(cls, text: str) -> ApiKeys:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"API keys JSON is malformed: {e.msg} (line {e.lineno})")
        if not isinstance(data, dict):
            raise InvalidArgumentError("API keys JSON must be an object of key -> settings")
        keys: dict[str, ApiKey] = {}
        for secret, settings in data.items():
            if not isinstance(settings, dict) or not isinstance(settings.get("namespaces"), list):
                raise InvalidArgumentError(
                    f'API key {len(keys) + 1}: settings need "namespaces": [...] and "access"'
                )
            names = [str(n) for n in settings["namespaces"]]
            keys[str(secret)] = _key(names, str(settings.get("access", "read")), keys)
        return cls(keys)


def _key(namespaces: list[str], access: str, so_far: Mapping[str, ApiKey]) -> ApiKey:
    access = access.strip()
    if access not in ACCESS_LEVELS:
        raise InvalidArgumentError(
            f"API key {len(so_far) + 1}: access must be read or write (got {access!r})"
        )
    if not namespaces or not all(namespaces):
        raise InvalidArgumentError(f"API key {len(so_far) + 1}: empty namespace")
    return ApiKey(frozenset(namespaces), access)


def load_api_keys(file: str | None = None) -> ApiKeys | None:
    """Keys from ``file``, else ``TETHER_API_KEYS_FILE``, else ``TETHER_API_KEYS``; None if
    none is configured (an open server)."""
    path = file or os.environ.get("TETHER_API_KEYS_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise InvalidArgumentError(f"cannot read API keys file {path!r}: {e.strerror}")
        keys = ApiKeys.parse(text)
    else:
        env = os.environ.get("TETHER_API_KEYS", "")
        if not env.strip():
            return None
        keys = ApiKeys.parse(env)
    if not len(keys):
        raise InvalidArgumentError("API keys are configured but the list is empty")
    return keys
