"""The command line: every sub-command has a help page; config errors exit 2 with the key named."""

from __future__ import annotations

import subprocess
import sys

import pytest

from zsad.cli import main


@pytest.mark.parametrize(
    "argv", [[], ["train"], ["test"], ["bench"], ["predict"], ["data"], ["data", "check"]]
)
def test_help_pages(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: zsad")


def test_console_script_runs():
    res = subprocess.run(
        [sys.executable, "-m", "zsad.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "train" in res.stdout and "bench" in res.stdout


def test_config_error_exits_2_naming_the_key(capsys):
    code = main(["train", "experiments/methods/anomalyclip.yaml", "method.n_ctxx=3"])
    assert code == 2
    assert "method.n_ctxx" in capsys.readouterr().err


def test_argument_that_is_neither_yaml_nor_override():
    with pytest.raises(SystemExit, match="neither a YAML file nor a key=value override"):
        main(["train", "experiments/methods/anomalyclip.txt"])
