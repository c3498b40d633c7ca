"""Settings from the environment (payments/config.py) against CONTRACT.md "Environment":
the old service's names and defaults, both DSN forms, errors that name the variable,
``.env`` under the real environment, and config/.env.example documenting everything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
from dotenv import dotenv_values

from payments.config import (
    ConfigError,
    MysqlDsn,
    Settings,
    load_settings,
    parse_host_port,
    parse_mysql_dsn,
    variable_names,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / ".env.example"


def load(**environ: str) -> Settings:
    """Settings from exactly ``environ`` (no .env file, no process environment)."""
    return load_settings(environ, dotenv_path=None)


# --- defaults -----------------------------------------------------------------------

# CONTRACT.md "Environment": variable -> (Settings field, default). Those without a
# default there are empty / unset here.
CONTRACT_DEFAULTS: dict[str, tuple[str, Any]] = {
    "APP_SERVICE_NAME": ("app_service_name", "payments-service"),
    "APP_API_KEY": ("app_api_key", ""),
    "AUTH_SERVICE_GRPC_ADDR": ("auth_service_grpc_addr", "localhost:9090"),
    "HTTP_HOST": ("http_host", "0.0.0.0"),
    "HTTP_PORT": ("http_port", 8080),
    "GRPC_HOST": ("grpc_host", "0.0.0.0"),
    "GRPC_PORT": ("grpc_port", 9090),
    "MYSQL_DSN": ("mysql_dsn", None),
    "MYSQL_MAX_OPEN_CONNS": ("mysql_max_open_conns", 10),
    "MYSQL_MAX_IDLE_CONNS": ("mysql_max_idle_conns", 5),
    "MYSQL_CONN_MAX_LIFETIME_MINUTES": ("mysql_conn_max_lifetime_minutes", 30),
    "LOG_LEVEL": ("log_level", "info"),
    "STRIPE_SECRET_KEY": ("stripe_secret_key", ""),
    "STRIPE_WEBHOOK_SECRET": ("stripe_webhook_secret", ""),
    "STRIPE_SIGNATURE_TOLERANCE_SECONDS": ("stripe_signature_tolerance_seconds", 300),
    "STRIPE_HTTP_TIMEOUT_SECONDS": ("stripe_http_timeout_seconds", 10),
    "PAYMENTS_PROVIDER_CALLBACK_BASE_URL": ("provider_callback_base_url", ""),
    # 15, not the old 10: the default schedule must keep trying for 72 h (issue 11).
    "PAYMENTS_CALLBACK_MAX_ATTEMPTS": ("callback_max_attempts", 10),
    "PAYMENTS_CALLBACK_RETRY_INTERVAL_MINUTES": ("callback_retry_interval_minutes", 5),
    "PAYMENTS_CALLBACK_HTTP_TIMEOUT_SECONDS": ("callback_http_timeout_seconds", 10),
    "PAYMENTS_PENDING_TIMEOUT_MINUTES": ("pending_timeout_minutes", 60),
    "PAYMENTS_RECONCILE_STALE_AFTER_MINUTES": ("reconcile_stale_after_minutes", 15),
    "PAYMENTS_JOB_BATCH_SIZE": ("job_batch_size", 100),
    "PAYMENTS_RECONCILE_INTERVAL_MINUTES": ("reconcile_interval_minutes", 2),
    "PAYMENTS_CALLBACK_DISPATCH_INTERVAL_MINUTES": ("callback_dispatch_interval_minutes", 1),
    "PAYMENTS_EXPIRE_PENDING_INTERVAL_MINUTES": ("expire_pending_interval_minutes", 5),
}


@pytest.mark.parametrize(("variable", "field_default"), CONTRACT_DEFAULTS.items())
def test_contract_defaults(variable: str, field_default: tuple[str, Any]) -> None:
    field, default = field_default
    assert variable in variable_names()
    assert getattr(load(), field) == default


def test_an_empty_environment_gives_the_settings_defaults() -> None:
    assert load() == Settings()


def test_new_variables_take_the_new_prefixes() -> None:
    new = set(variable_names()) - set(CONTRACT_DEFAULTS)
    assert new, "expected some new settings"
    assert all(name.startswith(("PAYMENTS_", "STRIPE_")) for name in new), new


def test_every_variable_sets_its_field() -> None:
    # One value per variable that differs from the default: a variable wired to the
    # wrong field (or to none) leaves some field at its default.
    values = {
        "APP_SERVICE_NAME": "pay",
        "APP_API_KEY": "own-key",
        "AUTH_SERVICE_GRPC_ADDR": "auth:7000",
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": "1",
        "GRPC_HOST": "127.0.0.2",
        "GRPC_PORT": "2",
        "MYSQL_DSN": "u:p@tcp(db:3306)/payments",
        "MYSQL_MAX_OPEN_CONNS": "3",
        "MYSQL_MAX_IDLE_CONNS": "2",
        "MYSQL_CONN_MAX_LIFETIME_MINUTES": "4",
        "LOG_LEVEL": "debug",
        "STRIPE_SECRET_KEY": "sk_test_1",
        "STRIPE_WEBHOOK_SECRET": "whsec_1",
        "STRIPE_SIGNATURE_TOLERANCE_SECONDS": "5",
        "STRIPE_HTTP_TIMEOUT_SECONDS": "6",
        "STRIPE_API_BASE": "http://localhost:12111",
        "STRIPE_MAX_NETWORK_RETRIES": "7",
        "PAYMENTS_PROVIDER_CALLBACK_BASE_URL": "https://pay.example.com/hooks",
        "PAYMENTS_CALLBACK_MAX_ATTEMPTS": "8",
        "PAYMENTS_CALLBACK_RETRY_INTERVAL_MINUTES": "9",
        "PAYMENTS_CALLBACK_HTTP_TIMEOUT_SECONDS": "11",
        "PAYMENTS_CALLBACK_SIGNING_SECRET": SIGNING_SECRET,
        "PAYMENTS_CALLBACK_ALLOWED_HOSTS": "a.internal",
        "PAYMENTS_PENDING_TIMEOUT_MINUTES": "12",
        "PAYMENTS_RECONCILE_STALE_AFTER_MINUTES": "13",
        "PAYMENTS_JOB_BATCH_SIZE": "14",
        "PAYMENTS_RECONCILE_INTERVAL_MINUTES": "15",
        "PAYMENTS_CALLBACK_DISPATCH_INTERVAL_MINUTES": "16",
        "PAYMENTS_EXPIRE_PENDING_INTERVAL_MINUTES": "17",
        "PAYMENTS_TRUSTED_CALLERS": "gateway",
        "PAYMENTS_RECONCILE_RATE_PER_SECOND": "7.5",
        "PAYMENTS_JOB_CONCURRENCY": "3",
        "PAYMENTS_AUTH_CACHE_TTL_SECONDS": "18",
        "PAYMENTS_AUTH_TIMEOUT_SECONDS": "19",
        "PAYMENTS_MAX_BODY_BYTES": "2048",
        "PAYMENTS_SHUTDOWN_GRACE_SECONDS": "20",
        "PAYMENTS_GRPC_IDLE_TIMEOUT_SECONDS": "21",
        "PAYMENTS_SQLITE_PATH": "/tmp/p.db",
        "PAYMENTS_API_KEYS_FILE": "/etc/payments/keys",
        "PAYMENTS_API_KEYS": "sha256:00 svc payments-service",
        "PAYMENTS_SANDBOX_PORT": "12999",
        "PAYMENTS_METRICS_PORT": "9999",
        "PAYMENTS_METRICS_TEXTFILE": "/var/lib/node_exporter/payments.prom",
        "PAYMENTS_DB_QUERY_TIMEOUT_SECONDS": "2.5",
    }
    assert set(values) == set(variable_names())
    settings, defaults = load(**values), Settings()
    assert settings.explicit == set(values)
    unchanged = [
        name
        for name in Settings.__attrs_attrs__  # type: ignore[attr-defined]
        if getattr(settings, name.name) == getattr(defaults, name.name)
    ]
    # Set by the embedded profile, never by a variable (payments.profile).
    assert [name.name for name in unchanged] == ["callback_allow_loopback"]


SIGNING_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # 24 bytes, base64


def test_signing_secret_must_be_base64_of_enough_bytes() -> None:
    for bad in ("sign", "whsec_abc", "whsec_" + "A" * 8):
        with pytest.raises(ConfigError, match="PAYMENTS_CALLBACK_SIGNING_SECRET") as caught:
            load(PAYMENTS_CALLBACK_SIGNING_SECRET=bad)
        assert bad.removeprefix("whsec_") not in str(caught.value)


def test_secrets_stay_out_of_repr() -> None:
    settings = load(
        APP_API_KEY="own-key-123",
        STRIPE_SECRET_KEY="sk_test_abc",
        STRIPE_WEBHOOK_SECRET="whsec_abc",
        PAYMENTS_CALLBACK_SIGNING_SECRET=SIGNING_SECRET,
        MYSQL_DSN="u:dbpass-abc@tcp(db:3306)/payments",
    )
    text = repr(settings)
    for secret in ("own-key-123", "sk_test_abc", "whsec_abc", SIGNING_SECRET[6:], "dbpass-abc"):
        assert secret not in text
    assert settings.mysql_dsn is not None
    assert "dbpass-abc" not in settings.mysql_dsn.redacted()


# --- parsing ------------------------------------------------------------------------


def test_values_are_trimmed_and_lists_split() -> None:
    settings = load(
        HTTP_PORT=" 8081 ",
        PAYMENTS_TRUSTED_CALLERS=" gateway, admin ,, ",
        LOG_LEVEL="WARN",
        PAYMENTS_PROVIDER_CALLBACK_BASE_URL="https://pay.example.com/hooks/",
        PAYMENTS_PENDING_TIMEOUT_MINUTES="0.5",
    )
    assert settings.http_port == 8081
    assert settings.trusted_callers == ("gateway", "admin")
    assert settings.log_level == "warning"
    assert settings.provider_callback_base_url == "https://pay.example.com/hooks"
    assert settings.pending_timeout_minutes == 0.5


def test_blank_values_mean_the_default() -> None:
    assert load(HTTP_PORT="", LOG_LEVEL="  ", MYSQL_DSN="") == Settings()


def test_idle_connections_are_capped_at_open_connections() -> None:
    settings = load(MYSQL_MAX_OPEN_CONNS="3", MYSQL_MAX_IDLE_CONNS="8")
    assert (settings.mysql_max_open_conns, settings.mysql_max_idle_conns) == (3, 3)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HTTP_PORT", "abc"),
        ("HTTP_PORT", "80.5"),
        ("HTTP_PORT", "65536"),
        ("HTTP_PORT", "-1"),
        ("HTTP_PORT", "1_000"),
        ("GRPC_PORT", "９０９０"),  # noqa: RUF001  (full-width digits: int() would take them)
        ("MYSQL_MAX_OPEN_CONNS", "-1"),
        ("MYSQL_MAX_OPEN_CONNS", "0"),
        ("MYSQL_MAX_IDLE_CONNS", "many"),
        ("MYSQL_CONN_MAX_LIFETIME_MINUTES", "-5"),
        ("LOG_LEVEL", "loud"),
        ("STRIPE_SIGNATURE_TOLERANCE_SECONDS", "0"),
        ("STRIPE_HTTP_TIMEOUT_SECONDS", "nan"),
        ("STRIPE_HTTP_TIMEOUT_SECONDS", "inf"),
        ("STRIPE_HTTP_TIMEOUT_SECONDS", "0"),
        ("STRIPE_API_BASE", "api.stripe.com"),
        ("STRIPE_MAX_NETWORK_RETRIES", "11"),
        ("PAYMENTS_PROVIDER_CALLBACK_BASE_URL", "ftp://pay.example.com"),
        ("PAYMENTS_PROVIDER_CALLBACK_BASE_URL", "https://"),
        ("PAYMENTS_PROVIDER_CALLBACK_BASE_URL", "http://[::1"),
        ("PAYMENTS_PROVIDER_CALLBACK_BASE_URL", "https://pay.example.com:99999"),
        ("PAYMENTS_CALLBACK_MAX_ATTEMPTS", "0"),
        ("PAYMENTS_JOB_BATCH_SIZE", "1e3"),
        ("PAYMENTS_RECONCILE_INTERVAL_MINUTES", "0"),
        ("PAYMENTS_AUTH_CACHE_TTL_SECONDS", "-1"),
        ("PAYMENTS_AUTH_TIMEOUT_SECONDS", "soon"),
        ("PAYMENTS_MAX_BODY_BYTES", "10"),
        ("PAYMENTS_GRPC_IDLE_TIMEOUT_SECONDS", "0"),
        ("PAYMENTS_GRPC_IDLE_TIMEOUT_SECONDS", "1m"),
        ("AUTH_SERVICE_GRPC_ADDR", "auth"),
        ("AUTH_SERVICE_GRPC_ADDR", "auth:port"),
        ("MYSQL_DSN", "not a dsn"),
        ("MYSQL_DSN", "u:p@http(db:3306)/payments"),
        ("MYSQL_DSN", "u:p@tcp(db:3306/payments"),
        ("MYSQL_DSN", "u:p@tcp(db:abc)/payments"),
        ("MYSQL_DSN", "mysql://u:p@db:abc/payments"),
        ("MYSQL_DSN", "mysql://u:p@[::1/payments"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as error:
        load(**{variable: value})
    assert str(error.value).startswith(f"{variable}: ")


@pytest.mark.parametrize(
    "dsn",
    [
        "user:s3cret-pw@tcp(db:3306)/payments",
        "user:s3cret-pw@payments",  # no slash at all
        "user:s3cret-pw/payments",  # no "@": the password sits where the network goes
        "mysql://user:s3cret-pw@db:port/payments",
    ],
)
def test_dsn_errors_never_repeat_the_password(dsn: str) -> None:
    try:
        parse_mysql_dsn(dsn.replace("tcp", "udp"))
    except ConfigError as exc:
        assert "s3cret-pw" not in str(exc)
    else:
        pytest.fail("expected a ConfigError")


# --- DSN forms ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (
            "payments:pw@tcp(db.internal:3307)/payments?parseTime=true",
            MysqlDsn("db.internal", 3307, "payments", "pw", "payments"),
        ),
        (
            "payments:pw@tcp(db.internal)/payments?parseTime=true&loc=UTC",
            MysqlDsn("db.internal", 3306, "payments", "pw", "payments"),
        ),
        (
            # The Go driver splits at the last "@" and the first ":": no escaping needed.
            "payments:p@ss:w/rd@tcp(10.0.0.5:3306)/payments?parseTime=true",
            MysqlDsn("10.0.0.5", 3306, "payments", "p@ss:w/rd", "payments"),
        ),
        (
            "root@tcp([::1]:3310)/payments",
            MysqlDsn("::1", 3310, "root", "", "payments"),
        ),
        (
            "payments:pw@unix(/run/mysqld/mysqld.sock)/payments?parseTime=true",
            MysqlDsn("127.0.0.1", 3306, "payments", "pw", "payments", "/run/mysqld/mysqld.sock"),
        ),
        ("/payments", MysqlDsn("127.0.0.1", 3306, "root", "", "payments")),
        (
            "mysql://payments:pw@db.internal:3307/payments",
            MysqlDsn("db.internal", 3307, "payments", "pw", "payments"),
        ),
        (
            "mysql://payments@db.internal/payments",
            MysqlDsn("db.internal", 3306, "payments", "", "payments"),
        ),
        (
            "mysql://payments:p%40ss%3Aw%2Frd@db.internal/payments",
            MysqlDsn("db.internal", 3306, "payments", "p@ss:w/rd", "payments"),
        ),
        (
            "mysql://root@127.0.0.1:3306/",  # a server without a database (the test DSN)
            MysqlDsn("127.0.0.1", 3306, "root", "", ""),
        ),
        (
            "mysql://payments:pw@localhost/payments?unix_socket=/run/mysqld/mysqld.sock",
            MysqlDsn("localhost", 3306, "payments", "pw", "payments", "/run/mysqld/mysqld.sock"),
        ),
        (
            "mysql://payments:pw@[::1]:3310/payments",
            MysqlDsn("::1", 3310, "payments", "pw", "payments"),
        ),
    ],
)
def test_both_dsn_forms(dsn: str, expected: MysqlDsn) -> None:
    assert parse_mysql_dsn(dsn) == expected
    assert load(MYSQL_DSN=dsn).mysql_dsn == expected


def test_redacted_dsn_names_where_not_the_password() -> None:
    dsn = parse_mysql_dsn("payments:pw-123@tcp(db:3307)/payments")
    assert dsn.redacted() == "mysql://payments:***@db:3307/payments"


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("localhost:9090", ("localhost", 9090)),
        ("auth.internal:7000", ("auth.internal", 7000)),
        ("dns:///auth.internal:7000", ("auth.internal", 7000)),
        ("[::1]:9090", ("::1", 9090)),
        (" 10.0.0.7:9090 ", ("10.0.0.7", 9090)),
    ],
)
def test_grpc_addresses(addr: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(addr) == expected


# --- .env ---------------------------------------------------------------------------


def test_dotenv_is_read_and_the_real_environment_wins(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("HTTP_PORT=9001\nGRPC_PORT=9002\nAPP_API_KEY='from file'\n")
    settings = load_settings({"GRPC_PORT": "9102"}, dotenv_path=dotenv)
    assert settings.http_port == 9001  # from the file
    assert settings.grpc_port == 9102  # the environment wins
    assert settings.app_api_key == "from file"


def test_dotenv_in_the_working_directory_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("HTTP_PORT=9001\nGRPC_PORT=9002\n")
    monkeypatch.chdir(tmp_path)
    for name in variable_names():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GRPC_PORT", "9102")
    settings = load_settings()
    assert (settings.http_port, settings.grpc_port) == (9001, 9102)


def test_a_bad_value_in_dotenv_names_the_variable(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("HTTP_PORT=abc\n")
    with pytest.raises(ConfigError, match=r"^HTTP_PORT: "):
        load_settings({}, dotenv_path=dotenv)


def test_missing_dotenv_is_fine(tmp_path: Path) -> None:
    assert load_settings({}, dotenv_path=tmp_path / "absent.env") == Settings()


# --- serve's requirements -------------------------------------------------------------


# --- config/.env.example ------------------------------------------------------------


def test_env_example_documents_every_variable_with_its_default() -> None:
    documented = dotenv_values(EXAMPLE)
    assert set(documented) == set(variable_names())
    # Copying the example changes nothing: its values are the real defaults, and the
    # variables that pick the profile (where the embedded stand-ins apply) stay unset.
    from_example = load_settings({}, dotenv_path=EXAMPLE)
    assert attrs.evolve(from_example, explicit=frozenset()) == Settings()
    for selector in ("MYSQL_DSN", "STRIPE_SECRET_KEY", "AUTH_SERVICE_GRPC_ADDR", "HTTP_HOST"):
        assert not from_example.is_set(selector)


def test_env_example_has_a_comment_above_each_variable() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for index, line in enumerate(lines):
        if line and not line.startswith("#"):
            name = line.split("=", 1)[0]
            above = lines[index - 1] if index else ""
            assert above.startswith("# ") and len(above) > 4, f"{name} has no comment"
