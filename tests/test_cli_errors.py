"""Every expected user error leaves the CLI as one line on stderr and exit code 2; ``-v`` adds the traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from zsad import cli


def _errors() -> list[tuple[type[Exception], str]]:
    from data_modules.errors import DataError
    from zsad.backbones.errors import WeightsError
    from zsad.config import ConfigError
    from zsad.convert import ConversionError
    from zsad.module import CheckpointMismatch

    return [
        (ConfigError, "config error"),
        (DataError, "data error"),
        (WeightsError, "weights error"),
        (CheckpointMismatch, "checkpoint mismatch"),
        (ConversionError, "conversion error"),
    ]


def test_the_table_names_every_user_error() -> None:
    assert [kind for *_, kind in cli.USER_ERRORS] == [kind for _, kind in _errors()]


@pytest.mark.parametrize("index", range(5), ids=["config", "data", "weights", "checkpoint", "conversion"])
@pytest.mark.parametrize("verbose", [False, True], ids=["plain", "verbose"])
def test_user_error_is_one_line_and_exit_2(
    index: int, verbose: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    error, kind = _errors()[index]

    def fail(args: object) -> int:
        raise error("method.x: first line\n  second line")

    monkeypatch.setattr(cli, "cmd_train", fail)  # build_parser binds the module attribute at parse time
    code = cli.main([*(["-v"] if verbose else []), "train", "a.yaml"])
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last == f"zsad: {kind}: method.x: first line; second line"
    if verbose:
        assert "Traceback (most recent call last)" in err and error.__name__ in err
    else:
        assert err.strip() == last  # the one line, no traceback


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(args: object) -> int:
        raise KeyError("bug")

    monkeypatch.setattr(cli, "cmd_train", fail)
    with pytest.raises(KeyError):
        cli.main(["train", "a.yaml"])


def _zsad(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zsad.cli", *argv], capture_output=True, text=True, timeout=300
    )


def test_console_bad_option_value_names_key_and_choices() -> None:
    res = _zsad("train", "experiments/methods/anomalyclip.yaml", "method.score_rule=median")
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "zsad: config error: method.score_rule=median: expected one of global | max | mean_topk"
    )
    verbose = _zsad("-v", "train", "experiments/methods/anomalyclip.yaml", "method.score_rule=median")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr and "ConfigError" in verbose.stderr


def test_console_data_error_is_one_line(tmp_path: Path) -> None:
    res = _zsad("data", "check", "--dataset", "visa", "--root", str(tmp_path))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("zsad: data error:") and "1cls.csv" in lines[0]
