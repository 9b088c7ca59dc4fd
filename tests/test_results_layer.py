"""The results layer stays light: importing it (all its modules, plots included) loads no torch and no Lightning."""

from __future__ import annotations

import subprocess
import sys

RESULTS_MODULES = [
    "zsad.results",
    "zsad.results.schema",
    "zsad.results.aggregate",
    "zsad.results.render",
    "zsad.results.leaderboard",
    "zsad.results.throughput",
    "zsad.results.plots",
]


def test_results_imports_no_torch() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in RESULTS_MODULES)
        + "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'torchmetrics'))\n"
        + "others = sorted(m for m in sys.modules if m.startswith('zsad.') and not m.startswith('zsad.results'))\n"
        + "assert not heavy and not others, (heavy[:5], others)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_mean_leaves_undefined_out_and_std_is_the_sample_std() -> None:
    from zsad.results import mean, stat

    assert mean([0.5, None, 0.7]) == 0.6
    assert mean([None, None]) is None
    s = stat([0.5, None, 0.7])
    assert (s.n, s.of) == (2, 3)
    assert abs(s.std - ((0.01 + 0.01) / 1) ** 0.5) < 1e-12
    assert stat([0.5]).std is None and stat([0.5]).text() == "50.0"
