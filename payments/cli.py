"""The `payments` command: parse arguments, load settings, hand over to the runtime.

    payments serve [--only PART ...]       run the service under the supervisor
    payments reconcile [--worker]          check stale payments at Stripe
    payments callbacks dispatch [--worker] deliver due status callbacks
    payments expire pending [--worker]     expire payments stuck in pending
    payments migrate                       apply schema.sql to MYSQL_DSN
    payments keys create SERVICE [--access NAME ...] [--file PATH]
                                           make a local API key (printed once)
    payments version                       version, git commit, build time

A one-off job drains its backlog in batches, prints a summary and exits non-zero when
it could not do its work; with --worker it repeats on its interval under the
supervisor (the same as `serve --only <job>`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import trio
from dotenv import dotenv_values

from payments import runtime
from payments.auth import local_keys
from payments.buildinfo import build_info
from payments.config import ConfigError, load_settings
from payments.errors import PaymentsError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="payments",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    serve = commands.add_parser("serve", help="run the service under the supervisor")
    serve.add_argument(
        "--only",
        action="append",
        choices=runtime.PARTS,
        help="run just this part (repeatable); default: all parts",
    )

    def job(parser: argparse.ArgumentParser, part: str) -> None:
        parser.set_defaults(job=part)
        parser.add_argument(
            "--worker", action="store_true", help="repeat on the configured interval"
        )

    job(commands.add_parser("reconcile", help="check stale payments at Stripe"), "reconcile")
    callbacks = commands.add_parser("callbacks", help="status callbacks to callers")
    callbacks_commands = callbacks.add_subparsers(dest="action", required=True, metavar="action")
    job(callbacks_commands.add_parser("dispatch", help="deliver due status callbacks"), "dispatch")
    expire = commands.add_parser("expire", help="expire payments")
    expire_commands = expire.add_subparsers(dest="action", required=True, metavar="action")
    job(expire_commands.add_parser("pending", help="expire payments stuck in pending"), "expire")
    commands.add_parser("migrate", help="apply schema.sql to the database in MYSQL_DSN")
    commands.add_parser("version", help="print version, git commit and build time")
    keys = commands.add_parser("keys", help="local API keys (PAYMENTS_API_KEYS_FILE)")
    keys_commands = keys.add_subparsers(dest="action", required=True, metavar="action")
    create = keys_commands.add_parser(
        "create",
        help="make an API key for a service: print it once, append its hash to the keys file",
    )
    create.add_argument("service", help="the calling service the key stands for")
    create.add_argument(
        "--access",
        action="append",
        metavar="NAME",
        help="a service the key may call (repeatable, or comma-separated); "
        "default: APP_SERVICE_NAME, else payments-service",
    )
    create.add_argument(
        "--file", type=Path, metavar="PATH", help="the keys file; default: PAYMENTS_API_KEYS_FILE"
    )
    return parser


def _environment_value(name: str) -> str:
    """``name`` from the environment, else from ``.env`` (as load_settings reads them),
    without parsing every other setting: a key can be made while the rest is unset."""
    value = os.environ.get(name)
    if value is None and Path(".env").is_file():
        value = dotenv_values(".env").get(name)
    return (value or "").strip()


def _keys_create(args: argparse.Namespace) -> int:
    """``payments keys create``: the key goes to stdout alone (so ``$(...)`` captures
    it), the note to stderr. Raises ConfigError (KeysFileError) on an unusable file."""
    path = args.file or _environment_value(local_keys.FILE_VARIABLE)
    if not path:
        raise ConfigError(f"no keys file: pass --file or set {local_keys.FILE_VARIABLE}")
    access = [name.strip() for item in args.access or () for name in item.split(",")]
    access = [name for name in access if name] or [
        _environment_value("APP_SERVICE_NAME") or "payments-service"
    ]
    try:
        key, line = local_keys.append_key(path, args.service, access)
    except ValueError as exc:  # a bad service or access name
        print(f"payments: keys create: {exc}", file=sys.stderr)
        return 2
    print(key)
    print(
        f"API key for {args.service} (access: {', '.join(access)}); its hash is line "
        f"{line} of {path}. This is the only time the key is shown: store it now.",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(json.dumps(build_info()))
        return 0
    try:
        if args.command == "keys":
            return _keys_create(args)
        settings = load_settings()
        if args.command == "migrate":
            version = trio.run(runtime.migrate, settings)
            print(f"schema at version {version}")
            return 0
        if args.command == "serve":
            parts = frozenset(args.only) if args.only else frozenset(runtime.PARTS)
            return trio.run(runtime.serve, settings, parts)
        if args.worker:
            return trio.run(runtime.serve, settings, frozenset({args.job}))
        return trio.run(runtime.run_job, settings, args.job)
    except ConfigError as exc:
        print(f"payments: configuration error: {exc}", file=sys.stderr)
        return 2
    except PaymentsError as exc:
        print(f"payments: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
