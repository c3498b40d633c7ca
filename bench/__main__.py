"""``python -m bench``: run the benchmark, print the table, write the results as JSON
(bench/results/<date>.json by default; quick-<date>.json with --quick).

    --quick                 tiny sizes: the CI smoke test (make bench-quick)
    --only a,b              just these scenarios (http_get, http_post, http_refund, grpc_get,
                            propagation, dispatch, expiry, reconcile)
    --set NAME=VALUE        an environment setting for payments serve and the job
                            commands (repeatable): experiments, e.g. LOG_LEVEL=warning
    --profile-dir DIR       py-spy profiles of each scenario's measured process
    --out PATH, --keep      where the JSON goes; keep the scratch directory (logs)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.config import FULL, QUICK
from bench.report import notes, table
from bench.run import SCENARIOS, BenchError, Options, default_out, run
from bench.tools import ToolError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke test)")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="scenarios to run")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="service setting"
    )
    parser.add_argument("--profile-dir", type=Path, default=None, help="write py-spy profiles")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    only = frozenset(name.strip() for name in args.only.split(",") if name.strip())
    unknown = only - set(SCENARIOS)
    if unknown:
        parser.error(f"--only: unknown scenario(s) {', '.join(sorted(unknown))}")
    overrides: dict[str, str] = {}
    for item in args.set:
        name, equals, value = item.partition("=")
        if not equals or not name:
            parser.error(f"--set wants NAME=VALUE, not {item!r}")
        overrides[name] = value
    sizes = QUICK if args.quick else FULL
    out = args.out or default_out(sizes)
    options = Options(
        sizes=sizes,
        out=out,
        keep=args.keep,
        only=only,
        overrides=overrides,
        profile_dir=args.profile_dir,
    )
    try:
        results = run(options)
    except (BenchError, ToolError, RuntimeError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print(table(results))
    print()
    print(notes(results))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
