"""The `payments` command: parse arguments, load settings, hand over to the runtime.

payments serve [--only http|grpc ...]   run the service under the supervisor
payments migrate                        apply schema.sql to MYSQL_DSN
payments version                        version, git commit, build time
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

# Parts `serve --only` can pick; the job actors arrive with the lifecycle issue.
SERVE_PARTS = ("http", "grpc")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="payments", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    serve = commands.add_parser("serve", help="run the service under the supervisor")
    serve.add_argument(
        "--only",
        action="append",
        choices=SERVE_PARTS,
        help="run just this part (repeatable); default: all parts",
    )
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
        only = frozenset(args.only) if args.only else frozenset(SERVE_PARTS)
        return trio.run(runtime.serve, settings, only)
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
