"""Checking a manifest against its schema, once, where it is read: every message names the file and the field.

A schema is a dict ``field -> kind``; a kind is a type (``int``, ``str``, ``list``, ``dict``), a tuple of types,
``Nullable(kind)``, or a nested schema (a dict) for a sub-record. ``bool`` never passes for ``int`` (JSON's
``true`` is not a count). Fields a schema does not name are left alone (newer writers may add some).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mttlss.errors import UserError


class ManifestError(UserError):
    """A manifest whose content does not fit its schema; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class Nullable:
    kind: Any


def _type_name(kind: Any) -> str:
    if isinstance(kind, Nullable):
        return f"{_type_name(kind.kind)} or null"
    if isinstance(kind, tuple):
        return " or ".join(_type_name(k) for k in kind)
    if isinstance(kind, dict):
        return "object"
    return {int: "integer", float: "number", str: "string", list: "list", dict: "object", bool: "true/false"}.get(
        kind, getattr(kind, "__name__", str(kind)))


def _fits(value: Any, kind: Any) -> bool:
    if isinstance(kind, Nullable):
        return value is None or _fits(value, kind.kind)
    if isinstance(kind, tuple):
        return any(_fits(value, k) for k in kind)
    if isinstance(kind, dict):
        return isinstance(value, dict)
    if kind in (int, float) and isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def check_record(record: Any, schema: dict, *, file: Any, fix: str, prefix: str = "") -> None:
    """Raise ``ManifestError`` for the first field of ``record`` that is missing or of the wrong type."""
    if not isinstance(record, dict):
        where = f"field {prefix.rstrip('.')!r}" if prefix else "the manifest"
        raise ManifestError(f"{file}: {where} is a JSON {type(record).__name__}, expected an object; {fix}")
    for name, kind in schema.items():
        field = f"{prefix}{name}"
        if name not in record:
            if isinstance(kind, Nullable):
                continue
            raise ManifestError(f"{file}: field {field!r} is missing; {fix}")
        value = record[name]
        if not _fits(value, kind):
            raise ManifestError(f"{file}: field {field!r} is {value!r:.60}, expected {_type_name(kind)}; {fix}")
        if isinstance(kind, dict) or (isinstance(kind, Nullable) and isinstance(kind.kind, dict) and value is not None):
            check_record(value, kind if isinstance(kind, dict) else kind.kind, file=file, fix=fix, prefix=f"{field}.")


def require(condition: bool, *, file: Any, field: str, problem: str, fix: str) -> None:
    """A check across fields (a length against a count): ``problem`` says what disagrees."""
    if not condition:
        raise ManifestError(f"{file}: field {field!r}: {problem}; {fix}")
