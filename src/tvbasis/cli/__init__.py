"""The ``tvbasis`` command: subcommands with kebab-case flags; errors are one clear line and a non-zero exit.

Each module registers its subcommands (``register(subparsers)``): ``vectors`` (vector, merge, apply, info),
``store`` (build, inspect, reconstruct, edit, add-task) and, when the eval extra is installed, the evaluation
harness's (finetune, bench)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tvbasis._version import __version__
from tvbasis.cli import store as store_commands
from tvbasis.cli import vectors as vector_commands
from tvbasis.cli.common import OPEN_RUNS
from tvbasis.errors import TvbasisError

log = logging.getLogger("tvbasis")

#: modules whose ``register(subparsers)`` adds subcommands, in --help order
COMMAND_MODULES = [vector_commands, store_commands]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tvbasis", description="Task vector bases: store many fine-tunes of one model "
                                "compactly and edit models by arithmetic on their task vectors.")
    p.add_argument("--version", action="version", version=f"tvbasis {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for module in COMMAND_MODULES:
        module.register(sub)
    try:
        from tvbasis.eval.commands import register
    except ImportError:  # the evaluation extras are optional at import time
        pass
    else:
        register(sub)
    return p



def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(2, args.verbose), format="%(levelname)s %(message)s")
    if args.quiet:
        import os
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return int(args.fn(args) or 0)
    except TvbasisError as e:
        print(f"tvbasis {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tvbasis: interrupted; no output was written", file=sys.stderr)
        return 130
    finally:
        while OPEN_RUNS:
            OPEN_RUNS.pop().close()


if __name__ == "__main__":
    sys.exit(main())
