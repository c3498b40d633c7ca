"""The access line's direct path: the bytes the record path writes, or the record path.

``access_log`` writes its line itself only while logging is exactly as ``setup_logging``
left it. pytest adds its own capture handlers to the root logger for every test, which
(rightly) sends every access record down the record path; the tests of the direct path
set those aside with :func:`exactly_installed`.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from payments import logs
from tests.fixtures.app import KEY_A, KEY_B, Stack

SECRETS = [
    "app-own-key-7f3e9a",
    'quo"ted\\secret-1234',
    "dbpassw0rd",
    "sécret-ünï-κλειδί",
    "two word-secret",  # may span the message's fields: "<transport> <route> <status>"
]
# Pieces the generated fields are made of: configured secrets, secret-looking values,
# the characters JSON escapes, non-ASCII, URL credentials, a lone surrogate.
PIECES = [
    *SECRETS,
    "two",
    "word-secret",
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "rk_test_abc",
    "whsec_Q2hlY2tTaWduYXR1cmVTZWNyZXQ=",
    "t=1700000000,v1=" + "ab" * 16,
    "paysvc_Zx-9_",
    "mysql://payments:p%40ss@db:3306/x",
    "://",
    "@",
    ":",
    '"',
    "\\",
    "\n",
    "\r\t\b\f",
    "\x00\x1f\x7f",
    "\u2028",
    "é",
    "😀",
    "\ud800",
    " ",
]
ACCESS_PARAMS = {"transport", "route", "status", "latency_ms", "request_id", "caller", "level"}

texts = st.one_of(
    st.text(max_size=20),
    st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=4)), max_size=6).map("".join),
)
extra_values = st.one_of(
    texts,
    st.integers(),
    st.floats(),
    st.none(),
    st.booleans(),
    st.lists(texts, max_size=3),
    st.dictionaries(texts, st.one_of(texts, st.integers()), max_size=2),
)
extra_keys = st.one_of(
    st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True).filter(
        lambda k: k not in logs._STANDARD_ATTRS and k not in ACCESS_PARAMS
    ),
    # Extras the record path skips or overwrites: the direct path must leave them to it.
    st.sampled_from(["time", "logger", "_payments_redacted_by", "taskName"]),
)
calls = st.fixed_dictionaries(
    {
        "transport": texts,
        "route": texts,
        "status": st.one_of(st.integers(100, 599), texts),
        "latency_ms": st.one_of(st.floats(), st.integers(0, 10**6)),
        "request_id": texts,
        "caller": texts,
        "level": st.sampled_from([logging.DEBUG, logging.INFO, 25, logging.ERROR]),
    }
)


@contextmanager
def exactly_installed(
    level: str = "debug", stream: Any = None
) -> Iterator[tuple[logging.StreamHandler[Any], Any]]:
    """Logging exactly as setup_logging leaves it, pytest's capture handlers set aside."""
    root = logging.getLogger()
    saved, saved_level = root.handlers[:], root.level
    for handler in saved:
        root.removeHandler(handler)
    stream = io.StringIO() if stream is None else stream
    handler = logs.setup_logging(level, SECRETS, stream)
    try:
        yield handler, stream
    finally:
        root.removeHandler(handler)
        for other in saved:
            root.addHandler(other)
        root.setLevel(saved_level)


@contextmanager
def record_paths() -> Iterator[list[logging.LogRecord]]:
    """The access records made (the record path makes one; the direct path none)."""
    made: list[logging.LogRecord] = []
    original = logs._ACCESS.makeRecord

    def counting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = original(*args, **kwargs)
        made.append(record)
        return record

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logs._ACCESS, "makeRecord", counting)
        yield made


def written(stream: io.StringIO, call: Callable[[], None]) -> str:
    start = len(stream.getvalue())
    call()
    return stream.getvalue()[start:]


def grpc_line(**overrides: Any) -> None:
    fields: dict[str, Any] = {
        "transport": "grpc",
        "route": "/payments.PaymentsService/GetPayment",
        "status": "OK",
        "latency_ms": 1.23456,
        "request_id": "r-1",
        "caller": "svc-a",
        "payment_id": 7,
    }
    logs.access_log(**(fields | overrides))


# --- parity -----------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    call=calls,
    extra=st.dictionaries(extra_keys, extra_values, max_size=4),
    created=st.floats(0, 4e9),
)
@example(  # a secret across two fields, masked in the message as one text
    call={
        "transport": "two",
        "route": "word-secret",
        "status": 200,
        "latency_ms": 0.5,
        "request_id": 'quo"ted\\secret-1234',
        "caller": "svc",
        "level": logging.INFO,
    },
    extra={"path": "/a/two word-secret", "n": [1, "dbpassw0rd"]},
    created=1764441915.9999996,
)
def test_the_direct_line_is_the_record_paths_line(
    call: dict[str, Any], extra: dict[str, Any], created: float
) -> None:
    """Same call, same frozen clock: the direct path writes the bytes the handler path
    (RedactingFilter, then JsonFormatter, then StreamHandler) writes for its record."""
    call = call | extra

    def keep(record: logging.LogRecord) -> bool:  # any logger filter forces the record path
        return True

    with (
        exactly_installed() as (_, stream),
        pytest.MonkeyPatch.context() as patch,
        record_paths() as made,
    ):
        patch.setattr(time, "time", lambda: created)
        patch.setattr(time, "time_ns", lambda: round(created * 1e9))  # Python >= 3.13
        direct = written(stream, lambda: logs.access_log(**call))
        direct_records = len(made)
        logs._ACCESS.addFilter(keep)
        try:
            recorded = written(stream, lambda: logs.access_log(**call))
        finally:
            logs._ACCESS.removeFilter(keep)
    assert len(made) == direct_records + 1  # the reference did take the record path
    assert direct_records == (1 if set(extra) & logs._RESERVED else 0)
    assert direct == recorded
    for secret in SECRETS:
        assert json.dumps(secret, ensure_ascii=False)[1:-1] not in direct


def test_the_direct_path_is_taken_as_setup_logging_leaves_it() -> None:
    with exactly_installed("info") as (_, stream), record_paths() as made:
        line = written(stream, lambda: grpc_line(caller=SECRETS[0]))
    assert made == []
    entry = json.loads(line)
    assert list(entry) == [
        "time",
        "level",
        "logger",
        "message",
        "transport",
        "route",
        "status",
        "latency_ms",
        "request_id",
        "caller",
        "payment_id",
    ]
    assert entry["caller"] == logs.MASK and entry["latency_ms"] == 1.235
    assert entry["message"] == "grpc /payments.PaymentsService/GetPayment OK"


def test_extras_the_record_path_refuses_are_still_refused() -> None:
    with exactly_installed(), pytest.raises(KeyError):
        grpc_line(message="x")


# --- anything else attached or configured: the record path, and what it does -------------


def test_caplog_sees_the_access_records(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    handler = logs.setup_logging("info", SECRETS, stream)
    try:
        with caplog.at_level(logging.INFO, logger=logs.ACCESS_LOGGER):
            grpc_line(request_id="r-caplog")
    finally:
        logging.getLogger().removeHandler(handler)
    (record,) = [r for r in caplog.records if r.name == logs.ACCESS_LOGGER]
    assert record.request_id == "r-caplog"  # type: ignore[attr-defined]
    assert json.loads(stream.getvalue())["request_id"] == "r-caplog"


def test_a_handler_of_a_tests_own_sees_the_records() -> None:
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    for name in (logs.ACCESS_LOGGER, "payments", ""):
        seen.clear()
        keep = Keep()
        with exactly_installed() as (_, stream):
            logging.getLogger(name).addHandler(keep)
            try:
                line = written(stream, grpc_line)
            finally:
                logging.getLogger(name).removeHandler(keep)
        assert [r.request_id for r in seen] == ["r-1"], name  # type: ignore[attr-defined]
        assert json.loads(line)["request_id"] == "r-1"


def test_a_filter_on_the_access_logger_sees_the_records() -> None:
    seen: list[str] = []

    def note(record: logging.LogRecord) -> bool:
        seen.append(record.getMessage())
        return record.request_id != "dropped"  # type: ignore[attr-defined]

    with exactly_installed() as (_, stream):
        logs._ACCESS.addFilter(note)
        try:
            kept = written(stream, grpc_line)
            dropped = written(stream, lambda: grpc_line(request_id="dropped"))
        finally:
            logs._ACCESS.removeFilter(note)
    assert len(seen) == 2 and json.loads(kept)["request_id"] == "r-1" and dropped == ""


@contextmanager
def handler_level(handler: logging.Handler) -> Iterator[None]:
    handler.setLevel(logging.WARNING)
    yield


@contextmanager
def handler_filter(handler: logging.Handler) -> Iterator[None]:
    handler.addFilter(lambda record: record.levelno >= logging.WARNING)
    yield


@contextmanager
def disabled_below_warning(handler: logging.Handler) -> Iterator[None]:
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


@contextmanager
def access_level(handler: logging.Handler) -> Iterator[None]:
    logs._ACCESS.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logs._ACCESS.setLevel(logging.NOTSET)


@contextmanager
def access_disabled(handler: logging.Handler) -> Iterator[None]:
    logs._ACCESS.disabled = True
    try:
        yield
    finally:
        logs._ACCESS.disabled = False


@contextmanager
def parent_does_not_propagate(handler: logging.Handler) -> Iterator[None]:
    parent = logging.getLogger("payments")
    parent.propagate = False
    try:
        yield
    finally:
        parent.propagate = True


@contextmanager
def access_does_not_propagate(handler: logging.Handler) -> Iterator[None]:
    logs._ACCESS.propagate = False
    try:
        yield
    finally:
        logs._ACCESS.propagate = True


@pytest.mark.parametrize(
    "setting",
    [
        handler_level,
        handler_filter,
        disabled_below_warning,
        access_level,
        access_disabled,
        parent_does_not_propagate,
        access_does_not_propagate,
    ],
)
def test_what_keeps_an_info_line_out_keeps_it_out(
    setting: Callable[[logging.Handler], Any],
) -> None:
    with exactly_installed() as (handler, stream), setting(handler):
        line = written(stream, grpc_line)
        warning = written(stream, lambda: grpc_line(level=logging.WARNING))
    assert line == ""
    if setting not in (access_disabled, parent_does_not_propagate, access_does_not_propagate):
        assert json.loads(warning)["level"] == "warning"


def test_log_level_and_debug_access_lines() -> None:
    with exactly_installed("info") as (_, stream):
        probe = written(stream, lambda: grpc_line(level=logging.DEBUG))
    with exactly_installed("debug") as (_, stream):
        debug = written(stream, lambda: grpc_line(level=logging.DEBUG))
    assert probe == ""
    assert json.loads(debug)["level"] == "debug"


def test_another_formatter_record_factory_stream_or_terminator_is_honoured() -> None:
    with exactly_installed() as (handler, stream):
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        assert written(stream, grpc_line) == "INFO grpc /payments.PaymentsService/GetPayment OK\n"

    factory = logging.getLogRecordFactory()

    def tagged(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.trace_id = "t-1"
        return record

    with exactly_installed() as (_, stream):
        logging.setLogRecordFactory(tagged)
        try:
            line = written(stream, grpc_line)
        finally:
            logging.setLogRecordFactory(factory)
    assert json.loads(line)["trace_id"] == "t-1"

    other = io.StringIO()
    with exactly_installed() as (handler, stream):
        handler.setStream(other)
        handler.terminator = "\r\n"
        assert written(stream, grpc_line) == ""
    assert other.getvalue().endswith("}\r\n") and json.loads(other.getvalue())


# --- writing -----------------------------------------------------------------------------


def test_each_line_is_flushed_when_written(tmp_path: Path) -> None:
    """Operators tail the log and a crash must not lose lines: no buffering."""
    path = tmp_path / "service.log"
    with path.open("w", encoding="utf-8") as file, exactly_installed(stream=file):
        grpc_line(request_id="r-flushed")
        assert json.loads(path.read_text(encoding="utf-8"))["request_id"] == "r-flushed"


def test_a_failed_write_is_reported_like_the_record_path_does(
    capsys: pytest.CaptureFixture[str],
) -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("disk full")

    with exactly_installed(stream=Broken()):
        grpc_line(route=f"/x/{SECRETS[0]}")  # does not raise
    err = capsys.readouterr().err
    assert "--- Logging error ---" in err and "disk full" in err
    assert f"grpc /x/{logs.MASK} OK" in err and SECRETS[0] not in err


# --- the remembered redactions ------------------------------------------------------------


def test_a_secret_added_later_is_masked_in_a_remembered_value() -> None:
    secret = f"late-secret-{time.monotonic_ns()}"
    with exactly_installed() as (_, stream):
        before = json.loads(written(stream, lambda: grpc_line(route=secret, caller=secret)))
        logs.add_secrets([secret])
        after = json.loads(written(stream, lambda: grpc_line(route=secret, caller=secret)))
    assert before["route"] == secret and secret in before["message"]
    assert after["route"] == after["caller"] == logs.MASK
    assert after["message"] == f"grpc {logs.MASK} OK"


def test_remembered_redactions_are_bounded() -> None:
    redactor = logs.Redactor(["s3cr3t-value"])
    for n in range(3 * logs._KNOWN_SIZE):
        assert redactor.text_of_few(f"/route/{n}/s3cr3t-value") == f"/route/{n}/{logs.MASK}"
    assert redactor.text_of_few("x" * (logs._KNOWN_LENGTH + 1)) == "x" * (logs._KNOWN_LENGTH + 1)
    assert 0 < len(redactor._known) <= logs._KNOWN_SIZE
    assert all(len(value) <= logs._KNOWN_LENGTH for value in redactor._known)


# --- the running service ------------------------------------------------------------------


async def test_the_transports_access_lines_take_the_direct_path(stack: Stack) -> None:
    with exactly_installed("info") as (_, stream), record_paths() as made:
        async with httpx.AsyncClient(base_url=stack.http_url, timeout=10) as http:
            missing = await http.get("/payments/999999", headers=stack.headers(request_id="h-1"))
            assert missing.status_code == 404

        await stack.grpc_health(KEY_B, "g-1")
    assert [r for r in made if r.name == logs.ACCESS_LOGGER] == []
    access = [
        json.loads(line)
        for line in stream.getvalue().splitlines()
        if json.loads(line)["logger"] == logs.ACCESS_LOGGER
    ]
    seen = {(e["transport"], e["request_id"], e["status"], e["caller"]) for e in access}
    assert ("http", "h-1", 404, "svc-a") in seen and ("grpc", "g-1", "OK", "svc-b") in seen
    assert KEY_A not in stream.getvalue() and KEY_B not in stream.getvalue()
