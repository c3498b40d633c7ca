"""Local API keys: an :class:`~payments.auth.Authenticator` without an Auth service.

For deployments that have no Auth service, and for the embedded profile. Keys come
from a file (``PAYMENTS_API_KEYS_FILE``) and/or the environment (``PAYMENTS_API_KEYS``),
and grant what the Auth service would grant (CONTRACT.md, "Auth service"): a service
name and the services it may call. The rules and messages are GrpcAuthenticator's
(the refusals of a malformed key are payments.auth.key_digest's, shared by both):

- blank key: ``Unauthenticated("missing API key")``;
- unknown key: ``Unauthenticated("invalid API key")``;
- known key whose allowed access lacks ``APP_SERVICE_NAME``: ``PermissionDenied``;
- otherwise ``Caller(service_name, trusted=service_name in trusted_callers)``.

The format, one key per line (in ``PAYMENTS_API_KEYS``, entries may also be separated
by ``;``)::

    # comment; blank lines are ignored, and so is the rest of a line after "#"
    sha256:<64 hex digits>  <service name>  <access>[,<access>...]

for instance ``sha256:9f86...0a08 orders-service payments-service``. Names are
printable ASCII without whitespace, ``,``, ``;`` or ``#``. ``payments keys create``
writes these lines; to revoke a key, delete its line and restart.

Why plain SHA-256 and no slow KDF (bcrypt, scrypt, argon2): a slow KDF protects
low-entropy secrets (passwords) from guessing once the hashes leak. Keys made by
``payments keys create`` carry 256 random bits, so guessing one from its hash costs
2^256 hashes however fast each is; and a KDF would cost tens of milliseconds of CPU on
every request, which any caller could spend for us with made-up keys. The file holds
no secret that grants access, but it does decide who may call, so it is created 0600.

Comparison: every request hashes the presented key and compares the digest with
*every* entry through :func:`hmac.compare_digest`, without stopping at a match, so the
time taken depends on the number of entries only. A dict keyed by digest would be
safe in practice too (its timing could reveal at most some bits of a stored *hash*,
and a hash does not give the key back), but the scan needs no such argument and costs
microseconds for the tens of keys a deployment holds.

Errors in the file or variable raise :class:`KeysFileError` (a ConfigError: the
service does not start, the CLI exits 2) naming the file and line, never a key or a
hash.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import attrs

from payments.auth import INVALID_KEY_MESSAGE, Unmanaged, key_digest
from payments.config import ConfigError
from payments.errors import PermissionDenied, Unauthenticated
from payments.model import Caller

__all__ = [
    "ENV_VARIABLE",
    "FILE_VARIABLE",
    "KEY_PREFIX",
    "KeyEntry",
    "KeysFileError",
    "LocalKeyAuthenticator",
    "append_key",
    "check_name",
    "format_entry",
    "generate_key",
    "hash_key",
    "parse_keys",
    "read_keys_file",
]

log = logging.getLogger("payments.auth.local_keys")

FILE_VARIABLE = "PAYMENTS_API_KEYS_FILE"
ENV_VARIABLE = "PAYMENTS_API_KEYS"

# Generated keys start with this, so they are recognisable in a config or a leak scan.
# Not "pk_": that is Stripe's publishable-key prefix, a confusion to avoid here.
KEY_PREFIX = "paysvc_"
HASH_SCHEME = "sha256:"

_HASH = re.compile(r"sha256:([0-9a-fA-F]{64})")
# Printable ASCII minus whitespace and the format's separators.
_NAME = re.compile(r"[!-~]+")
_FORBIDDEN_IN_NAME = frozenset(",;#")


class KeysFileError(ConfigError):
    """The keys file or PAYMENTS_API_KEYS cannot be used. The message names the file
    (or variable) and the line; it never holds a key or a hash."""


@attrs.frozen
class KeyEntry:
    """One key: the SHA-256 of the key, what it grants, and where it was read."""

    digest: bytes = attrs.field(repr=False)
    service_name: str
    allowed_access: frozenset[str]
    where: str = ""  # "keys file <path>, line 3" or "PAYMENTS_API_KEYS, entry 2"

    @classmethod
    def from_key(
        cls, api_key: str, service_name: str, allowed_access: Iterable[str], where: str = ""
    ) -> KeyEntry:
        """An entry for a raw key held in memory (say, the embedded profile's dev key)."""
        return cls(_digest(api_key), service_name, frozenset(allowed_access), where)


def _digest(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode("utf-8")).digest()


def generate_key() -> str:
    """A new API key: the prefix and 256 random bits, URL-safe (fits any header)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(api_key: str) -> str:
    """The stored form of a key: ``sha256:<hex>``."""
    return HASH_SCHEME + _digest(api_key).hex()


def check_name(name: str) -> str | None:
    """Why ``name`` cannot be a service or access name, or None when it can."""
    if not name:
        return "is empty"
    if not _NAME.fullmatch(name):
        return "may hold only printable ASCII without spaces"
    if _FORBIDDEN_IN_NAME.intersection(name):
        return "may not hold ',', ';' or '#'"
    return None


def format_entry(key_hash: str, service_name: str, allowed_access: Sequence[str]) -> str:
    """One line of the keys file (without its newline). Raises ValueError on a name
    the parser would refuse, so nothing unreadable is ever written."""
    if not _HASH.fullmatch(key_hash):
        raise ValueError("key_hash must be sha256:<64 hex digits>")
    if not allowed_access:
        raise ValueError("a key needs at least one access name")
    for label, name in [("service name", service_name)] + [("access", a) for a in allowed_access]:
        problem = check_name(name)
        if problem:
            raise ValueError(f"{label} {name!r} {problem}")
    return f"{key_hash.lower()} {service_name} {','.join(allowed_access)}"


# --- parsing ----------------------------------------------------------------------------


def _parse_entry(text: str, where: str) -> KeyEntry | None:
    """One line (or ``;`` entry); None for a blank or comment line. Error messages
    never repeat the text: a misplaced raw key would end up in the log."""
    fields = text.partition("#")[0].split()
    if not fields:
        return None
    if len(fields) != 3:
        if fields[0].startswith(KEY_PREFIX):
            raise KeysFileError(f"{where}: looks like a raw API key; store its sha256: hash")
        raise KeysFileError(
            f"{where}: expected 3 fields (sha256:<hash> <service> <access,...>), "
            f"found {len(fields)} (access names are separated by ',' without spaces)"
        )
    key_hash, service_name, access_text = fields
    match = _HASH.fullmatch(key_hash)
    if match is None:
        if key_hash.startswith(KEY_PREFIX):
            raise KeysFileError(f"{where}: looks like a raw API key; store its sha256: hash")
        raise KeysFileError(f"{where}: the key hash is not sha256:<64 hex digits>")
    problem = check_name(service_name)
    if problem:
        raise KeysFileError(f"{where}: the service name {problem}")
    access = access_text.split(",")
    for name in access:
        problem = check_name(name)
        if problem:
            raise KeysFileError(f"{where}: an access name {problem}")
    return KeyEntry(bytes.fromhex(match.group(1)), service_name, frozenset(access), where)


def parse_keys(text: str, source: str, *, semicolons: bool = False) -> list[KeyEntry]:
    """The entries of ``text``, read from ``source`` (``keys file <path>``, or
    ``PAYMENTS_API_KEYS`` with ``semicolons=True``: entries then split at ``;`` too,
    and are counted as "entry N" rather than "line N"). Raises KeysFileError on a bad
    line, naming ``source`` and the line."""
    if semicolons:
        pieces = [p for line in text.splitlines() for p in line.split(";")]
        label = "entry"
    else:
        pieces = text.splitlines()
        label = "line"
    entries = []
    for number, piece in enumerate(pieces, start=1):
        entry = _parse_entry(piece, f"{source}, {label} {number}")
        if entry is not None:
            entries.append(entry)
    return entries


def read_keys_file(path: str | os.PathLike[str]) -> list[KeyEntry]:
    """The entries of the keys file at ``path``. Raises KeysFileError when it cannot be
    read (missing, a directory, no permission, not UTF-8) or has a bad line."""
    path = Path(path)
    source = f"keys file {path}"
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeysFileError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise KeysFileError(f"{source}: is a directory, not a file") from None
    except PermissionError:
        raise KeysFileError(f"{source}: permission denied") from None
    except OSError as exc:
        raise KeysFileError(f"{source}: cannot be read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise KeysFileError(f"{source}, line {line}: not UTF-8 text") from None
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        # Whoever can write the file can grant themselves a key.
        log.warning("%s is writable by group or others; chmod 600 it", source)
    return parse_keys(text, source)


def _check_duplicates(entries: Sequence[KeyEntry]) -> None:
    seen: dict[bytes, KeyEntry] = {}
    for entry in entries:
        first = seen.setdefault(entry.digest, entry)
        if first is not entry:
            raise KeysFileError(f"{entry.where}: the same key hash as {first.where}")


# --- the authenticator ------------------------------------------------------------------


class LocalKeyAuthenticator(Unmanaged):
    """The :class:`~payments.auth.Authenticator` over local keys (see the module
    docstring). Immutable once built; opened like GrpcAuthenticator, with nothing to
    open."""

    def __init__(
        self,
        entries: Iterable[KeyEntry],
        service_name: str,
        trusted_callers: Iterable[str] = (),
    ) -> None:
        """``service_name`` is APP_SERVICE_NAME; ``trusted_callers`` is
        PAYMENTS_TRUSTED_CALLERS. Raises KeysFileError on two entries with one hash."""
        self._entries: tuple[KeyEntry, ...] = tuple(entries)
        _check_duplicates(self._entries)
        self._service_name = service_name
        self._trusted = frozenset(trusted_callers)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None,
        env_text: str | None,
        service_name: str,
        trusted_callers: Iterable[str] = (),
    ) -> LocalKeyAuthenticator:
        """Keys from the file at ``path`` (PAYMENTS_API_KEYS_FILE) and from ``env_text``
        (PAYMENTS_API_KEYS), merged; either may be None. Raises KeysFileError."""
        entries: list[KeyEntry] = []
        sources = []
        if path is not None:
            entries += read_keys_file(path)
            sources.append(str(path))
        if env_text is not None:
            entries += parse_keys(env_text, ENV_VARIABLE, semicolons=True)
            sources.append(ENV_VARIABLE)
        authenticator = cls(entries, service_name, trusted_callers)
        log.info("local API keys: %d from %s", len(entries), " and ".join(sources) or "nowhere")
        return authenticator

    @property
    def entries(self) -> tuple[KeyEntry, ...]:
        return self._entries

    async def authenticate(self, api_key: str) -> Caller:
        """The calling service for ``api_key``; raises Unauthenticated or
        PermissionDenied. No I/O and no checkpoint: the entries are in memory."""
        digest = key_digest(api_key)
        found: KeyEntry | None = None
        for entry in self._entries:  # every entry, match or not (see the module docstring)
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        if found is None:
            raise Unauthenticated(INVALID_KEY_MESSAGE)
        if self._service_name not in found.allowed_access:
            raise PermissionDenied(f"API key has no access to {self._service_name}")
        return Caller(service_name=found.service_name, trusted=found.service_name in self._trusted)


# --- writing ----------------------------------------------------------------------------


def append_key(
    path: str | os.PathLike[str],
    service_name: str,
    allowed_access: Sequence[str],
    *,
    now: datetime | None = None,
) -> tuple[str, int]:
    """Make a key for ``service_name``, append its hash line to the keys file and
    return ``(key, line number)``. The key itself is written nowhere.

    The file (and its directory) is created if missing, the file with mode 0600. An
    existing file is read first, so a key is never added to a file the service would
    refuse; a last line without its newline gets one. The line goes out in one
    ``O_APPEND`` write, so a concurrent reader sees it whole or not at all.
    Raises ValueError on a bad name, KeysFileError when the file is unusable.
    """
    path = Path(path)
    key = generate_key()
    created = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    line = f"{format_entry(hash_key(key), service_name, allowed_access)}  # created {created}\n"
    existing = b""
    new = not path.exists()
    if not new:
        read_keys_file(path)  # refuses an unreadable or broken file, naming the line
        existing = path.read_bytes()
    else:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise KeysFileError(
                f"keys file {path}: cannot create its directory ({exc.strerror})"
            ) from None
    if existing and not existing.endswith(b"\n"):
        line = "\n" + line
    data = line.encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        raise KeysFileError(f"keys file {path}: cannot be written ({exc.strerror})") from None
    try:
        if new:
            os.fchmod(fd, 0o600)  # whatever the umask
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
    finally:
        os.close(fd)
    line_number = existing.count(b"\n") + (2 if existing and not existing.endswith(b"\n") else 1)
    return key, line_number
