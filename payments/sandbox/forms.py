"""Stripe's form encoding: ``a[b][0][c]=v`` pairs <-> nested dicts and lists.

Stripe's v1 API takes ``application/x-www-form-urlencoded`` bodies (and GET/DELETE
query strings) whose keys nest with brackets, Rack style: ``metadata[k]=v`` is a map,
``line_items[0][price]=p`` an indexed list and ``expand[]=x`` an appended one. The
official SDK always sends indexed lists; ``[]`` is accepted because curl users (and
Stripe) use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

_SEGMENT = re.compile(r"\[([^\[\]]*)\]")


class FormError(ValueError):
    """The pairs do not nest into one consistent structure (``a=1&a[b]=2``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _split_key(key: str) -> list[str]:
    """``a[b][0]`` -> ``["a", "b", "0"]``; ``a[]`` -> ``["a", ""]``."""
    head, bracket, rest = key.partition("[")
    if not bracket:
        return [key]
    rest = "[" + rest
    parts = [head]
    pos = 0
    for match in _SEGMENT.finditer(rest):
        if match.start() != pos:
            break
        parts.append(match.group(1))
        pos = match.end()
    if pos != len(rest):  # trailing junk such as ``a[b]c``: keep the key whole, like Rack
        return [key]
    return parts


class _AppendList(list):  # type: ignore[type-arg]
    """A list built from ``[]`` segments."""


def _conflict(full_key: str) -> FormError:
    return FormError(f"Invalid value for {full_key}: conflicting parameters", full_key)


def _has_path(node: dict[str, Any], parts: list[str]) -> bool:
    """Rack's rule for ``a[][k]``: reuse the last element unless it already holds ``k``."""
    for part in parts:
        if not isinstance(node, dict) or part == "" or part not in node:
            return False
        node = node[part]
    return True


def _assign(node: dict[str, Any], parts: list[str], value: str, full_key: str) -> None:
    key, rest = parts[0], parts[1:]
    if not rest:
        if isinstance(node.get(key), dict | list):
            raise _conflict(full_key)
        node[key] = value
        return
    if rest[0] == "":
        items = node.setdefault(key, _AppendList())
        if not isinstance(items, _AppendList):
            raise _conflict(full_key)
        after = rest[1:]
        if not after:
            items.append(value)
            return
        if not items or not isinstance(items[-1], dict) or _has_path(items[-1], after):
            items.append({})
        _assign(items[-1], after, value, full_key)
        return
    child = node.setdefault(key, {})
    if not isinstance(child, dict):
        raise _conflict(full_key)
    _assign(child, rest, value, full_key)


def _listify(value: Any, path: str) -> Any:
    """Turn dicts whose keys are all indexes into lists (ordered by index)."""
    if isinstance(value, list):
        return [_listify(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    converted = {k: _listify(v, f"{path}[{k}]" if path else k) for k, v in value.items()}
    if converted and all(k.isdigit() for k in converted):
        indexes = sorted(converted, key=int)
        if [int(k) for k in indexes] != list(range(len(indexes))):
            raise FormError(
                f"Invalid array: {path} must be indexed from 0 without gaps", path or "body"
            )
        return [converted[k] for k in indexes]
    return converted


def parse_pairs(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Nest decoded ``(key, value)`` pairs. Later scalars win, as in Rack."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = _split_key(key)
        if parts[0] == "":
            raise FormError(f"Invalid parameter name: {key!r}", key)
        _assign(root, parts, value, key)
    return _listify(root, "")


def parse_form(body: bytes | str) -> dict[str, Any]:
    """Parse a form-encoded body or query string into nested dicts and lists."""
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    if not text:
        return {}
    return parse_pairs(parse_qsl(text, keep_blank_values=True, strict_parsing=False))


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}[{k}]" if prefix else str(k), v, out)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _flatten(f"{prefix}[{i}]", v, out)
    elif value is None:
        return
    elif isinstance(value, bool):
        out.append((prefix, "true" if value else "false"))
    else:
        out.append((prefix, str(value)))


def encode_form(params: Mapping[str, Any]) -> str:
    """The inverse of :func:`parse_form`, for tests and raw-HTTP clients."""
    pairs: list[tuple[str, str]] = []
    _flatten("", params, pairs)
    return urlencode(pairs, safe="[]")
