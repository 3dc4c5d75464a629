"""The ``tvbasis`` command: subcommands with kebab-case flags; every failure is one line and a non-zero exit.

Each module registers its subcommands (``register(subparsers)``), in --help order: ``vectors`` (vector, merge,
apply, info), ``store`` (build, inspect, reconstruct, edit, add-task, verify, upgrade, gc), ``serve`` (get,
export-lora, remove-task, rename-task), ``interop`` (import-tvb, export-tvb), ``stitch`` (localize, stitch),
``bench`` (finetune, bench) and ``evaluate`` (eval, tune). What needs the eval extra (``tvbasis.eval``,
``tvbasis.bench``: finetune, bench, eval, tune, ``inspect --plot``, ``localize --data``) is imported inside the
command that runs it, and a missing package of the extra is one line naming ``pip install "tvbasis[eval]"``
(``common.needs_eval_extra``); importing this package imports neither.

Errors: a ``TvbasisError`` prints ``tvbasis CMD: error: …`` (exit code of its class), an ``OSError`` (disk full,
permissions) ``tvbasis CMD: error: …`` (exit 1), anything unexpected ``tvbasis CMD: internal error: …
(run with -v for the traceback)`` (exit 1; with ``-v`` the traceback follows). A usage error is one line
(exit 2). SIGINT and SIGTERM both clean up (temporaries removed, outputs unchanged or complete) and exit 130 and
143 with one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import NoReturn

from tvbasis._version import __version__
from tvbasis.cli import bench as bench_commands
from tvbasis.cli import evaluate as evaluate_commands
from tvbasis.cli import interop as interop_commands
from tvbasis.cli import serve as serve_commands
from tvbasis.cli import stitch as stitch_commands
from tvbasis.cli import store as store_commands
from tvbasis.cli import vectors as vector_commands
from tvbasis.cli.common import OPEN_RUNS
from tvbasis.errors import TvbasisError

log = logging.getLogger("tvbasis")

#: modules whose ``register(subparsers)`` adds subcommands, in --help order
COMMAND_MODULES = [vector_commands, store_commands, serve_commands, interop_commands, stitch_commands, bench_commands,
                   evaluate_commands]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like SIGINT's KeyboardInterrupt so that the same clean-up runs."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tvbasis", description="Task vector bases: store many fine-tunes of one model "
                "compactly and edit models by arithmetic on their task vectors.")
    p.add_argument("--version", action="version", version=f"tvbasis {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log output (-vv: debug); tracebacks of unexpected errors")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for module in COMMAND_MODULES:
        module.register(sub)
    return p


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe_os_error(e: OSError) -> str:
    what = e.strerror or str(e) or type(e).__name__
    where = " -> ".join(str(x) for x in (e.filename, e.filename2) if x is not None)
    return f"{what}: {where}" if where else what


def _on_sigterm(sig: int, frame: object) -> None:
    raise Terminated()


def _silence_stdout() -> None:
    """Point stdout at /dev/null after its reader went away, so that the interpreter's last flush does not fail
    again (the recipe of Python's signal documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tvbasis`` command line on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (one line, printed) or --help/--version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    logging.basicConfig(level=logging.WARNING - 10 * min(2, args.verbose), format="%(levelname)s %(message)s")
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
    name = f"tvbasis {args.command}"
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rc = int(args.fn(args) or 0)
        sys.stdout.flush()  # a closed pipe fails here, inside the handlers below, not at interpreter exit
        return rc
    except BrokenPipeError:  # `tvbasis inspect STORE | head`: the reader has what it wanted; not an error
        _silence_stdout()
        return 0
    except TvbasisError as e:
        print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except Terminated:
        print(f"{name}: terminated (SIGTERM); temporary files removed, every output is unchanged or complete",
              file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{name}: interrupted; temporary files removed, every output is unchanged or complete",
              file=sys.stderr)
        return 130
    except OSError as e:
        print(f"{name}: error: {_one_line(_describe_os_error(e))}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return 1
    except Exception as e:
        print(f"{name}: internal error: {type(e).__name__}: {_one_line(e)[:500]} "
              "(run with tvbasis -v for the traceback)", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return 1
    finally:
        while OPEN_RUNS:
            OPEN_RUNS.pop().close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    sys.exit(main())
