"""API key configuration (env, file, JSON and compact forms) and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tether.exceptions import InvalidArgumentError
from tether.server.auth import ApiKeys, load_api_keys


def test_compact_form_scopes_keys() -> None:
    keys = ApiKeys.parse("w=default,ci:write;\n r = *:read")
    w, r = keys.lookup("w"), keys.lookup("r")
    assert w is not None and r is not None and keys.lookup("x") is None
    assert w.allows("ci", write=True) and not w.allows("other", write=False)
    assert r.allows("anything", write=False) and not r.allows("anything", write=True)
    assert "w" not in repr(keys) and "r=" not in repr(keys)


def test_env_and_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TETHER_API_KEYS_FILE", raising=False)
    monkeypatch.delenv("TETHER_API_KEYS", raising=False)
    assert load_api_keys() is None
    monkeypatch.setenv("TETHER_API_KEYS", "k=default:write")
    loaded = load_api_keys()
    assert loaded is not None and loaded.lookup("k") is not None
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"s": {"namespaces": ["a"], "access": "read"}}))
    monkeypatch.setenv("TETHER_API_KEYS_FILE", str(path))
    from_file = load_api_keys()
    assert from_file is not None and from_file.lookup("k") is None
    key = from_file.lookup("s")
    assert key is not None and key.allows("a", write=False) and not key.allows("a", write=True)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("k=default:admin", "access must be read or write"),
        ("just-a-key", "KEY=NAMESPACE"),
        ("k=:write", "KEY=NAMESPACE"),
        ('{"k": "default"}', "namespaces"),
        ("{bad json", "malformed"),
    ],
)
def test_bad_configuration_is_a_clear_error(text: str, words: str) -> None:
    with pytest.raises(InvalidArgumentError, match=words):
        ApiKeys.parse(text)
