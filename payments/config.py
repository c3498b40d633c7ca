"""Settings from the environment (and a ``.env`` file), validated at start.

Names and defaults are those of the service this one replaces (CONTRACT.md); new ones
take the ``PAYMENTS_`` or ``STRIPE_`` prefix. A value that does not parse is an error
naming the variable, never a silent default. ``config/.env.example`` documents each one.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from dotenv import dotenv_values

from payments.callback_urls import CallbackPolicy, parse_policy

T = TypeVar("T")


class ConfigError(Exception):
    """A setting is missing or does not parse; the message names the variable."""


@attrs.frozen
class MysqlDsn:
    host: str
    port: int
    user: str
    password: str = attrs.field(repr=False)
    database: str
    unix_socket: str = ""

    def redacted(self) -> str:
        where = self.unix_socket or f"{self.host}:{self.port}"
        return f"mysql://{self.user}:***@{where}/{self.database}"


_GO_NETS = ("tcp", "tcp4", "tcp6", "unix")
_DEFAULT_SOCKET = "/tmp/mysql.sock"  # noqa: S108  (Go driver's default for unix)


def _split_host_port(addr: str, name: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` -> (host, port); v6 unbracketed."""
    if addr.startswith("["):
        host, bracket, rest = addr[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ConfigError(f"{name}: bad address {addr!r}")
        port_text = rest[1:]
    elif addr.count(":") == 1:
        host, _, port_text = addr.partition(":")
    else:  # a bare name, or a bare IPv6 address
        host, port_text = addr, ""
    if not port_text:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{name}: bad port {port_text!r}")
    return host, int(port_text)


def _parse_go_dsn(dsn: str, name: str) -> MysqlDsn:
    """Go's ``[user[:password]@][net[(addr)]]/dbname[?params]``, split as the Go driver
    does: at the last ``/``, then the last ``@`` before it, then the first ``:``, so a
    password may hold ``@``, ``:`` or ``/`` unescaped (the Go form never url-decodes)."""
    slash = dsn.rfind("/")
    if slash < 0:
        raise ConfigError(
            f"{name}: not a DSN; expected user:pass@tcp(host:port)/db or "
            "mysql://user:pass@host:port/db"
        )
    left, right = dsn[:slash], dsn[slash + 1 :]
    credentials, at, location = left.rpartition("@")
    if not at:
        credentials, location = "", left
    user, _, password = credentials.partition(":")
    net, paren, addr = location.partition("(")
    if paren:
        if not addr.endswith(")") or ")" in addr[:-1]:
            raise ConfigError(f"{name}: bad address in DSN; expected net(address)")
        addr = addr[:-1]
    net = net or "tcp"
    if net not in _GO_NETS:
        # Not repeated: without an "@" this part may be "user:password".
        raise ConfigError(f"{name}: unknown network in DSN; expected tcp(host:port) or unix(path)")
    database = right.partition("?")[0]
    if net == "unix":
        return MysqlDsn(
            host="127.0.0.1",
            port=3306,
            user=user or "root",
            password=password,
            database=database,
            unix_socket=addr or _DEFAULT_SOCKET,
        )
    host, port = _split_host_port(addr, name, 3306) if addr else ("127.0.0.1", 3306)
    return MysqlDsn(
        host=host or "127.0.0.1",
        port=port,
        user=user or "root",
        password=password,
        database=database,
    )


def parse_mysql_dsn(dsn: str, name: str = "MYSQL_DSN") -> MysqlDsn:
    """Parse both forms: Go's ``user:pass@tcp(host:port)/db?parseTime=true`` and
    ``mysql://user:pass@host:port/db`` (user, password and database url-encoded).
    Query parameters other than ``unix_socket`` are accepted and ignored (the pool
    always uses utf8mb4 and UTC). Errors never repeat the DSN: it holds a password."""
    dsn = dsn.strip()
    if not dsn.startswith(("mysql://", "mariadb://")):
        return _parse_go_dsn(dsn, name)
    try:
        url = urlsplit(dsn)
        port = url.port or 3306
    except ValueError:
        raise ConfigError(f"{name}: bad host or port in DSN URL") from None
    socket = parse_qs(url.query).get("unix_socket", [""])[0]
    return MysqlDsn(
        host=url.hostname or "127.0.0.1",
        port=port,
        user=unquote(url.username or "") or "root",
        password=unquote(url.password or ""),
        database=unquote(url.path.lstrip("/")),
        unix_socket=socket,
    )


def parse_host_port(value: str, name: str = "AUTH_SERVICE_GRPC_ADDR") -> tuple[str, int]:
    """A gRPC target as the Go service took it: ``host:port``, ``[v6]:port``, optionally
    behind ``dns:///``. The port is required (grpc-go would silently pick 443)."""
    target = value.strip().removeprefix("dns:///")
    host, port = _split_host_port(target, name, 0)
    if not host or not port:
        raise ConfigError(f"{name}: {value!r} is not host:port")
    return host, port


@attrs.frozen
class Settings:
    """Every setting of the service. Build it with :func:`load_settings`."""

    app_service_name: str = "payments-service"
    app_api_key: str = attrs.field(default="", repr=False)
    auth_service_grpc_addr: str = "localhost:9090"
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 9090
    mysql_dsn: MysqlDsn | None = None
    mysql_max_open_conns: int = 10
    mysql_max_idle_conns: int = 5
    mysql_conn_max_lifetime_minutes: float = 30
    # Every database round trip (and finding a session); then 503 and the session dropped.
    db_query_timeout_seconds: float = 5
    log_level: str = "info"
    stripe_secret_key: str = attrs.field(default="", repr=False)
    stripe_webhook_secret: str = attrs.field(default="", repr=False)
    stripe_signature_tolerance_seconds: int = 300
    stripe_http_timeout_seconds: float = 10
    stripe_api_base: str = "https://api.stripe.com"
    stripe_max_network_retries: int = 2
    provider_callback_base_url: str = ""
    callback_max_attempts: int = 10
    callback_retry_interval_minutes: float = 5
    callback_http_timeout_seconds: float = 10
    callback_signing_secret: str = attrs.field(default="", repr=False)
    callback_allowed_hosts: tuple[str, ...] = ()
    # Set by the embedded profile (payments.profile), not by a variable: callbacks to
    # loopback are allowed too.
    callback_allow_loopback: bool = False
    pending_timeout_minutes: float = 60
    reconcile_stale_after_minutes: float = 15
    job_batch_size: int = 100
    reconcile_interval_minutes: float = 2
    callback_dispatch_interval_minutes: float = 1
    expire_pending_interval_minutes: float = 5
    reconcile_rate_per_second: float = 20
    job_concurrency: int = 4
    trusted_callers: tuple[str, ...] = ()
    auth_cache_ttl_seconds: float = 30
    auth_timeout_seconds: float = 5
    max_body_bytes: int = 256 * 1024
    shutdown_grace_seconds: float = 10
    grpc_idle_timeout_seconds: float = 60
    sqlite_path: str = "var/payments.db"
    api_keys_file: str = ""
    api_keys: str = attrs.field(default="", repr=False)
    sandbox_port: int = 12111
    # /metrics (Prometheus) on HTTP_HOST; 0 picks a free port.
    metrics_port: int = 9464
    # A one-off job writes its metrics here at exit (Prometheus text format).
    metrics_textfile: str = ""
    # The variables the environment actually set (profile selection needs to know
    # "not set" apart from "set to the default").
    explicit: frozenset[str] = attrs.field(default=frozenset(), repr=False)

    def is_set(self, variable: str) -> bool:
        return variable in self.explicit

    def callback_policy(self) -> CallbackPolicy:
        """Where status callbacks may go (payments.callback_urls), checked at create and
        at delivery."""
        return parse_policy(
            self.callback_allowed_hosts, allow_loopback=self.callback_allow_loopback
        )


_INTEGER = re.compile(r"[+-]?[0-9]+")


def _str(value: str, name: str) -> str:
    return value.strip()


def _int(minimum: int, maximum: int | None = None) -> Callable[[str, str], int]:
    def parse(value: str, name: str) -> int:
        text = value.strip()
        # Plain ASCII digits only: Python's int() would also take "1_000" or "١٢".
        if not _INTEGER.fullmatch(text):
            raise ConfigError(f"{name}: {value!r} is not an integer")
        number = int(text)
        if number < minimum or (maximum is not None and number > maximum):
            upper = f" and <= {maximum}" if maximum is not None else ""
            raise ConfigError(f"{name}: {number} must be >= {minimum}{upper}")
        return number

    return parse


def _float(minimum: float) -> Callable[[str, str], float]:
    def parse(value: str, name: str) -> float:
        try:
            number = float(value.strip())
        except ValueError:
            raise ConfigError(f"{name}: {value!r} is not a number") from None
        if not number >= minimum or number == float("inf"):
            raise ConfigError(f"{name}: {number} must be a finite number >= {minimum}")
        return number

    return parse


def _list(value: str, name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _allowed_hosts(value: str, name: str) -> tuple[str, ...]:
    """Host names, ``*.suffix`` wildcards, IP addresses or CIDR ranges, each checked now
    so a typo stops the start instead of refusing callbacks later."""
    entries = _list(value, name)
    try:
        parse_policy(entries)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return entries


def _log_level(value: str, name: str) -> str:
    level = value.strip().lower()
    if level not in ("debug", "info", "warn", "warning", "error"):
        raise ConfigError(f"{name}: {value!r} is not one of debug, info, warn, error")
    return "warning" if level == "warn" else level


def _url(value: str, name: str) -> str:
    url = value.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not an http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: {value!r} is not an http(s) URL")
    return url


def _grpc_addr(value: str, name: str) -> str:
    parse_host_port(value, name)
    return value.strip()


def _dsn(value: str, name: str) -> MysqlDsn | None:
    return parse_mysql_dsn(value, name) if value.strip() else None


SECRET_VARIABLE = "PAYMENTS_CALLBACK_SIGNING_SECRET"  # noqa: S105  (a name, not a secret)
SECRET_PREFIX = "whsec_"  # noqa: S105
MIN_SECRET_BYTES = 24


def parse_signing_secret(value: str) -> bytes:
    """The HMAC key of a callback signing secret (payments.jobs.signing signs with it).

    The value is ``whsec_`` followed by standard base64, or the bare base64 alone
    (padding optional), and must decode to at least 24 bytes (the Standard Webhooks
    minimum). Anything else is a ConfigError naming the variable (never repeating the
    value): the library itself would quietly decode a non-base64 string into some other
    key (its base64 decoding drops characters it does not know), signing with a key the
    receiver does not have. Generate one with::

        python -c "import os, base64; print('whsec_' + base64.b64encode(os.urandom(32)).decode())"
    """
    text = value.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(
            f"{SECRET_VARIABLE}: not base64; expected whsec_<base64 of at least "
            f"{MIN_SECRET_BYTES} random bytes>"
        ) from None
    if len(key) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{SECRET_VARIABLE}: decodes to {len(key)} bytes; at least {MIN_SECRET_BYTES} "
            "are required"
        )
    return key


def parse_signing_secrets(value: str) -> list[bytes]:
    """The HMAC keys of a space-separated list of signing secrets (rotation: every
    callback is signed with each). A bad one is a ConfigError naming its position."""
    parts = value.split()
    keys = []
    for number, part in enumerate(parts, 1):
        try:
            keys.append(parse_signing_secret(part))
        except ConfigError as exc:
            if len(parts) == 1:
                raise
            where = f"{SECRET_VARIABLE} (secret {number} of {len(parts)})"
            raise ConfigError(str(exc).replace(SECRET_VARIABLE, where, 1)) from None
    return keys


def _signing_secret(value: str, name: str) -> str:
    # Checked here so a bad secret stops the start.
    parse_signing_secrets(value)
    return " ".join(value.split())


# variable -> (Settings field, parser). Port 0 lets tests ask for any free port.
_VARIABLES: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "APP_SERVICE_NAME": ("app_service_name", _str),
    "APP_API_KEY": ("app_api_key", _str),
    "AUTH_SERVICE_GRPC_ADDR": ("auth_service_grpc_addr", _grpc_addr),
    "HTTP_HOST": ("http_host", _str),
    "HTTP_PORT": ("http_port", _int(0, 65535)),
    "GRPC_HOST": ("grpc_host", _str),
    "GRPC_PORT": ("grpc_port", _int(0, 65535)),
    "MYSQL_DSN": ("mysql_dsn", _dsn),
    "MYSQL_MAX_OPEN_CONNS": ("mysql_max_open_conns", _int(1, 10_000)),
    "MYSQL_MAX_IDLE_CONNS": ("mysql_max_idle_conns", _int(0, 10_000)),
    "MYSQL_CONN_MAX_LIFETIME_MINUTES": ("mysql_conn_max_lifetime_minutes", _float(0)),
    "PAYMENTS_DB_QUERY_TIMEOUT_SECONDS": ("db_query_timeout_seconds", _float(0.001)),
    "LOG_LEVEL": ("log_level", _log_level),
    "STRIPE_SECRET_KEY": ("stripe_secret_key", _str),
    "STRIPE_WEBHOOK_SECRET": ("stripe_webhook_secret", _str),
    "STRIPE_SIGNATURE_TOLERANCE_SECONDS": ("stripe_signature_tolerance_seconds", _int(1)),
    "STRIPE_HTTP_TIMEOUT_SECONDS": ("stripe_http_timeout_seconds", _float(0.001)),
    "STRIPE_API_BASE": ("stripe_api_base", _url),
    "STRIPE_MAX_NETWORK_RETRIES": ("stripe_max_network_retries", _int(0, 10)),
    "PAYMENTS_PROVIDER_CALLBACK_BASE_URL": ("provider_callback_base_url", _url),
    "PAYMENTS_CALLBACK_MAX_ATTEMPTS": ("callback_max_attempts", _int(1)),
    "PAYMENTS_CALLBACK_RETRY_INTERVAL_MINUTES": ("callback_retry_interval_minutes", _float(0)),
    "PAYMENTS_CALLBACK_HTTP_TIMEOUT_SECONDS": ("callback_http_timeout_seconds", _float(0.001)),
    "PAYMENTS_CALLBACK_SIGNING_SECRET": ("callback_signing_secret", _signing_secret),
    "PAYMENTS_CALLBACK_ALLOWED_HOSTS": ("callback_allowed_hosts", _allowed_hosts),
    "PAYMENTS_PENDING_TIMEOUT_MINUTES": ("pending_timeout_minutes", _float(0)),
    "PAYMENTS_RECONCILE_STALE_AFTER_MINUTES": ("reconcile_stale_after_minutes", _float(0)),
    "PAYMENTS_JOB_BATCH_SIZE": ("job_batch_size", _int(1, 10_000)),
    "PAYMENTS_RECONCILE_INTERVAL_MINUTES": ("reconcile_interval_minutes", _float(0.001)),
    "PAYMENTS_CALLBACK_DISPATCH_INTERVAL_MINUTES": (
        "callback_dispatch_interval_minutes",
        _float(0.001),
    ),
    "PAYMENTS_EXPIRE_PENDING_INTERVAL_MINUTES": ("expire_pending_interval_minutes", _float(0.001)),
    "PAYMENTS_RECONCILE_RATE_PER_SECOND": ("reconcile_rate_per_second", _float(0.001)),
    "PAYMENTS_JOB_CONCURRENCY": ("job_concurrency", _int(1, 256)),
    "PAYMENTS_TRUSTED_CALLERS": ("trusted_callers", _list),
    "PAYMENTS_AUTH_CACHE_TTL_SECONDS": ("auth_cache_ttl_seconds", _float(0)),
    "PAYMENTS_AUTH_TIMEOUT_SECONDS": ("auth_timeout_seconds", _float(0.001)),
    "PAYMENTS_MAX_BODY_BYTES": ("max_body_bytes", _int(1024, 64 * 1024 * 1024)),
    "PAYMENTS_GRPC_IDLE_TIMEOUT_SECONDS": ("grpc_idle_timeout_seconds", _float(0.001)),
    "PAYMENTS_SHUTDOWN_GRACE_SECONDS": ("shutdown_grace_seconds", _float(0)),
    "PAYMENTS_SQLITE_PATH": ("sqlite_path", _str),
    "PAYMENTS_API_KEYS_FILE": ("api_keys_file", _str),
    "PAYMENTS_API_KEYS": ("api_keys", _str),
    "PAYMENTS_SANDBOX_PORT": ("sandbox_port", _int(0, 65535)),
    "PAYMENTS_METRICS_PORT": ("metrics_port", _int(0, 65535)),
    "PAYMENTS_METRICS_TEXTFILE": ("metrics_textfile", _str),
}


def variable_names() -> list[str]:
    """Every environment variable the service reads (config/.env.example lists them)."""
    return list(_VARIABLES)


def load_settings(
    environ: Mapping[str, str] | None = None, dotenv_path: str | Path | None = ".env"
) -> Settings:
    """Build Settings from ``.env`` (if the file exists) overlaid by the real environment.

    Raises ConfigError naming the first variable that does not parse.
    """
    values: dict[str, str] = {}
    if dotenv_path is not None and Path(dotenv_path).is_file():
        values.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    values.update(os.environ if environ is None else environ)
    fields: dict[str, Any] = {}
    explicit = set()
    for variable, (field, parse) in _VARIABLES.items():
        raw = values.get(variable)
        if raw is None or raw.strip() == "":
            continue
        fields[field] = parse(raw, variable)
        explicit.add(variable)
    settings = Settings(**fields, explicit=frozenset(explicit))
    if settings.mysql_max_idle_conns > settings.mysql_max_open_conns:
        settings = attrs.evolve(settings, mysql_max_idle_conns=settings.mysql_max_open_conns)
    return settings
