"""The throughput report (``make bench-gpu``): issue 9's targets and the markdown of a measured report.

The measuring lives in ``zsad.bench.throughput``; this module only judges and renders its JSON report, so a report
copied off the GPU machine can be re-rendered anywhere. Pure Python (no torch, nothing else of zsad).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zsad.results.aggregate import NULL
from zsad.results.render import Table, cells, table_markdown

# Issue 9's targets on one H100 that hold for every method (the per-method images/s targets are facts of the
# method registry: the report carries them as ``method_targets``).
TARGETS = {
    "metrics_visa_s": 10.0,
    "mfu_backbone": 0.5,
}


def _fmt(v: float | None, spec: str = ".1f", scale: float = 1.0, suffix: str = "") -> str:
    return NULL if v is None else f"{v * scale:{spec}}{suffix}"


def check_targets(
    report: Mapping[str, Any], method_targets: Mapping[str, Mapping[str, float]] | None = None
) -> list[dict]:
    """Issue 9's targets against the measured rows (only meaningful for paper-size rows on a GPU).

    Args:
        report: the throughput report.
        method_targets: report key → method → minimum (default: the report's own ``method_targets``).
    """
    rows = {r["method"]: r for r in report["methods"] if "error" not in r}
    if method_targets is None:
        method_targets = report.get("method_targets") or {}
    out = []
    for key in ("infer_img_s", "train_img_s"):
        for method, target in method_targets.get(key, {}).items():
            if method in rows:
                got = rows[method][key]
                out.append({"what": f"{method} {key}", "target": target, "got": got, "ok": got >= target})
    for method, r in rows.items():
        if r.get("mfu_backbone") is not None:
            got = r["mfu_backbone"]
            tgt = TARGETS["mfu_backbone"]
            out.append({"what": f"{method} mfu_backbone", "target": tgt, "got": got, "ok": got >= tgt})
    mt = report.get("metrics")
    if mt:
        got = mt["evaluate_visa_s"]
        tgt = TARGETS["metrics_visa_s"]
        out.append({"what": "metrics, VisA-sized", "target": tgt, "got": got, "ok": got < tgt})
    return out


METHOD_HEADER = [
    "method",
    "input",
    "infer batch",
    "infer img/s",
    "train batch",
    "train img/s (per stage)",
    "backbone share",
    "GFLOP/img",
    "MFU fwd / backbone",
    "peak GB infer / train",
]


def _method_table(methods: list[Mapping[str, Any]]) -> Table:
    rows = []
    for r in methods:
        if "error" in r:
            rows.append(cells([r["method"], f"error: {r['error'][:100]}", *[""] * (len(METHOD_HEADER) - 2)]))
            continue
        stages = ", ".join(f"{k} {x['img_s']:.1f}" for k, x in r["train"].items())
        rows.append(
            cells(
                [
                    r["method"],
                    f"{r['image_size']}²",
                    r["infer_batch"],
                    f"{r['infer_img_s']:.1f}",
                    r["train_batch"],
                    stages,
                    _fmt(r["backbone_frac"], ".0f", 100, " %"),
                    f"{r['gflops_per_img']:.3g}",
                    f"{_fmt(r['mfu_forward'], '.0f', 100, ' %')} / {_fmt(r['mfu_backbone'], '.0f', 100, ' %')}",
                    f"{_fmt(r['infer_peak_gb'])} / {_fmt(r['train_peak_gb'])}",
                ]
            )
        )
    return Table("", METHOD_HEADER, rows, align=["l", "r", "r", "r", "r", "l", "r", "r", "r", "r"])


def to_markdown(report: Mapping[str, Any]) -> str:
    """The throughput table (and loading, metrics, targets) as markdown."""
    lines = [f"# Throughput — {report['device']}", ""]
    if not report["gpu"]:
        lines += [
            "**No GPU was present**: tiny presets, small batches, CPU fp32. These rows test the harness; they are "
            "not speed figures for the paper-size models.",
            "",
        ]
    elif report["settings"]["tiny"]:
        lines += ["**Tiny presets** (not the paper-size models).", ""]
    v = report["versions"]
    lines += [
        f"Random weights (speed does not depend on the weights); {'bf16 autocast' if report['bf16'] else 'fp32'}. "
        f"Commit {report['commit']}; torch {v.get('torch')}, open_clip {v.get('open_clip_torch')}, "
        f"timm {v.get('timm')}, lightning {v.get('lightning')}.",
        "",
        *table_markdown(_method_table(report["methods"]), caption=False),
    ]
    variant_rows = [
        cells(
            [
                r["method"],
                k,
                f"{x['img_s']:.1f}",
                f"{x['img_s'] / r['infer_img_s']:.2f}×",
                _fmt(x.get("compile_s")),
            ]
        )
        for r in report["methods"]
        for k, x in r.get("variants", {}).items()
    ]
    if variant_rows:
        header = ["method", "variant", "infer img/s", "vs eager", "compile s"]
        lines += table_markdown(
            Table("", header, variant_rows, align=["l", "l", "r", "r", "r"]), caption=False
        )
    ld = report.get("loading")
    if ld:
        lines += [
            f"Data loading from disk ({ld['source_side']}² PNG → {ld['size']}², {ld['workers']} workers, batch "
            f"{ld['batch']}, {ld['images']} images): **{ld['img_s']:.1f} images/s** decoding every time; "
            f"**{ld['cached_img_s']:.1f} images/s** from the pre-resized cache (built once in "
            f"{ld['cache_build_s']:.1f} s).",
            "",
        ]
    mt = report.get("metrics")
    if mt:
        lines += [
            f"Metrics (`evaluate()`: image + pixel AUROC/AP/F1max, AUPRO, legacy AUPRO) on {mt['n']} maps at "
            f"{mt['size']}² in {mt['categories']} categories on {mt['device']}: **{mt['evaluate_s']:.2f} s** "
            f"(extrapolated to VisA, 2162 maps at 518²: {mt['evaluate_visa_s']:.1f} s).",
            "",
        ]
    if report["gpu"] and not report["settings"]["tiny"]:
        rows = [
            cells([t["what"], f"{t['target']:g}", f"{t['got']:.2f}", "yes" if t["ok"] else "**no**"])
            for t in report["targets"]
        ]
        header = ["target (issue 9)", "target", "measured", "met"]
        lines += table_markdown(Table("", header, rows, align=["l", "r", "r", "l"]), caption=False)
    return "\n".join(lines).rstrip() + "\n"
