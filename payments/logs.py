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
import time
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


# Redactor.text_of_few's bounds: at most this many values, each at most this long.
_KNOWN_SIZE = 512
_KNOWN_LENGTH = 200

# Set on a record by RedactingFilter: the redactor that already masked it.
_REDACTED_BY = "_payments_redacted_by"
# Extras' values that cannot hold text (bool is an int).
_PLAIN = (int, float, type(None))


class Redactor:
    """Masks secret-looking values and the configured secrets in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] = _SECRET_PATTERNS
        self._known: dict[str, str] = {}
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
        # After the new pattern: text_of_few may then store an old pattern's result in
        # the old dict, never in this one.
        self._known = {}

    def text(self, value: str) -> str:
        value = self._pattern.sub(MASK, value)
        return _URL_CREDENTIALS.sub(MASK, value) if "://" in value else value

    def text_of_few(self, value: str) -> str:
        """:meth:`text`, remembered: for values drawn from a small set (routes, callers,
        methods) that recur on every access line (a pass is ~0.8 us on a route). The
        cache is bounded, as a caller can make some of them (an unknown gRPC method)."""
        known = self._known
        masked = known.get(value)
        if masked is None:
            masked = self.text(value)
            if len(value) <= _KNOWN_LENGTH:
                if len(known) >= _KNOWN_SIZE:
                    known.clear()
                known[value] = masked
        return masked

    def value(self, value: Any) -> Any:
        """Redact strings inside an extra's value (str, or dict/list/tuple of them).
        Any other object (an exception, a URL object, a set) is written as its ``str``
        (the formatter's ``default``), so it is made that text here and redacted."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.value(k): self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        if isinstance(value, _PLAIN):
            return value
        return self.text(str(value))


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
    formatter, redacting = JsonFormatter(_redactor), RedactingFilter(_redactor)
    handler.setFormatter(formatter)
    handler.addFilter(redacting)
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
    _Direct.handler, _Direct.formatter, _Direct.filter = handler, formatter, redacting
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

    While logging is exactly as :func:`setup_logging` left it, the line is built and
    written here (:func:`_direct_handler`): the same bytes the record path writes, at
    half its cost (no LogRecord, no pass over a record's 20 standard attributes in the
    filter and the formatter). Otherwise (pytest's caplog, another handler, a filter)
    the record is made and handed to the logger directly: ``Logger.log`` would also
    walk the stack for the caller's file and line, which no line ever shows."""
    if not _ACCESS.isEnabledFor(level):
        return
    fields: dict[str, Any] = {
        "transport": transport,
        "route": route,
        "status": status,
        "latency_ms": round(latency_ms, 3),
        "request_id": request_id,
        "caller": caller,
        **extra,
    }
    message = f"{transport} {route} {status}"
    handler = _direct_handler(level)
    if handler is not None and not (extra and _RESERVED.intersection(extra)):
        try:
            line: str | None = _access_line(level, message, fields)
        except Exception:  # the record path meets it again and reports it as it does
            line = None
        if line is not None:
            _write(handler, line, level, message)
            return
    _ACCESS.handle(
        _ACCESS.makeRecord(ACCESS_LOGGER, level, __file__, 0, message, None, None, extra=fields)
    )


_ACCESS = logging.getLogger(ACCESS_LOGGER)


class _Direct:
    """What :func:`setup_logging` installed last: the handler, its formatter, its filter."""

    handler: logging.StreamHandler[Any] | None = None
    formatter: JsonFormatter | None = None
    filter: RedactingFilter | None = None


# Extras the record path refuses (makeRecord raises KeyError) or treats apart (skipped
# by the formatter, or not redacted): such a call takes the record path.
_RESERVED = _STANDARD_ATTRS | {_REDACTED_BY, "time", "level", "logger", "message"}


def _direct_handler(level: int) -> logging.StreamHandler[Any] | None:
    """The installed handler if the record path would reach it and it alone, through
    its own filter and formatter only, with nothing else seeing the record: then the
    line written directly is what that path writes, and no one misses the record."""
    handler, formatter, redacting = _Direct.handler, _Direct.formatter, _Direct.filter
    if (
        handler is None
        or formatter is None
        or redacting is None
        or handler.level > level
        or handler.formatter is not formatter
        or len(handler.filters) != 1
        or handler.filters[0] is not redacting
        or redacting.redactor is not _redactor
        or formatter.redactor is not _redactor
        or _ACCESS.handlers
        or _ACCESS.filters
        or not _ACCESS.propagate
        or type(_ACCESS) is not logging.Logger
        or logging.getLogRecordFactory() is not logging.LogRecord
    ):
        return None
    logger = _ACCESS.parent
    while logger is not None and logger.parent is not None:  # "payments", if made
        if logger.handlers or not logger.propagate:
            return None
        logger = logger.parent
    if logger is None or len(logger.handlers) != 1 or logger.handlers[0] is not handler:
        return None
    return handler


def _created() -> float:
    """``LogRecord.created`` for a record made now (Python 3.13 takes it from time_ns)."""
    if _CREATED_FROM_NS:
        return time.time_ns() / 1e9
    return time.time()


_CREATED_FROM_NS = sys.version_info >= (3, 13)


# Access fields whose text values come from a small set (Redactor.text_of_few); the
# rest (request_id, path, ...) rarely repeat.
_FEW = frozenset({"transport", "route", "status", "caller", "method"})


def _access_line(level: int, message: str, fields: dict[str, Any]) -> str:
    """The line JsonFormatter writes for the access record RedactingFilter passed."""
    redact = _redactor
    entry: dict[str, Any] = {
        "time": _utc_millis(_created()),
        "level": logging.getLevelName(level).lower(),
        "logger": ACCESS_LOGGER,
        "message": redact.text_of_few(message),
    }
    for key, value in fields.items():
        if type(value) is str:
            entry[key] = redact.text_of_few(value) if key in _FEW else redact.text(value)
        elif isinstance(value, _PLAIN):
            entry[key] = value
        else:
            entry[key] = redact.value(value)
    return _ENCODER.encode(entry)


def _write(handler: logging.StreamHandler[Any], line: str, level: int, message: str) -> None:
    """StreamHandler.emit's write and flush, under the handler's lock as Handler.handle."""
    handler.acquire()
    try:
        handler.stream.write(line + handler.terminator)
        handler.flush()
    except RecursionError:
        raise
    except Exception:
        record = _ACCESS.makeRecord(ACCESS_LOGGER, level, __file__, 0, message, None, None)
        record.msg = _redactor.text(message)
        handler.handleError(record)
    finally:
        handler.release()
