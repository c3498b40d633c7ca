"""Structured JSON logging with a redaction guard.

One JSON object per line (time, level, logger, message, then the record's extras such
as request_id, caller, route, status, latency_ms, payment_id), so log pipelines can
index them without parsing prose. Every line passes through :class:`RedactingFilter`
before it is written: API keys, Stripe keys and webhook secrets never reach the log,
even when some library puts one in an exception message. The transports never log
headers wholesale; the filter is the second line of defence, not the first.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import IO, Any
from urllib.parse import quote

from payments.config import Settings

ACCESS_LOGGER = "payments.access"
MASK = "***"
# Shorter configured secrets are not masked by substring: masking "ab" everywhere would
# garble every line while protecting nothing worth the name.
MIN_SECRET_LENGTH = 4

# Values that look like secrets whatever their source: Stripe secret and restricted
# keys, webhook signing secrets, the v1 HMAC of a Stripe-Signature header, and local
# caller keys (payments/auth/local_keys.py: KEY_PREFIX + token_urlsafe).
_SECRET_PATTERNS = re.compile(
    r"(?:sk|rk)_(?:live|test)_[0-9A-Za-z_]+"
    r"|whsec_[0-9A-Za-z_+/=]+"
    r"|(?<=v1=)[0-9a-fA-F]{16,}"
    r"|paysvc_[0-9A-Za-z_-]+"
)
# The credentials of a URL (``mysql://user:p%40ss@db``: a DSN's password as written,
# however escaped). Apart, and only on text holding "://": in the one pattern it made
# every line's pass half as slow again (the access line, bench/README).
_URL_CREDENTIALS = re.compile(r"(?<=://)[^\s/?#@]*:[^\s/?#@]*(?=@)")

# Attributes every LogRecord has; anything else on a record is an ``extra`` to emit.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


# Set on a record by RedactingFilter: the redactor that already masked it.
_REDACTED_BY = "_payments_redacted_by"
# Extras' values that cannot hold text (bool is an int).
_PLAIN = (int, float, type(None))


class Redactor:
    """Masks secret-looking values and the configured secrets in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] = _SECRET_PATTERNS
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Register more secret values (for example keys learnt after start-up)."""
        new = {s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}
        if not new - self._secrets:
            return
        self._secrets |= new
        # Longest first, so a secret containing another is masked whole.
        literal = "|".join(re.escape(s) for s in sorted(self._secrets, key=len, reverse=True))
        self._pattern = re.compile(f"{literal}|{_SECRET_PATTERNS.pattern}")

    def text(self, value: str) -> str:
        value = self._pattern.sub(MASK, value)
        return _URL_CREDENTIALS.sub(MASK, value) if "://" in value else value

    def value(self, value: Any) -> Any:
        """Redact strings inside an extra's value (str, or dict/list/tuple of them)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.value(k): self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value


class RedactingFilter(logging.Filter):
    """Rewrites each record so that its message, extras and traceback hold no secret.

    It renders ``msg % args`` itself (args may carry a secret) and formats the
    traceback into ``exc_text`` so the formatter only ever sees redacted text.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        redact = self.redactor
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = f"{record.msg!r} {record.args!r}"
        record.msg = redact.text(message)
        record.args = None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact.text("".join(traceback.format_exception(*record.exc_info)))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact.text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact.text(record.stack_info)
        fields = vars(record)
        for key in fields.keys() - _STANDARD_ATTRS:
            value = fields[key]
            if type(value) is str:
                fields[key] = redact.text(value)
            elif not isinstance(value, _PLAIN):  # numbers and None hold no secret
                fields[key] = redact.value(value)
        # Done field by field (before JSON escaping could hide a secret holding a quote
        # or a backslash): a formatter with the same redactor need not pass again.
        fields[_REDACTED_BY] = redact
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, then the extras."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        fields = vars(record)
        entry: dict[str, Any] = {
            "time": _utc_millis(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        redacted_by = fields.get(_REDACTED_BY)
        for key, value in fields.items():
            if key not in _STANDARD_ATTRS and key not in entry and key != _REDACTED_BY:
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info))
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        line = _ENCODER.encode(entry)
        # Last pass over the finished line for a record that reached this formatter
        # without the filter's field-by-field pass (another handler's, or none): it is
        # still masked. One pass each, not two (the access line's profile, bench/README).
        if self.redactor is None or redacted_by is self.redactor:
            return line
        return self.redactor.text(line)


# json.dumps(entry, default=str, ensure_ascii=False), without a new encoder per line.
_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)


class _SecondCache:
    """The ``YYYY-MM-DDTHH:MM:SS`` of the last second formatted (lines come in bursts
    within one second: the datetime round trip per line was ~2 us of each)."""

    second: int = -1
    text: str = ""


def _utc_millis(created: float) -> str:
    """``created`` (epoch seconds) as RFC 3339 UTC with milliseconds, e.g.
    ``2026-11-29T18:45:15.042Z`` (truncated to the millisecond, like isoformat)."""
    micros = round(created * 1_000_000)
    second, fraction = divmod(micros, 1_000_000)
    if second != _SecondCache.second:
        _SecondCache.text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _SecondCache.second = second
    return f"{_SecondCache.text}.{fraction // 1000:03d}Z"


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}

# Wire-level libraries that log every header they encode or decode at DEBUG (hpack
# prints `x-api-key` in clear). They stay at WARNING whatever LOG_LEVEL says.
WIRE_LOGGERS = ("hpack", "h2", "h11", "httpcore", "httpx")

_installed: logging.Handler | None = None
_redactor = Redactor()


def secrets_of(settings: Settings) -> list[str]:
    """Every configured secret value that must never be logged."""
    values = [
        settings.app_api_key,
        settings.stripe_secret_key,
        settings.stripe_webhook_secret,
        *settings.callback_signing_secret.split(),  # one or more, each masked alone
    ]
    if settings.mysql_dsn is not None:
        password = settings.mysql_dsn.password
        # Also as a URL writes it (the pattern above covers a whole URL's credentials).
        escaped = quote(password, safe="")
        lower = re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), escaped)
        values += [password, escaped, lower]
    return [v for v in values if v]


def add_secrets(secrets: Iterable[str]) -> None:
    """Mask these values in every log line from now on."""
    _redactor.add(secrets)


def setup_logging(
    level: str = "info", secrets: Iterable[str] = (), stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log record, as JSON, to ``stream`` (stderr by default).

    Calling it again replaces the handler it installed before (tests and the CLI can
    both call it). Returns the handler, which carries the redaction filter.
    """
    global _installed
    _redactor.add(secrets)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(_redactor))
    handler.addFilter(RedactingFilter(_redactor))
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level.lower(), logging.INFO))
    for name in WIRE_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # hypercorn's own access log is off (we write ours); its error log joins ours.
    logging.getLogger("hypercorn.access").disabled = True
    _installed = handler
    return handler


def setup_from_settings(settings: Settings, stream: IO[str] | None = None) -> logging.Handler:
    """:func:`setup_logging` at ``LOG_LEVEL`` masking every configured secret."""
    return setup_logging(settings.log_level, secrets_of(settings), stream)


def redactor() -> Redactor:
    """The process-wide redactor (the transports use it for values they echo)."""
    return _redactor


def access_log(
    *,
    transport: str,
    route: str,
    status: int | str,
    latency_ms: float,
    request_id: str = "",
    caller: str = "",
    level: int = logging.INFO,
    **extra: Any,
) -> None:
    """Write the one access line of an HTTP request or gRPC call.

    The record is made and handed to the logger directly: ``Logger.log`` would also
    walk the stack for the caller's file and line, which no line ever shows."""
    if not _ACCESS.isEnabledFor(level):
        return
    record = _ACCESS.makeRecord(
        ACCESS_LOGGER,
        level,
        __file__,
        0,
        f"{transport} {route} {status}",
        None,
        None,
        extra={
            "transport": transport,
            "route": route,
            "status": status,
            "latency_ms": round(latency_ms, 3),
            "request_id": request_id,
            "caller": caller,
            **extra,
        },
    )
    _ACCESS.handle(record)


_ACCESS = logging.getLogger(ACCESS_LOGGER)
