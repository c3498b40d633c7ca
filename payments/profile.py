"""Which real part, or which embedded stand-in, plays each role; decided once at start.

Three roles, each independent of the others:

- storage: MySQL when ``MYSQL_DSN`` is set, else a SQLite file (``PAYMENTS_SQLITE_PATH``,
  single process);
- Stripe: real Stripe when ``STRIPE_SECRET_KEY`` is set (then ``STRIPE_WEBHOOK_SECRET``
  and ``PAYMENTS_PROVIDER_CALLBACK_BASE_URL`` are required: a half-configured Stripe is
  an error, never a silent fallback), else the Stripe sandbox as a supervised child;
- callers' API keys: the Auth service when ``AUTH_SERVICE_GRPC_ADDR`` is set; local
  keys when ``PAYMENTS_API_KEYS_FILE`` / ``PAYMENTS_API_KEYS`` are; a dev key
  (payments.auth.dev_key, kept in a file beside the SQLite database) when the sandbox
  plays Stripe; otherwise the Auth service at the old default ``localhost:9090``, so
  deploy files of the Go service keep working unchanged.

With none of ``MYSQL_DSN``, ``STRIPE_SECRET_KEY`` and ``AUTH_SERVICE_GRPC_ADDR`` set,
everything is embedded: ``make serve`` on a fresh machine runs the whole thing. Stand-ins
that take fake money or accept a dev key (the sandbox, dev keys) bind loopback only;
the hosts default to 127.0.0.1 and a non-loopback host is refused.
"""

from __future__ import annotations

import ipaddress
import secrets
from typing import Literal

import attrs

from payments.auth.dev_key import DEV_SERVICE, dev_key_path, load_or_create_dev_key
from payments.config import ConfigError, Settings

SANDBOX_SECRET_KEY = "sk_test_sandbox"  # noqa: S105  (the loopback sandbox's, not a secret)
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

StorageKind = Literal["mysql", "sqlite"]
StripeKind = Literal["stripe", "sandbox"]
AuthKind = Literal["auth-service", "local-keys", "dev-key"]


@attrs.frozen
class Profile:
    storage: StorageKind
    stripe: StripeKind
    auth: AuthKind
    settings: Settings  # the effective settings, stand-ins' values filled in
    dev_api_key: str = attrs.field(default="", repr=False)
    # The key the sandbox forwards its events with, as a gateway would (random per run).
    sandbox_gateway_key: str = attrs.field(default="", repr=False)

    @property
    def embedded(self) -> bool:
        return self.storage == "sqlite" and self.stripe == "sandbox" and self.auth == "dev-key"

    @property
    def stand_ins(self) -> list[str]:
        parts = []
        if self.storage == "sqlite":
            parts.append("SQLite storage")
        if self.stripe == "sandbox":
            parts.append("Stripe sandbox")
        if self.auth == "dev-key":
            parts.append("dev API key")
        return parts

    @property
    def loopback_only(self) -> bool:
        return self.stripe == "sandbox" or self.auth == "dev-key"

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.sandbox_port}"


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_profile(settings: Settings, serves_api: bool = True) -> Profile:
    """Pick each role's backend; raises ConfigError naming what is missing or wrong.

    ``serves_api``: whether HTTP or gRPC run (they need the webhook secret, the callback
    base URL and a way to check keys); a one-off job needs less.
    """
    storage: StorageKind = "mysql" if settings.mysql_dsn is not None else "sqlite"
    stripe: StripeKind = "stripe" if settings.stripe_secret_key else "sandbox"
    if stripe == "stripe":
        needed = ["STRIPE_WEBHOOK_SECRET", "PAYMENTS_PROVIDER_CALLBACK_BASE_URL"]
        missing = [name for name in needed if serves_api and not settings.is_set(name)]
        if missing:
            raise ConfigError(
                f"{', '.join(missing)}: required with STRIPE_SECRET_KEY (Stripe is half "
                "configured; unset STRIPE_SECRET_KEY to use the embedded sandbox instead)"
            )
    else:
        stray = [
            name for name in ("STRIPE_WEBHOOK_SECRET", "STRIPE_API_BASE") if settings.is_set(name)
        ]
        if stray:
            raise ConfigError(
                f"STRIPE_SECRET_KEY: required with {', '.join(stray)} (Stripe is half "
                "configured; unset them to use the embedded sandbox instead)"
            )

    if stripe == "stripe" and storage == "sqlite" and not settings.is_set("PAYMENTS_SQLITE_PATH"):
        # Real money into a file nobody chose (a DSN secret that was not mounted, say)
        # would split idempotency per pod and lose rows with it: SQLite must be asked for.
        raise ConfigError(
            "MYSQL_DSN: required with STRIPE_SECRET_KEY (or set PAYMENTS_SQLITE_PATH to "
            "run real Stripe on a single-process SQLite file on purpose)"
        )
    if stripe == "sandbox" and storage == "mysql" and not serves_api:
        # Jobs against a real database with a sandbox that never made its payments would
        # expire and reconcile them against nothing.
        raise ConfigError(
            "STRIPE_SECRET_KEY: required for jobs on MYSQL_DSN without the HTTP/gRPC API "
            "(the sandbox only answers for payments made in the same process)"
        )

    auth: AuthKind
    if settings.is_set("AUTH_SERVICE_GRPC_ADDR"):
        auth = "auth-service"
    elif settings.api_keys_file or settings.api_keys:
        auth = "local-keys"
    elif stripe == "sandbox":
        auth = "dev-key"
    else:
        auth = "auth-service"
    if auth == "auth-service" and serves_api and not settings.app_api_key:
        raise ConfigError("APP_API_KEY: required to call the Auth service")

    profile = Profile(storage, stripe, auth, settings)
    return _fill_in_stand_ins(profile)


def _fill_in_stand_ins(profile: Profile) -> Profile:
    settings = profile.settings
    changes: dict[str, object] = {}
    if profile.loopback_only:
        for variable, field in (("HTTP_HOST", "http_host"), ("GRPC_HOST", "grpc_host")):
            host = getattr(settings, field)
            if not settings.is_set(variable):
                changes[field] = "127.0.0.1"
            elif not is_loopback(host):
                raise ConfigError(
                    f"{variable}: {host!r} is not a loopback address; with the "
                    f"{' and '.join(profile.stand_ins)} the service binds loopback only. "
                    "Configure MYSQL_DSN, STRIPE_SECRET_KEY and AUTH_SERVICE_GRPC_ADDR "
                    "to serve other hosts."
                )
    dev_key = gateway_key = ""
    if profile.stripe == "sandbox":
        http_port = settings.http_port
        if not http_port or not settings.sandbox_port:
            raise ConfigError(
                "HTTP_PORT, PAYMENTS_SANDBOX_PORT: the embedded sandbox needs fixed ports"
            )
        # Fixed, not secret: the sandbox takes fake money on loopback only, and one-off
        # jobs (`payments reconcile`) reach the running service's sandbox with it.
        changes["stripe_secret_key"] = SANDBOX_SECRET_KEY
        changes["stripe_webhook_secret"] = "whsec_" + secrets.token_hex(24)
        changes["stripe_api_base"] = profile.sandbox_url
        if not settings.provider_callback_base_url:
            changes["provider_callback_base_url"] = (
                f"http://127.0.0.1:{http_port}/webhooks/providers/stripe"
            )
        gateway_key = "gw_" + secrets.token_urlsafe(24)
    if profile.auth == "dev-key":
        dev_key = load_or_create_dev_key(dev_key_path(settings.sqlite_path))
    if not settings.app_api_key and profile.loopback_only:
        changes["app_api_key"] = "payments-dev-" + secrets.token_hex(8)
    if profile.loopback_only:
        # A developer's receivers run on this machine, like the service itself.
        changes["callback_allow_loopback"] = True
    return attrs.evolve(
        profile,
        settings=attrs.evolve(settings, **changes),
        dev_api_key=dev_key,
        sandbox_gateway_key=gateway_key,
    )


@attrs.frozen
class Listener:
    """One port ``serve`` opens, and the variable that picks its host."""

    name: str
    host: str
    port: int
    variable: str

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def listeners(profile: Profile, parts: frozenset[str]) -> list[Listener]:
    """The ports ``serve`` with ``parts`` opens (metrics in every serve, on HTTP_HOST)."""
    s = profile.settings
    found = []
    if "http" in parts:
        found.append(Listener("HTTP", s.http_host, s.http_port, "HTTP_HOST"))
    if "grpc" in parts:
        found.append(Listener("gRPC", s.grpc_host, s.grpc_port, "GRPC_HOST"))
    found.append(Listener("metrics", s.http_host, s.metrics_port, "HTTP_HOST"))
    return found


def every_interface_notice(profile: Profile, parts: frozenset[str]) -> str:
    """A plain warning when a real profile listens on every interface only because
    HTTP_HOST / GRPC_HOST were left unset (their default is 0.0.0.0); "" otherwise.
    An operator who set 0.0.0.0 chose it; one who set nothing may not know."""
    if profile.loopback_only:
        return ""
    settings = profile.settings
    unset = sorted(
        {
            listener.variable
            for listener in listeners(profile, parts)
            if not settings.is_set(listener.variable) and _is_unspecified(listener.host)
        }
    )
    if not unset:
        return ""
    return (
        f"{' and '.join(unset)} unset: listening on every network interface (0.0.0.0); "
        "set them to the address to serve on (deployment.md)"
    )


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return host == ""


def banner(profile: Profile) -> str:
    """What `serve` prints once at start when stand-ins are in use."""
    s = profile.settings
    title = "embedded profile" if profile.embedded else "stand-ins: " + ", ".join(profile.stand_ins)
    lines = [
        "",
        f"  payments: {title} (development only, loopback only)"
        if profile.loopback_only
        else f"  payments: {title}",
        f"    HTTP     http://{s.http_host}:{s.http_port}",
        f"    gRPC     {s.grpc_host}:{s.grpc_port}",
    ]
    if profile.storage == "sqlite":
        lines.append(f"    storage  SQLite {s.sqlite_path} (single process)")
    if profile.stripe == "sandbox":
        lines.append(f"    Stripe   sandbox {profile.sandbox_url}/_sandbox/dashboard")
    if profile.dev_api_key:
        lines.append(f'    API key  {profile.dev_api_key}  (caller_service "{DEV_SERVICE}")')
    lines += [
        "    For production set MYSQL_DSN; STRIPE_SECRET_KEY, STRIPE_WEBHOOK_SECRET and",
        "    PAYMENTS_PROVIDER_CALLBACK_BASE_URL; AUTH_SERVICE_GRPC_ADDR (README, deployment.md).",
        "",
    ]
    return "\n".join(lines)
