"""Profile selection: each role's backend, half-configured production refused, loopback."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from payments.config import ConfigError, load_settings
from payments.profile import (
    banner,
    every_interface_notice,
    is_loopback,
    listeners,
    resolve_profile,
)

REAL_STRIPE = {
    "STRIPE_SECRET_KEY": "sk_live_abc123",
    "STRIPE_WEBHOOK_SECRET": "whsec_abc",
    "PAYMENTS_PROVIDER_CALLBACK_BASE_URL": "https://pay.example.com/webhooks/providers/stripe",
}


def settings(tmp_path: Path, **env: str):  # type: ignore[no-untyped-def]
    # The dev key file goes beside the SQLite path; keep it in tmp_path without making
    # PAYMENTS_SQLITE_PATH look set (that choice matters to the profile).
    loaded = load_settings(env, dotenv_path=None)
    if "PAYMENTS_SQLITE_PATH" not in env:
        loaded = attrs.evolve(loaded, sqlite_path=str(tmp_path / "var" / "payments.db"))
    return loaded


def test_nothing_configured_is_the_embedded_profile(tmp_path: Path) -> None:
    profile = resolve_profile(settings(tmp_path))
    assert (profile.storage, profile.stripe, profile.auth) == ("sqlite", "sandbox", "dev-key")
    assert profile.embedded and profile.loopback_only
    s = profile.settings
    assert (s.http_host, s.grpc_host) == ("127.0.0.1", "127.0.0.1")
    assert s.stripe_api_base == "http://127.0.0.1:12111"
    assert s.stripe_secret_key.startswith("sk_test_") and s.stripe_webhook_secret
    assert s.provider_callback_base_url == "http://127.0.0.1:8080/webhooks/providers/stripe"
    assert profile.dev_api_key.startswith("dev_") and profile.sandbox_gateway_key
    text = banner(profile)
    assert profile.dev_api_key in text and "loopback only" in text and "MYSQL_DSN" in text
    assert s.stripe_secret_key not in text and s.stripe_webhook_secret not in text


def test_the_dev_key_is_kept_across_starts(tmp_path: Path) -> None:
    first = resolve_profile(settings(tmp_path)).dev_api_key
    assert resolve_profile(settings(tmp_path)).dev_api_key == first
    key_file = tmp_path / "var" / "dev-api-key"
    assert key_file.stat().st_mode & 0o777 == 0o600


def test_each_real_part_replaces_its_stand_in(tmp_path: Path) -> None:
    mysql_only = resolve_profile(settings(tmp_path, MYSQL_DSN="mysql://u:p@db:3306/pay"))
    assert (mysql_only.storage, mysql_only.stripe, mysql_only.auth) == (
        "mysql",
        "sandbox",
        "dev-key",
    )
    assert mysql_only.loopback_only and not mysql_only.embedded
    stripe_only = resolve_profile(
        settings(tmp_path, APP_API_KEY="own", **REAL_STRIPE, PAYMENTS_SQLITE_PATH="p.db")
    )
    assert (stripe_only.storage, stripe_only.stripe, stripe_only.auth) == (
        "sqlite",
        "stripe",
        "auth-service",  # the old default address: Go deploy files keep working
    )
    assert stripe_only.settings.stripe_secret_key == "sk_live_abc123"
    assert not stripe_only.loopback_only and stripe_only.settings.http_host == "0.0.0.0"
    auth_only = resolve_profile(
        settings(tmp_path, AUTH_SERVICE_GRPC_ADDR="auth:9090", APP_API_KEY="own")
    )
    assert (auth_only.stripe, auth_only.auth) == ("sandbox", "auth-service")
    keys = resolve_profile(settings(tmp_path, PAYMENTS_API_KEYS_FILE="/etc/payments/keys"))
    assert keys.auth == "local-keys" and keys.dev_api_key == ""


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"STRIPE_SECRET_KEY": "sk_live_x"}, "STRIPE_WEBHOOK_SECRET"),
        (
            {"STRIPE_SECRET_KEY": "sk_live_x", "STRIPE_WEBHOOK_SECRET": "whsec_x"},
            "PAYMENTS_PROVIDER_CALLBACK_BASE_URL",
        ),
        ({"STRIPE_WEBHOOK_SECRET": "whsec_x"}, "STRIPE_SECRET_KEY"),
        ({"AUTH_SERVICE_GRPC_ADDR": "auth:9090"}, "APP_API_KEY"),
    ],
)
def test_half_configured_production_is_an_error(
    tmp_path: Path, env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named) as caught:
        resolve_profile(settings(tmp_path, **env))
    assert "sk_live_x" not in str(caught.value) and "whsec_x" not in str(caught.value)


@pytest.mark.parametrize("variable", ["HTTP_HOST", "GRPC_HOST"])
def test_stand_ins_refuse_a_non_loopback_address(tmp_path: Path, variable: str) -> None:
    with pytest.raises(ConfigError, match=f"{variable}: '0.0.0.0' is not a loopback"):
        resolve_profile(settings(tmp_path, **{variable: "0.0.0.0"}))
    allowed = resolve_profile(settings(tmp_path, **{variable: "::1"}))
    assert allowed.loopback_only


def test_loopback_addresses() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.3.2.1", "::1", "localhost", "[::1]"]))
    assert not any(map(is_loopback, ["0.0.0.0", "10.0.0.1", "::", "example.com"]))


def test_real_stripe_never_falls_back_to_sqlite_silently(tmp_path: Path) -> None:
    env = {**REAL_STRIPE, "APP_API_KEY": "own", "AUTH_SERVICE_GRPC_ADDR": "auth:9090"}
    with pytest.raises(ConfigError, match="MYSQL_DSN: required with STRIPE_SECRET_KEY"):
        resolve_profile(settings(tmp_path, **env))
    chosen = resolve_profile(settings(tmp_path, **env, PAYMENTS_SQLITE_PATH="pay.db"))
    assert chosen.storage == "sqlite"


def test_jobs_on_mysql_never_run_against_a_sandbox(tmp_path: Path) -> None:
    mysql = settings(tmp_path, MYSQL_DSN="mysql://u:p@db:3306/pay", APP_API_KEY="own")
    with pytest.raises(ConfigError, match="STRIPE_SECRET_KEY: required for jobs"):
        resolve_profile(mysql, serves_api=False)
    assert resolve_profile(mysql, serves_api=True).stripe == "sandbox"


SERVERS = frozenset({"http", "grpc"})


def test_a_real_profile_open_to_every_interface_by_default_is_named(tmp_path: Path) -> None:
    real = {**REAL_STRIPE, "MYSQL_DSN": "mysql://u:p@db/pay", "APP_API_KEY": "own"}
    profile = resolve_profile(settings(tmp_path, **real))
    assert [(x.name, x.address) for x in listeners(profile, SERVERS)] == [
        ("HTTP", "0.0.0.0:8080"),
        ("gRPC", "0.0.0.0:9090"),
        ("metrics", "0.0.0.0:9464"),  # every serve, on HTTP_HOST
    ]
    notice = every_interface_notice(profile, SERVERS)
    assert notice.startswith("GRPC_HOST and HTTP_HOST unset: listening on every network")
    # Only the variables that are unset and open, for the parts that run.
    half = resolve_profile(settings(tmp_path, **real, HTTP_HOST="10.0.0.5"))
    assert every_interface_notice(half, SERVERS).startswith("GRPC_HOST unset")
    assert every_interface_notice(profile, frozenset({"dispatch"})).startswith("HTTP_HOST unset")
    assert every_interface_notice(half, frozenset({"dispatch"})) == ""
    # Chosen on purpose, or a stand-in profile (loopback only): nothing to say.
    chosen = resolve_profile(settings(tmp_path, **real, HTTP_HOST="0.0.0.0", GRPC_HOST="::"))
    assert every_interface_notice(chosen, SERVERS) == ""
    assert listeners(chosen, frozenset({"grpc"}))[0].address == "[::]:9090"
    assert every_interface_notice(resolve_profile(settings(tmp_path)), SERVERS) == ""
