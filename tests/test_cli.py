"""The command line: every sub-command has a help page; config errors exit 2 with the key named."""

from __future__ import annotations

import subprocess
import sys

import pytest

from zsad.cli import main


@pytest.mark.parametrize(
    "argv", [[], ["train"], ["test"], ["bench"], ["predict"], ["convert"], ["data"], ["data", "check"]]
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


def test_summary_table_shows_percentages_and_undefined():
    from zsad.results.render import summary_table

    doc = {
        "datasets": {
            "kvasir": {
                "n_images": 100,
                "mean": {"image_auroc": None, "image_ap": None, "pixel_auroc": 0.9061, "pixel_aupro": 0.5},
            }
        }
    }
    text = summary_table(doc)
    assert "kvasir" in text and "90.6" in text and "50.0" in text
    assert text.splitlines()[1].count("–") == 2  # image metrics undefined on a pixel-only set


def test_test_from_checkpoint_alone_uses_its_config(tmp_path, dummy_method, capsys):
    """`zsad test checkpoint=PATH` needs no YAML: the checkpoint carries its resolved config."""
    import json

    from tests_support import dummy_config

    from zsad.run import train

    cfg = dummy_config(tmp_path)
    out = train(cfg)
    code = main(["test", f"checkpoint={out / 'checkpoints' / 'second.ckpt'}", "run_name=again"])
    assert code == 0 and "synthetic_objects" in capsys.readouterr().out
    first = json.loads((out / "metrics.json").read_text())["datasets"]
    again = json.loads((out.parent / "again" / "metrics.json").read_text())["datasets"]
    assert first == again
