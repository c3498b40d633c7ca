"""JSON logging and the redaction guard: no key or signature reaches the log."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import quote

import httpx
import pytest

from payments import logs
from payments.auth.local_keys import KEY_PREFIX, generate_key
from payments.config import MysqlDsn, Settings, parse_mysql_dsn
from payments.providers.registry import ProviderRegistry
from payments.service import PaymentService
from payments.storage.pool import Pool
from payments.unit_of_work import UnitOfWork
from tests.fixtures.app import KEY_A, KEY_B, Stack
from tests.fixtures.auth import APP_API_KEY
from tests.fixtures.sandbox import SANDBOX_SECRET_KEY

STRIPE_KEY = "sk_test_51Hx9TopSecretStripeKey0123456789"
WEBHOOK_SECRET = "whsec_Q2hlY2tTaWduYXR1cmVTZWNyZXQ"
APP_KEY = "app-own-key-7f3e9a"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    level = logging.getLogger().level
    handler = logs.setup_logging("debug", secrets=[APP_KEY], stream=stream)
    yield stream
    logging.getLogger().removeHandler(handler)
    logging.getLogger().setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


def test_one_json_object_per_line_with_extras(captured: io.StringIO) -> None:
    logging.getLogger("payments.test").info(
        "payment opened", extra={"request_id": "r-1", "payment_id": 7, "latency_ms": 1.5}
    )
    (entry,) = lines(captured)
    assert entry["level"] == "info"
    assert entry["logger"] == "payments.test"
    assert entry["message"] == "payment opened"
    assert entry["request_id"] == "r-1" and entry["payment_id"] == 7
    assert str(entry["time"]).endswith("Z")


def test_level_comes_from_settings() -> None:
    stream = io.StringIO()
    handler = logs.setup_from_settings(Settings(log_level="warning"), stream=stream)
    try:
        logging.getLogger("payments.test").info("quiet")
        logging.getLogger("payments.test").warning("loud")
        assert [e["message"] for e in lines(stream)] == ["loud"]
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(logging.INFO)


def test_stripe_looking_values_are_masked_everywhere(captured: io.StringIO) -> None:
    log = logging.getLogger("payments.test")
    log.info("calling stripe with %s", STRIPE_KEY)
    log.info(
        "sig", extra={"header": f"t=1700000000,v1={'ab' * 32}", "nested": {"k": [WEBHOOK_SECRET]}}
    )
    try:
        raise RuntimeError(f"Invalid API Key provided: {STRIPE_KEY} / rk_live_abcdef123456")
    except RuntimeError:
        log.exception("provider failed")
    output = captured.getvalue()
    assert "sk_test_" not in output and "rk_live_" not in output
    assert "whsec_" not in output
    assert "ab" * 32 not in output
    assert output.count(logs.MASK) >= 4
    assert "RuntimeError" in output  # the traceback itself is kept


class _Described:
    def __str__(self) -> str:
        return f"client for {STRIPE_KEY}"


def test_an_extra_written_as_its_str_is_masked_too(captured: io.StringIO) -> None:
    """The formatter writes objects JSON cannot hold as their ``str``: an exception or
    any object carrying a key must not reach the line unmasked."""
    logging.getLogger("payments.test").warning(
        "failed",
        extra={
            "error": RuntimeError(f"bad key {STRIPE_KEY}"),
            "client": _Described(),
            "nested": {"errors": [ValueError(APP_KEY)], "keys": {APP_KEY}},
        },
    )
    output = captured.getvalue()
    assert STRIPE_KEY not in output and APP_KEY not in output
    (line,) = lines(captured)
    assert line["error"] == f"bad key {logs.MASK}"
    assert line["client"] == f"client for {logs.MASK}"
    assert line["nested"] == {"errors": [logs.MASK], "keys": f"{{'{logs.MASK}'}}"}


def test_configured_secrets_are_masked(captured: io.StringIO) -> None:
    settings = Settings(
        app_api_key=APP_KEY,
        stripe_secret_key="custom-stripe-secret-value",
        mysql_dsn=parse_mysql_dsn("payments:dbpassw0rd@tcp(db:3306)/payments"),
    )
    logs.add_secrets(logs.secrets_of(settings))
    logging.getLogger("payments.test").error(
        "dsn %s key %s",
        "payments:dbpassw0rd@db",
        "custom-stripe-secret-value",
        extra={"own": APP_KEY},
    )
    output = captured.getvalue()
    for secret in ("dbpassw0rd", "custom-stripe-secret-value", APP_KEY):
        assert secret not in output


def test_local_caller_keys_are_masked_without_being_configured(captured: io.StringIO) -> None:
    key = generate_key()
    log = logging.getLogger("payments.test")
    log.warning("unknown key %s", key, extra={"header": {"x-api-key": key}})
    output = captured.getvalue()
    assert key not in output and key[len(KEY_PREFIX) :] not in output
    assert output.count(logs.MASK) == 2
    assert "paysvc_" not in output


@pytest.mark.parametrize(
    "dsn",
    [
        "mysql://payments:p%40ss%2Fw0rd%3A%20x@db:3306/payments",
        "mysql://payments:p%40ss%2fw0rd%3a%20x@db:3306/payments",  # lower-case escapes
        "mysql://payments:p%40ss%2Fw0rd:+x@db:3306/payments",  # only some escaped
    ],
)
def test_a_url_encoded_dsn_password_is_masked_as_written_and_decoded(dsn: str) -> None:
    settings = Settings(mysql_dsn=parse_mysql_dsn(dsn))
    password = settings.mysql_dsn.password if settings.mysql_dsn else ""
    assert password.startswith("p@ss/w0rd:")
    redactor = logs.Redactor(logs.secrets_of(settings))
    written = dsn.split("payments:")[1].split("@db")[0]
    line = redactor.text(f"cannot connect to {dsn}; password {password}")
    assert written not in line and password not in line and "w0rd" not in line
    assert "db:3306/payments" in line  # the rest of the address stays readable
    # The escaped password alone (outside a URL) is masked too.
    assert redactor.text(f"password {quote(password, safe='')}") == f"password {logs.MASK}"


def test_a_record_reaching_the_formatter_unfiltered_is_still_masked() -> None:
    formatter = logs.JsonFormatter(logs.Redactor(["s3cr3t-value"]))
    record = logging.LogRecord("x", logging.INFO, "x", 1, "a %s b", (STRIPE_KEY,), None)
    record.extra_field = "s3cr3t-value"
    line = formatter.format(record)
    assert STRIPE_KEY not in line and "s3cr3t-value" not in line


def test_a_filtered_record_is_masked_in_one_pass_and_a_quoted_secret_too() -> None:
    quoted = 'quo"ted\\secret-1234'  # JSON escapes it: only the field pass can see it
    redactor = logs.Redactor([quoted])
    passes: list[str] = []

    class Counting(logs.Redactor):
        def text(self, value: str) -> str:
            passes.append(value)
            return redactor.text(value)

    counting = Counting([quoted])
    formatter = logs.JsonFormatter(counting)
    record = logging.LogRecord("x", logging.INFO, "x", 1, "key %s", (quoted,), None)
    record.extra_field = quoted
    logs.RedactingFilter(counting).filter(record)
    line = formatter.format(record)

    assert quoted not in json.loads(line)["message"] and quoted not in line
    assert json.loads(line)["extra_field"] == logs.MASK
    assert "_payments_redacted_by" not in line
    assert len(passes) == 2  # the message and the one extra; never the whole line again


def test_access_log_line(captured: io.StringIO) -> None:
    logs.access_log(
        transport="http",
        route="GET /payments",
        status=200,
        latency_ms=1.23456,
        request_id="r-9",
        caller="svc-a",
    )
    (entry,) = lines(captured)
    assert entry["logger"] == logs.ACCESS_LOGGER
    assert {k: entry[k] for k in ("transport", "route", "status", "request_id", "caller")} == {
        "transport": "http",
        "route": "GET /payments",
        "status": 200,
        "request_id": "r-9",
        "caller": "svc-a",
    }
    assert entry["latency_ms"] == 1.235


@pytest.mark.parametrize(
    "created",
    [0.0, 1764441915.0, 1764441915.0421, 1764441915.9994, 1764441915.9999996, 1.5e9 + 0.1],
)
def test_the_time_field_is_rfc3339_utc_to_the_millisecond(created: float) -> None:
    expected = (datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")).replace(
        "+00:00", "Z"
    )
    record = logging.LogRecord("x", logging.INFO, "x", 1, "m", None, None)
    record.created = created
    assert json.loads(logs.JsonFormatter().format(record))["time"] == expected
    record.created = created + 1  # the cached second moves on
    assert (
        json.loads(logs.JsonFormatter().format(record))["time"][:19]
        == (datetime.fromtimestamp(created + 1, UTC).isoformat()[:19])
    )


# --- the running service ----------------------------------------------------------------


@pytest.fixture
def service_log(stack: Stack) -> Iterator[io.StringIO]:
    """Everything the service logs during the test, at DEBUG, as the CLI would set it up
    (every configured secret registered with the redactor)."""
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = logs.setup_logging("debug", logs.secrets_of(stack.settings), stream)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


async def test_requests_leave_no_secret_in_the_log(stack: Stack, service_log: io.StringIO) -> None:
    leaked_key = "sk_test_callerSentAStripeKeyByMistake123"
    stack.sandbox.faults.fail(
        401,
        error_type="authentication_error",
        message=f"Invalid API Key provided: {SANDBOX_SECRET_KEY}",
        path="/v1/payment_links",
    )
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=10) as http:
        body = {
            "caller_service": "svc-a",
            "resource_type": "order",
            "resource_id": "1",
            "amount_cents": 100,
            "currency": "eur",
            "payment_method": 1,
            "payment_type": 1,
            "status_callback_url": "https://svc-a.internal/cb",
        }
        created = await http.post("/payments", json=body, headers=stack.headers(request_id="h-1"))
        assert created.status_code == 201
        payment_id = created.json()["payment"]["id"]
        assert (await http.get(f"/payments/{payment_id}", headers=stack.headers())).is_success
        refused = await http.get("/health", headers=stack.headers(key=leaked_key))
        assert refused.status_code == 401
        link = {**body, "payment_method": 2, "resource_id": "2"}
        failed = await http.post("/payments", json=link, headers=stack.headers(request_id="h-2"))
        assert failed.status_code == 502
        assert SANDBOX_SECRET_KEY not in failed.text

    await stack.grpc_health(KEY_B, "g-1")

    output = service_log.getvalue()
    for secret in (KEY_A, KEY_B, APP_API_KEY, SANDBOX_SECRET_KEY, leaked_key, "sk_test_"):
        assert secret not in output, secret
    access = [e for e in lines(service_log) if e["logger"] == logs.ACCESS_LOGGER]
    seen = {(e["transport"], e["request_id"], e["status"], e["caller"]) for e in access}
    assert ("http", "h-1", 201, "svc-a") in seen
    assert ("http", "rid-1", 401, "") in seen
    assert ("http", "h-2", 502, "svc-a") in seen
    assert ("grpc", "g-1", "OK", "svc-b") in seen
    assert all(isinstance(e["latency_ms"], float | int) for e in access)


async def test_an_unexpected_error_is_logged_with_its_request_id_but_answered_plainly(
    stack: Stack, service_log: io.StringIO, empty_db_dsn: MysqlDsn
) -> None:
    """A database without the schema: the SQL error goes to the log, not the caller."""
    pool = Pool(empty_db_dsn, 2, 1, 0)
    service = PaymentService(
        UnitOfWork(pool), ProviderRegistry({}), stack.settings.provider_callback_base_url
    )
    server = await stack.start_http(service=service)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            response = await http.get("/payments/1", headers=stack.headers(request_id="rid-500"))
    finally:
        await pool.aclose()
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error"}
    assert response.headers["X-Request-ID"] == "rid-500"
    (error,) = [e for e in lines(service_log) if e["message"] == "unhandled error"]
    assert error["request_id"] == "rid-500" and error["level"] == "error"
    assert "Traceback" in str(error["exception"]) and "payments" in str(error["exception"])
