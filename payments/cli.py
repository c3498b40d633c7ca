"""The `payments` command: parse arguments, load settings, hand over to the runtime.

    payments serve [--only PART ...]       run the service under the supervisor
    payments reconcile [--worker]          check stale payments at Stripe
    payments callbacks dispatch [--worker] deliver due status callbacks
    payments callbacks list [--state S] [--since T] [--caller NAME] [--json]
                                           show deliveries (a table, or JSON)
    payments callbacks retry --state failed [--since T] [--caller NAME]
                                           re-queue failed deliveries (same webhook-id)
    payments callbacks prune [--older-than-days N]
                                           delete finished deliveries past retention
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
from datetime import timedelta
from functools import partial
from pathlib import Path

import attrs
import trio
from dotenv import dotenv_values

from payments import callback_admin, runtime
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
    _callback_admin_commands(callbacks_commands)
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


def _callback_admin_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``callbacks list | retry | prune`` (payments.callback_admin)."""

    def filters(parser: argparse.ArgumentParser, state_required: bool) -> None:
        parser.add_argument(
            "--state", required=state_required, metavar="STATE", help="pending, delivered, ..."
        )
        parser.add_argument("--since", metavar="RFC3339", help="created at or after this time")
        parser.add_argument("--caller", metavar="NAME", help="the payments of this caller")

    listing = commands.add_parser("list", help="show callback deliveries, oldest first")
    filters(listing, False)
    listing.add_argument("--json", action="store_true", help="one JSON document for scripts")
    listing.add_argument("--limit", type=int, default=1000, help="at most this many (1000)")
    retry = commands.add_parser(
        "retry", help="re-queue failed deliveries with their webhook-id; print how many"
    )
    filters(retry, True)
    prune = commands.add_parser("prune", help="delete finished deliveries past the retention")
    prune.add_argument(
        "--older-than-days",
        type=float,
        default=callback_admin.RETENTION.days,
        help=f"finished longer ago than this (default {callback_admin.RETENTION.days})",
    )


def _callback_admin(args: argparse.Namespace) -> int:
    """Run ``callbacks list | retry | prune``; 2 for a bad flag."""
    settings = load_settings()
    if args.action == "prune":
        if args.older_than_days < 0:
            print("payments: --older-than-days: must be >= 0", file=sys.stderr)
            return 2
        retention = timedelta(days=args.older_than_days)
        removed = trio.run(callback_admin.prune, settings, retention)
        print(f"pruned {removed} deliveries")
        return 0
    try:
        filters = callback_admin.filters_from(args.state, args.since, args.caller)
        if args.action == "retry" and args.state != "failed":
            raise ValueError("--state: only failed deliveries are re-queued")
    except ValueError as exc:
        print(f"payments: {exc}", file=sys.stderr)
        return 2
    if args.action == "retry":
        print(f"requeued {trio.run(callback_admin.retry_failed, settings, filters)} deliveries")
        return 0
    if args.limit < 1:
        print("payments: --limit: must be >= 1", file=sys.stderr)
        return 2
    filters = attrs.evolve(filters, limit=args.limit)
    trio.run(
        partial(callback_admin.list_deliveries, as_json=args.json), settings, filters, sys.stdout
    )
    return 0


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
        if args.command == "callbacks" and args.action != "dispatch":
            return _callback_admin(args)
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
