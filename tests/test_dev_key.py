"""The dev API key: kept in its file, refused with the file named when it cannot be, and
checked like any local key for the ``dev`` caller service."""

from __future__ import annotations

from pathlib import Path

import pytest

from payments.auth.dev_key import (
    DEV_SERVICE,
    dev_key_entry,
    dev_key_path,
    load_or_create_dev_key,
)
from payments.auth.local_keys import LocalKeyAuthenticator
from payments.config import ConfigError
from payments.errors import Unauthenticated


def test_made_once_then_read_back(tmp_path: Path) -> None:
    path = dev_key_path(str(tmp_path / "var" / "payments.db"))
    assert path == tmp_path / "var" / "dev-api-key"
    key = load_or_create_dev_key(path)
    assert key.startswith("dev_") and len(key) > 30
    assert path.read_text() == key + "\n" and path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_dev_key(path) == key
    path.write_text("\n")  # an emptied file makes a new key rather than an empty one
    assert load_or_create_dev_key(path) not in ("", key)


def test_a_file_it_cannot_use_is_named(tmp_path: Path) -> None:
    # A link into a missing directory: nothing to read, and creating it fails (as root too).
    dangling = tmp_path / "linked-key"
    dangling.symlink_to(tmp_path / "gone" / "dev-api-key")
    with pytest.raises(ConfigError, match=r"linked-key: cannot write the dev API key"):
        load_or_create_dev_key(dangling)
    a_dir = tmp_path / "dev-api-key"
    a_dir.mkdir()
    with pytest.raises(ConfigError, match=r"dev-api-key: cannot read"):
        load_or_create_dev_key(a_dir)


async def test_the_key_authenticates_as_the_dev_service(tmp_path: Path) -> None:
    key = load_or_create_dev_key(tmp_path / "dev-api-key")
    auth = LocalKeyAuthenticator([dev_key_entry(key, ["payments"])], "payments")
    assert (await auth.authenticate(key)).service_name == DEV_SERVICE
    with pytest.raises(Unauthenticated):
        await auth.authenticate(key + "x")
