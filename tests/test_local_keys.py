"""Local API keys (payments.auth.local_keys) and ``payments keys create``.

The authenticator must answer exactly as GrpcAuthenticator does, so the transports
cannot tell them apart; the keys file must refuse bad input naming the file and the
line, never echoing a key or a hash; the CLI must show a key once and store only its
hash. Real files in tmp_path throughout, and the installed ``payments`` script.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from payments import cli
from payments.auth import MAX_API_KEY_LENGTH
from payments.auth.client import GrpcAuthenticator
from payments.auth.local_keys import (
    KeyEntry,
    KeysFileError,
    LocalKeyAuthenticator,
    append_key,
    format_entry,
    generate_key,
    hash_key,
    parse_keys,
    read_keys_file,
)
from payments.config import ConfigError
from payments.errors import PermissionDenied, Unauthenticated
from payments.model import Caller

SERVICE = "payments-service"
ORDERS_KEY = "paysvc_orders-test-key"
GATEWAY_KEY = "paysvc_gateway-test-key"
NO_ACCESS_KEY = "paysvc_no-access-test-key"
ENV_KEY = "paysvc_env-test-key"


def keys_text() -> str:
    return (
        "# local keys for tests\n"
        "\n"
        f"{hash_key(ORDERS_KEY)} orders {SERVICE}\n"
        f"   {hash_key(GATEWAY_KEY)}\tgateway  billing,{SERVICE}   # trailing comment\n"
        f"{hash_key(NO_ACCESS_KEY)} reports billing\n"
    )


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text(keys_text())
    path.chmod(0o600)
    return path


@pytest.fixture
def authenticator(keys_file: Path) -> LocalKeyAuthenticator:
    return LocalKeyAuthenticator.load(keys_file, None, SERVICE, trusted_callers=("gateway",))


def exactly(message: str) -> str:
    """A ``match=`` pattern for exactly ``message`` (paths may hold regex characters)."""
    return f"^{re.escape(message)}$"


def assert_no_secret(message: str, *secrets: str) -> None:
    """No key, and no hash (not even its hex part), in an error message."""
    for secret in secrets:
        assert secret not in message
        assert hash_key(secret).removeprefix("sha256:")[:16] not in message


# --- authenticate -------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "   ", "x" * (MAX_API_KEY_LENGTH + 1), "\ud800"])
async def test_bad_keys_are_refused_as_the_grpc_authenticator_refuses_them(
    authenticator: LocalKeyAuthenticator, key: str
) -> None:
    # Refused before any look-up, so the gRPC one needs no Auth server (and is not opened).
    grpc = GrpcAuthenticator("127.0.0.1:1", "", "payments-service")
    with pytest.raises(Unauthenticated) as local:
        await authenticator.authenticate(key)
    with pytest.raises(Unauthenticated) as remote:
        await grpc.authenticate(key)
    assert local.value.message == remote.value.message
    assert local.value.message in ("missing API key", "invalid API key")


async def test_a_valid_key_is_its_service(authenticator: LocalKeyAuthenticator) -> None:
    assert await authenticator.authenticate(ORDERS_KEY) == Caller("orders", trusted=False)


async def test_a_trusted_caller_is_marked_trusted(authenticator: LocalKeyAuthenticator) -> None:
    caller = await authenticator.authenticate(GATEWAY_KEY)
    assert caller == Caller("gateway", trusted=True)
    assert caller.may_act_for("orders")


@pytest.mark.parametrize(
    "key",
    [
        "paysvc_unknown",
        ORDERS_KEY + "x",
        ORDERS_KEY[:-1],
        f" {ORDERS_KEY}",  # keys match exactly, as the Auth service's do
        hash_key(ORDERS_KEY),  # the stored hash is not a key
        "x" * (MAX_API_KEY_LENGTH + 1),
        "\ud800",  # a lone surrogate cannot even be encoded
    ],
)
async def test_an_unknown_key_is_invalid(authenticator: LocalKeyAuthenticator, key: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        await authenticator.authenticate(key)
    assert caught.value.message == "invalid API key"


@pytest.mark.parametrize("key", ["", "   ", "\t\n"])
async def test_a_blank_key_is_missing(authenticator: LocalKeyAuthenticator, key: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        await authenticator.authenticate(key)
    assert caught.value.message == "missing API key"


async def test_a_key_without_access_to_this_service_is_denied(
    authenticator: LocalKeyAuthenticator,
) -> None:
    with pytest.raises(PermissionDenied) as caught:
        await authenticator.authenticate(NO_ACCESS_KEY)
    assert caught.value.message == f"API key has no access to {SERVICE}"


async def test_access_is_checked_against_the_configured_service_name(keys_file: Path) -> None:
    billing = LocalKeyAuthenticator.load(keys_file, None, "billing")
    assert await billing.authenticate(NO_ACCESS_KEY) == Caller("reports")
    with pytest.raises(PermissionDenied):
        await billing.authenticate(ORDERS_KEY)


@pytest.mark.parametrize("key", [ORDERS_KEY, NO_ACCESS_KEY, "paysvc_unknown"])
async def test_every_entry_is_compared_in_constant_time(
    authenticator: LocalKeyAuthenticator, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    """A match on the first entry still compares all of them, through compare_digest."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    with contextlib.suppress(Unauthenticated, PermissionDenied):
        await authenticator.authenticate(key)
    assert [stored for stored, _ in calls] == [e.digest for e in authenticator.entries]
    assert len(calls) == 3


async def test_it_is_a_no_op_async_context_manager(authenticator: LocalKeyAuthenticator) -> None:
    async with authenticator as opened:
        assert opened is authenticator
        assert (await opened.authenticate(ORDERS_KEY)).service_name == "orders"
    assert (await authenticator.authenticate(ORDERS_KEY)).service_name == "orders"


async def test_an_in_memory_entry_from_a_raw_key() -> None:
    entry = KeyEntry.from_key("dev-key", "dev", [SERVICE], where="dev key")
    assert entry.digest.hex() == hash_key("dev-key").removeprefix("sha256:")
    assert "dev-key" not in repr(entry) and entry.digest.hex() not in repr(entry)
    authenticator = LocalKeyAuthenticator([entry], SERVICE)
    assert await authenticator.authenticate("dev-key") == Caller("dev")


async def test_no_keys_at_all_refuses_every_key() -> None:
    authenticator = LocalKeyAuthenticator.load(None, None, SERVICE)
    assert authenticator.entries == ()
    with pytest.raises(Unauthenticated):
        await authenticator.authenticate(ORDERS_KEY)


# --- the format ---------------------------------------------------------------------------


def test_comments_blank_lines_crlf_bom_and_upper_case_hex_are_read(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    line = f"{hash_key(ORDERS_KEY).upper().replace('SHA256', 'sha256')} orders a,{SERVICE}"
    path.write_bytes(("\ufeff# c\r\n\r\n  # indented\r\n" + line + "\r\n").encode())
    [entry] = read_keys_file(path)
    assert entry.service_name == "orders"
    assert entry.allowed_access == frozenset({"a", SERVICE})
    assert entry.where == f"keys file {path}, line 4"


async def test_env_entries_split_at_semicolons_and_newlines() -> None:
    env_text = (
        f"{hash_key(ORDERS_KEY)} orders {SERVICE};  ;# a comment entry\n"
        f"{hash_key(ENV_KEY)} env-svc {SERVICE}"
    )
    entries = parse_keys(env_text, "PAYMENTS_API_KEYS", semicolons=True)
    assert [(e.service_name, e.where) for e in entries] == [
        ("orders", "PAYMENTS_API_KEYS, entry 1"),
        ("env-svc", "PAYMENTS_API_KEYS, entry 4"),
    ]
    authenticator = LocalKeyAuthenticator.load(None, env_text, SERVICE)
    assert await authenticator.authenticate(ENV_KEY) == Caller("env-svc")


async def test_file_and_env_are_merged(keys_file: Path) -> None:
    env_text = f"{hash_key(ENV_KEY)} env-svc {SERVICE}"
    authenticator = LocalKeyAuthenticator.load(keys_file, env_text, SERVICE, ("env-svc",))
    assert len(authenticator.entries) == 4
    assert await authenticator.authenticate(ORDERS_KEY) == Caller("orders")
    assert await authenticator.authenticate(ENV_KEY) == Caller("env-svc", trusted=True)


def test_format_entry_round_trips_and_refuses_what_the_parser_would() -> None:
    line = format_entry(hash_key(ORDERS_KEY), "orders", ["a", "b"])
    [entry] = parse_keys(line, "x")
    assert (entry.service_name, entry.allowed_access) == ("orders", frozenset({"a", "b"}))
    for service, access in [
        ("or ders", ["a"]),
        ("", ["a"]),
        ("a,b", ["a"]),
        ("a#b", ["a"]),
        ("orders", []),
        ("orders", ["a b"]),
        ("orders", ["a;b"]),
        ("ordérs", ["a"]),
    ]:
        with pytest.raises(ValueError):
            format_entry(hash_key(ORDERS_KEY), service, access)
    with pytest.raises(ValueError):
        format_entry("sha256:abc", "orders", ["a"])


def test_generated_keys_are_prefixed_random_and_header_safe() -> None:
    keys = {generate_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert key.startswith("paysvc_")
        assert len(key) == len("paysvc_") + 43  # 32 random bytes, base64url
        assert key.isascii() and key.isprintable() and not any(c in key for c in " ;#,")


# --- bad input ----------------------------------------------------------------------------


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "keys"
    with pytest.raises(KeysFileError, match=exactly(f"keys file {path}: no such file")):
        LocalKeyAuthenticator.load(path, None, SERVICE)


def test_a_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(
        KeysFileError, match=exactly(f"keys file {tmp_path}: is a directory, not a file")
    ):
        LocalKeyAuthenticator.load(tmp_path, None, SERVICE)


def test_a_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_bytes(f"# ok\n{hash_key(ORDERS_KEY)} orders a\n".encode() + b"caf\xe9 x y\n")
    with pytest.raises(KeysFileError, match=exactly(f"keys file {path}, line 3: not UTF-8 text")):
        read_keys_file(path)


def test_a_file_the_process_may_not_read_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests run as root, where chmod 000 stops nothing: make the read itself fail."""
    path = tmp_path / "keys"
    path.write_text(keys_text())

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(KeysFileError, match=exactly(f"keys file {path}: permission denied")):
        read_keys_file(path)


def test_keys_file_error_is_a_config_error() -> None:
    assert issubclass(KeysFileError, ConfigError)


BAD_LINES: list[tuple[str, str]] = [
    (f"{hash_key(ORDERS_KEY)} orders", "expected 3 fields"),
    (f"{hash_key(ORDERS_KEY)} orders a, b", "expected 3 fields"),
    (f"{hash_key(ORDERS_KEY)}", "expected 3 fields"),
    (f"{hash_key(ORDERS_KEY)[:-1]} orders a", "not sha256:<64 hex digits>"),
    (f"{hash_key(ORDERS_KEY)}0 orders a", "not sha256:<64 hex digits>"),
    (f"{hash_key(ORDERS_KEY).removeprefix('sha256:')} orders a", "not sha256:"),
    (f"md5:{hash_key(ORDERS_KEY)[7:]} orders a", "not sha256:"),
    (f"{ORDERS_KEY} orders a", "looks like a raw API key"),
    (f"{ORDERS_KEY}", "looks like a raw API key"),
    (f"{hash_key(ORDERS_KEY)} ord;ers a", "service name may not hold"),
    (f"{hash_key(ORDERS_KEY)} orders a,,b", "access name is empty"),
    (f"{hash_key(ORDERS_KEY)} orders ,", "access name is empty"),
    (f"{hash_key(ORDERS_KEY)} ordérs a", "service name may hold only printable ASCII"),
]


@pytest.mark.parametrize(("line", "problem"), BAD_LINES)
def test_a_bad_line_names_file_and_line_and_no_secret(
    tmp_path: Path, line: str, problem: str
) -> None:
    path = tmp_path / "keys"
    path.write_text(keys_text() + "\n" + line + "\n")  # keys_text has 5 lines
    with pytest.raises(KeysFileError) as caught:
        LocalKeyAuthenticator.load(path, None, SERVICE)
    message = str(caught.value)
    assert message.startswith(f"keys file {path}, line 7: ")
    assert problem in message
    assert_no_secret(message, ORDERS_KEY, GATEWAY_KEY, NO_ACCESS_KEY)


def test_a_bad_env_entry_names_the_variable_and_entry() -> None:
    env_text = f"{hash_key(ENV_KEY)} env {SERVICE}; {ORDERS_KEY} orders {SERVICE}"
    with pytest.raises(KeysFileError) as caught:
        LocalKeyAuthenticator.load(None, env_text, SERVICE)
    assert str(caught.value) == (
        "PAYMENTS_API_KEYS, entry 2: looks like a raw API key; store its sha256: hash"
    )


def test_a_duplicate_hash_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(keys_text() + f"{hash_key(GATEWAY_KEY)} other {SERVICE}\n")
    with pytest.raises(KeysFileError) as caught:
        LocalKeyAuthenticator.load(path, None, SERVICE)
    assert str(caught.value) == (
        f"keys file {path}, line 6: the same key hash as keys file {path}, line 4"
    )
    assert_no_secret(str(caught.value), GATEWAY_KEY)


def test_a_duplicate_across_file_and_env_names_both(keys_file: Path) -> None:
    env_text = f"{hash_key(ORDERS_KEY)} orders {SERVICE}"
    with pytest.raises(KeysFileError, match=r"^PAYMENTS_API_KEYS, entry 1: the same key hash as "):
        LocalKeyAuthenticator.load(keys_file, env_text, SERVICE)


def test_a_file_others_may_write_is_warned_about(
    keys_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys_file.chmod(0o666)
    with caplog.at_level(logging.WARNING, logger="payments.auth.local_keys"):
        read_keys_file(keys_file)
    assert "writable by group or others" in caplog.text
    caplog.clear()
    keys_file.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="payments.auth.local_keys"):
        read_keys_file(keys_file)
    assert caplog.text == ""


# --- append_key ---------------------------------------------------------------------------


async def test_append_key_creates_a_private_file_and_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "var" / "deep" / "keys"
    old_umask = os.umask(0)  # 0600 must not depend on the umask
    try:
        key, line = append_key(path, "orders", [SERVICE])
    finally:
        os.umask(old_umask)
    assert line == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert key not in text
    assert text.startswith(f"{hash_key(key)} orders {SERVICE}  # created ")
    assert text.endswith("\n")
    authenticator = LocalKeyAuthenticator.load(path, None, SERVICE)
    assert await authenticator.authenticate(key) == Caller("orders")


async def test_append_key_mends_a_missing_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(keys_text().rstrip("\n"))  # 5 lines, the last without "\n"
    path.chmod(0o640)
    key, line = append_key(path, "new", [SERVICE])
    assert line == 6
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # an existing file keeps its mode
    entries = read_keys_file(path)
    assert [e.service_name for e in entries] == ["orders", "gateway", "reports", "new"]
    assert entries[-1].where.endswith("line 6")
    authenticator = LocalKeyAuthenticator.load(path, None, SERVICE)
    assert await authenticator.authenticate(key) == Caller("new")
    assert await authenticator.authenticate(ORDERS_KEY) == Caller("orders")


def test_append_key_leaves_a_broken_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(keys_text() + "garbage\n")
    before = path.read_bytes()
    with pytest.raises(KeysFileError, match=", line 6: expected 3 fields"):
        append_key(path, "orders", [SERVICE])
    assert path.read_bytes() == before


# --- payments keys create -----------------------------------------------------------------

RunCli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> RunCli:
    """``payments.cli.main`` in a clean working directory and environment."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for name in ("PAYMENTS_API_KEYS_FILE", "PAYMENTS_API_KEYS", "APP_SERVICE_NAME"):
        monkeypatch.delenv(name, raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def created_key(out: str) -> str:
    """The key ``keys create`` printed: stdout is that one line and nothing else."""
    lines = out.splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith("paysvc_")
    return lines[0]


async def test_keys_create_prints_the_key_once_and_stores_its_hash(
    tmp_path: Path, run_cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "var" / "api-keys"
    monkeypatch.setenv("PAYMENTS_API_KEYS_FILE", str(path))
    code, out, err = run_cli("keys", "create", "orders")
    assert code == 0, err
    key = created_key(out)
    assert key not in err
    assert "only time" in err and str(path) in err and "line 1" in err
    assert key not in path.read_text()
    assert path.read_text().startswith(f"{hash_key(key)} orders payments-service  # created")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    code, out, err = run_cli("keys", "create", "gateway", "--access", "billing,payments-service")
    assert code == 0, err
    second = created_key(out)
    assert second != key and "line 2" in err
    authenticator = LocalKeyAuthenticator.load(path, None, SERVICE, ("gateway",))
    assert await authenticator.authenticate(key) == Caller("orders")
    assert await authenticator.authenticate(second) == Caller("gateway", trusted=True)
    assert authenticator.entries[1].allowed_access == frozenset({"billing", SERVICE})


async def test_keys_create_default_access_is_app_service_name(
    tmp_path: Path, run_cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys"
    monkeypatch.setenv("APP_SERVICE_NAME", "payments-eu")
    code, out, _ = run_cli("keys", "create", "orders", "--file", str(path))
    assert code == 0
    key = created_key(out)
    authenticator = LocalKeyAuthenticator.load(path, None, "payments-eu")
    assert await authenticator.authenticate(key) == Caller("orders")


def test_keys_create_reads_dotenv_like_serve(tmp_path: Path, run_cli: RunCli) -> None:
    path = tmp_path / "from-dotenv"
    Path(".env").write_text(f"PAYMENTS_API_KEYS_FILE={path}\nAPP_SERVICE_NAME=pay-dotenv\n")
    assert run_cli("keys", "create", "orders", "--access", "a", "--access", "b")[0] == 0
    [entry] = read_keys_file(path)
    assert entry.allowed_access == frozenset({"a", "b"})
    assert run_cli("keys", "create", "orders")[0] == 0
    assert read_keys_file(path)[1].allowed_access == frozenset({"pay-dotenv"})


def test_keys_create_file_option_beats_the_environment(
    tmp_path: Path, run_cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYMENTS_API_KEYS_FILE", str(tmp_path / "env-keys"))
    code, _, _ = run_cli("keys", "create", "orders", "--file", str(tmp_path / "opt-keys"))
    assert code == 0
    assert (tmp_path / "opt-keys").is_file()
    assert not (tmp_path / "env-keys").exists()


def test_keys_create_without_a_file_is_a_configuration_error(run_cli: RunCli) -> None:
    code, out, err = run_cli("keys", "create", "orders")
    assert code == 2 and out == ""
    assert "pass --file or set PAYMENTS_API_KEYS_FILE" in err


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["or ders"], "service name 'or ders' may hold only printable ASCII without spaces"),
        (["a,b"], "service name 'a,b' may not hold"),
        (["orders", "--access", "x y"], "access 'x y' may hold only"),
    ],
)
def test_keys_create_refuses_a_bad_name(
    tmp_path: Path, run_cli: RunCli, args: list[str], problem: str
) -> None:
    path = tmp_path / "keys"
    path.write_text(keys_text())
    before = path.read_bytes()
    code, out, err = run_cli("keys", "create", *args, "--file", str(path))
    assert code == 2 and out == ""
    assert problem in err
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("setup", "problem"),
    [
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b"\xff\n"), ", line 1: not UTF-8 text"),
        (lambda p: p.write_text(keys_text() + f"{ORDERS_KEY}\n"), ", line 6: looks like a raw"),
    ],
)
def test_keys_create_refuses_an_unusable_file(
    tmp_path: Path, run_cli: RunCli, setup: Callable[[Path], object], problem: str
) -> None:
    path = tmp_path / "keys"
    setup(path)
    code, out, err = run_cli("keys", "create", "orders", "--file", str(path))
    assert code == 2 and out == ""
    assert err.startswith(f"payments: configuration error: keys file {path}")
    assert problem in err
    assert_no_secret(err, ORDERS_KEY)


def payments_script() -> Path:
    """The console script installed in the venv running the tests (never skipped)."""
    script = Path(sys.executable).parent / "payments"
    assert script.is_file(), f"{script} is missing: install the project into the venv"
    return script


async def test_the_installed_command_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "var" / "api-keys"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYMENTS_", "APP_"))}
    env["PAYMENTS_API_KEYS_FILE"] = str(path)

    def create(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(payments_script()), "keys", "create", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    first = create("orders")
    assert first.returncode == 0, first.stderr
    key = created_key(first.stdout)
    assert key not in first.stderr and key not in path.read_text()
    second = create("gateway", "--access", SERVICE, "--access", "billing")
    assert second.returncode == 0, second.stderr
    other = created_key(second.stdout)
    assert len(path.read_text().splitlines()) == 2

    authenticator = LocalKeyAuthenticator.load(path, None, SERVICE)
    assert await authenticator.authenticate(key) == Caller("orders")
    assert await authenticator.authenticate(other) == Caller("gateway")

    refused = create("bad name")
    assert refused.returncode == 2 and refused.stdout == ""
    assert "may hold only printable ASCII" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert len(path.read_text().splitlines()) == 2
