"""Payload conversion: Python values <-> JSON, typed by annotations.

Values are stored as JSON. Dataclasses, pydantic models, datetimes, UUIDs, enums and
the standard containers are encoded with pydantic; on the way back a value is
validated into the type its parameter or return annotation declares, so a dataclass
in is a dataclass out.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

import pydantic
import pydantic_core

from tether.exceptions import PayloadError

DEFAULT_MAX_PAYLOAD_BYTES = 2 * 1024 * 1024


@functools.lru_cache(maxsize=1024)
def _adapter(hint: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(hint)


_AS_IS = (str, int, float, bool)
"""Types whose values are JSON as they are, and decode into themselves unchanged."""
_I64 = 1 << 63
_SHORT_JSON = 32
"""Bytes that the JSON of None, a bool, a float or a 64-bit int never exceeds."""


class PayloadConverter:
    """Encodes values to JSON-compatible data and decodes them into declared types."""

    def __init__(self, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        if max_payload_bytes <= 0:
            raise ValueError("max_payload_bytes must be positive")
        self.max_payload_bytes = max_payload_bytes

    def encode(self, value: Any, what: str) -> Any:
        """Return JSON-compatible data for ``value``; ``what`` names it in errors."""
        kind = type(value)
        short = (
            value is None
            or kind is bool
            or kind is float
            or (kind is int and -_I64 <= value < _I64)
        )
        if short and self.max_payload_bytes >= _SHORT_JSON:
            return value  # within any limit but the tiniest, without measuring its JSON
        if kind in _AS_IS:
            data = value
        else:
            try:
                data = pydantic_core.to_jsonable_python(value)
            except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as e:
                raise PayloadError(
                    f"{what}: cannot serialize a value of type {type(value).__qualname__} to "
                    f"JSON ({e}). Use JSON types, dataclasses or pydantic models."
                ) from None
        # Fast path: a short string is under any limit of at least 12 bytes per character
        # (the longest JSON escape) plus the quotes, so it needs no measuring.
        if isinstance(data, str) and len(data) <= min(1024, (self.max_payload_bytes - 2) // 12):
            return data
        size = len(pydantic_core.to_json(data, inf_nan_mode="constants"))
        if size > self.max_payload_bytes:
            raise PayloadError(
                f"{what}: payload is {size} bytes, over the limit of {self.max_payload_bytes} "
                "bytes. Store large data elsewhere and pass a reference, or raise the limit "
                "(Client.connect(..., max_payload_bytes=...))."
            )
        return data

    def encode_args(self, args: Sequence[Any], what: str) -> list[Any]:
        return [self.encode(a, f"{what} argument {i + 1}") for i, a in enumerate(args)]

    def decode(self, data: Any, hint: Any, what: str) -> Any:
        """Validate ``data`` into ``hint`` (no conversion for a missing or ``Any`` hint)."""
        if _as_is(data, hint):
            return data
        try:
            return _adapter(hint).validate_python(data)
        except pydantic.ValidationError as e:
            raise PayloadError(f"{what}: value does not match {hint!r}: {e}") from None
        except pydantic.PydanticSchemaGenerationError:
            return data

    def decode_args(self, data: Sequence[Any], hints: Sequence[Any], what: str) -> list[Any]:
        out = []
        for i, item in enumerate(data):
            hint = hints[i] if i < len(hints) else None
            if _as_is(item, hint):  # (spares the name for errors: a format per argument)
                out.append(item)
            else:
                out.append(self.decode(item, hint, f"{what} argument {i + 1}"))
        return out


def _as_is(data: Any, hint: Any) -> bool:
    """Whether ``data`` decodes into ``hint`` as itself: no hint to convert to, or a
    value of a JSON type already (what validation would return, without its cost)."""
    return (
        hint is None
        or hint is Any
        or hint is inspect.Parameter.empty
        or (type(data) is hint and hint in _AS_IS)
    )


def signature_hints(fn: Callable[..., Any], skip_self: bool = False) -> tuple[list[Any], Any]:
    """Parameter type hints (positional order) and the return hint of ``fn``."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    params = list(inspect.signature(fn).parameters.values())
    if skip_self and params:
        params = params[1:]
    arg_hints = [
        hints.get(p.name) for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return arg_hints, hints.get("return")
