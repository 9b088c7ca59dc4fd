"""``zsad data`` sub-commands through argparse, as the lead's CLI will call them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsad.cli import main


def _run(argv: list[str]) -> int:
    """``zsad data ARGV`` through the main CLI, which turns a DataError into one line on stderr and exit code 2."""
    return main(["data", *argv])


def _png(path: Path, shape: tuple[int, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, 255, np.uint8)).save(path)


def test_synth_then_check_and_to_meta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    assert _run(["synth", "--out", str(out), "--size", "32", "--n-test", "2", "--n-train", "0"]) == 0
    assert (out / "manifest.json").is_file()
    capsys.readouterr()
    assert _run(["check", "--dataset", "synthetic_objects", "--root", str(out)]) == 0
    text = capsys.readouterr().out
    assert "metal_nut" in text and "metal nut" in text and "32x32" in text and "skipped 0 hidden" in text
    assert _run(["to-meta", "--dataset", "synthetic_textures", "--root", str(out / "textures")]) == 0
    meta = json.loads((out / "textures" / "meta.json").read_text())
    assert sum(len(v) for v in meta["test"].values()) == 10


def test_check_notes_size_mismatch_once_and_hidden_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "d"
    for i in range(3):
        _png(root / "cup" / "test" / "bad" / f"{i}.png", (8, 8, 3))
        _png(root / "cup" / "ground_truth" / "bad" / f"{i}_mask.png", (16, 16))
    _png(root / "cup" / "test" / "good" / "9.PNG", (8, 8, 3))
    (root / "cup" / "test" / "good" / ".DS_Store").write_bytes(b"x")
    assert _run(["check", "--dataset", "mvtec", "--root", str(root)]) == 0
    text = capsys.readouterr().out
    assert text.count("differ in size") == 1 and "3 mask(s)" in text
    assert "skipped 1 hidden" in text
    row = next(line for line in text.splitlines() if line.startswith("cup"))
    assert row.split()[2:5] == ["1", "3", "3"]  # normal, anomalous, masks


def test_check_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["check", "--dataset", "visa", "--root", str(tmp_path)]) == 2
    assert "1cls.csv" in capsys.readouterr().err


def test_check_decodes_by_default_and_names_a_truncated_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The header of a truncated PNG is intact: ``--fast`` passes it, the default (full decode) names it."""
    root = tmp_path / "d"
    for i in range(2):
        _png(root / "cup" / "test" / "good" / f"{i}.png", (8, 8, 3))
    bad = root / "cup" / "test" / "good" / "1.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    assert _run(["check", "--dataset", "mvtec", "--root", str(root), "--fast"]) == 0
    capsys.readouterr()
    assert _run(["check", "--dataset", "mvtec", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "truncated" in err
