"""Parameter schemas and Stripe-shaped request errors.

Every endpoint declares the parameters it knows. Form values arrive as strings; the
schema coerces them (integers, booleans, enums, metadata maps) and, as Stripe does,
refuses unknown parameters by name (``Received unknown parameter: line_items[0][foo]``),
so a typo in the provider fails a test here instead of being ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

# A spec is a coercer, a dict of specs (an object), or a one-element list (an array).
Coercer = Callable[[Any, str], Any]
Spec = Coercer | dict[str, Any] | list[Any]

METADATA_MAX_KEYS = 50
METADATA_KEY_MAX = 40
METADATA_VALUE_MAX = 500


class StripeError(Exception):
    """An error answered the way Stripe does: ``{"error": {...}}`` with an HTTP status."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        if self.code is not None:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        return {"error": error}


def invalid(message: str, param: str | None = None, code: str | None = None) -> StripeError:
    return StripeError(message, param=param, code=code)


def missing(param: str) -> StripeError:
    return StripeError(f"Missing required param: {param}.", param=param, code="parameter_missing")


def no_such(kind: str, object_id: str, param: str = "id") -> StripeError:
    return StripeError(
        f"No such {kind}: '{object_id}'", status=404, param=param, code="resource_missing"
    )


# --- coercers -------------------------------------------------------------------------


def string(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise invalid(f"Invalid string: {param} must be a string", param)
    return value


def max_len(limit: int) -> Coercer:
    def coerce(value: Any, param: str) -> str:
        text = string(value, param)
        if len(text) > limit:
            raise invalid(
                f"Invalid string: {text[:20]}...; must be at most {limit} characters", param
            )
        return text

    return coerce


def integer(value: Any, param: str) -> int | None:
    text = string(value, param)
    if text == "":
        return None
    if not re.fullmatch(r"-?\d+", text):
        raise invalid(f"Invalid integer: {text}", param, code="parameter_invalid_integer")
    return int(text)


def boolean(value: Any, param: str) -> bool | None:
    text = string(value, param)
    if text == "":
        return None
    if text not in ("true", "false"):
        raise invalid(f"Invalid boolean: {text}", param)
    return text == "true"


def one_of(*choices: str) -> Coercer:
    def coerce(value: Any, param: str) -> str | None:
        text = string(value, param)
        if text == "":
            return None
        if text not in choices:
            raise invalid(f"Invalid {param}: must be one of {', '.join(choices)}", param)
        return text

    return coerce


def url(value: Any, param: str) -> str | None:
    text = string(value, param)
    if text == "":
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise invalid("Not a valid URL", param, code="url_invalid")
    return text


def metadata(value: Any, param: str) -> dict[str, str]:
    """Stripe's metadata limits; an empty value unsets its key (``metadata[k]=``)."""
    if value == "":
        return {}
    if not isinstance(value, dict):
        raise invalid(f"Invalid object: {param} must be a hash of strings", param)
    if len(value) > METADATA_MAX_KEYS:
        raise invalid(f"Invalid {param}: metadata can have at most {METADATA_MAX_KEYS} keys", param)
    out: dict[str, str] = {}
    for key, item in value.items():
        sub = f"{param}[{key}]"
        if not isinstance(item, str):
            raise invalid(f"Invalid string: {sub} must be a string", sub)
        if len(key) > METADATA_KEY_MAX:
            raise invalid(
                f"Metadata keys can have up to {METADATA_KEY_MAX} characters; "
                f"{key!r} has {len(key)}.",
                sub,
            )
        if len(item) > METADATA_VALUE_MAX:
            raise invalid(
                f"Metadata values can have up to {METADATA_VALUE_MAX} characters, "
                f"but you passed in a value that is {len(item)} characters.",
                sub,
            )
        out[key] = item
    return out


def coerce(value: Any, spec: Spec, param: str) -> Any:
    """Check ``value`` against ``spec`` and return it with its types coerced."""
    if isinstance(spec, dict):
        if value == "":
            return None
        if not isinstance(value, dict):
            raise invalid(f"Invalid object: {param} must be a hash", param or None)
        out: dict[str, Any] = {}
        for key, item in value.items():
            sub = f"{param}[{key}]" if param else key
            if key not in spec:
                raise invalid(f"Received unknown parameter: {sub}", sub, code="parameter_unknown")
            result = coerce(item, spec[key], sub)
            if result is not None:
                out[key] = result
        return out
    if isinstance(spec, list):
        if value == "":
            return []
        if not isinstance(value, list):
            raise invalid(f"Invalid array: {param} must be an array", param)
        return [coerce(item, spec[0], f"{param}[{i}]") for i, item in enumerate(value)]
    return spec(value, param)


EXPAND: list[Any] = [string]


# Currencies without minor units (Stripe's table).
_ZERO_DECIMAL_CODES = "bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf"
ZERO_DECIMAL = frozenset(_ZERO_DECIMAL_CODES.split())


class SessionStateError(ValueError):
    """A helper was asked for a move the session's status does not allow."""
