"""The `payments` command: parse arguments, load settings, hand over to the runtime.

    payments serve [--only PART ...]       run the service under the supervisor
    payments reconcile [--worker]          check stale payments at Stripe
    payments callbacks dispatch [--worker] deliver due status callbacks
    payments expire pending [--worker]     expire payments stuck in pending
    payments migrate                       apply schema.sql to MYSQL_DSN
    payments version                       version, git commit, build time

A one-off job drains its backlog in batches, prints a summary and exits non-zero when
it could not do its work; with --worker it repeats on its interval under the
supervisor (the same as `serve --only <job>`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import trio

from payments import runtime
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(json.dumps(build_info()))
        return 0
    try:
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
