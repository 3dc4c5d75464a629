"""The CLI's guard of the eval extra (cli/common.py): the subcommands that need it import tvbasis.eval/bench only
when they run, and a missing package of the extra is one line naming ``pip install "tvbasis[eval]"``."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from tests.tinymodels import ft_args
from tvbasis.cli import main
from tvbasis.cli.common import eval_extra, needs_eval_extra, require_eval_extra
from tvbasis.errors import ConfigError

INSTALL = 'pip install "tvbasis[eval]"'


def test_an_import_error_of_the_extra_is_one_line_naming_the_install() -> None:
    @needs_eval_extra("tvbasis eval")
    def cmd_eval(args: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'transformers.models'", name="transformers.models")

    assert cmd_eval.__name__ == "cmd_eval"  # the parser's fn keeps its name
    with pytest.raises(ConfigError) as e:
        cmd_eval(argparse.Namespace())
    assert str(e.value) == f"tvbasis eval needs the eval extra (transformers is missing): {INSTALL}"


def test_other_import_errors_pass() -> None:
    with pytest.raises(ModuleNotFoundError), eval_extra("tvbasis bench"):
        raise ModuleNotFoundError("No module named 'numpy'", name="numpy")


def test_require_names_the_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    require_eval_extra("--plot", "matplotlib")  # installed here: nothing happens
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"^--plot needs the eval extra \(matplotlib is missing\): pip install"):
        require_eval_extra("--plot", "matplotlib")


def test_inspect_plot_without_matplotlib_exits_2_with_one_line(fam, tmp_path, capsys, monkeypatch) -> None:
    pre_p, fts, _, _ = fam
    store = tmp_path / "store"
    assert main(["-q", "build", "--pretrained", str(pre_p), *ft_args(fts), "--method", "pca", "-M", "1",
                 "--out", str(store)]) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["inspect", str(store), "--plot", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tvbasis inspect: error: --plot needs the eval extra (matplotlib is missing): {INSTALL}"]
    assert not (tmp_path / "p").exists()


def test_importing_the_cli_imports_neither_eval_nor_bench() -> None:
    """Importing the CLI loads no module of either; building the parser loads no module of the harness (the eval
    and tune flags take their defaults from tvbasis.eval, which needs nothing of the extra to import)."""
    code = ("import sys, tvbasis.cli; print(sorted(m for m in sys.modules if m.startswith(('tvbasis.eval', "
            "'tvbasis.bench')))); tvbasis.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith('tvbasis.bench')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "[]"]
