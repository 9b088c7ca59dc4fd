"""The leaderboard: ``metrics.json`` files → ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard.html`` and plots.

No torch: it can be re-run on copied result folders anywhere (``zsad.results.plots`` draws with matplotlib).

Layout of ``leaderboard.md`` (and of the HTML page, which holds the same tables and embeds the plots):

* a title line that says **RANDOM WEIGHTS** when any run used randomly initialised backbones;
* a header: backbones and weight sources, data sources, commits and package versions, seeds, how to read the tables;
* per protocol: the main table (rows = methods, columns = datasets × image AUROC/AP and pixel AUROC/AUPRO, plus
  training seconds, test images/s and the device), a second table (pixel AP, image/pixel F1-max, legacy AUPRO),
  and per-dataset, per-category tables (rows = categories, columns = methods);
* failed runs, when the grid had any.

Values are fractions in ``metrics.json`` and percentages with one decimal in tables. With more than one seed a
cell is ``mean ± std`` (sample standard deviation over the seeds whose value is defined). ``–`` marks an undefined
value (``null``); undefined values are excluded from every mean. The best value of a column (main tables) or of a
row (per-category tables) is bold, compared at the displayed precision.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from zsad.results.aggregate import (
    NULL,
    Group,
    Stat,
    categories_of,
    datasets_of,
    group_runs,
    ordered_union,
)
from zsad.results.render import Cell, Section, Table, slug, to_html, to_markdown, write_csv
from zsad.results.schema import (
    MAIN_KEYS,
    METRIC_KEYS,
    SECOND_KEYS,
    SHORT,
    Run,
    is_random,
    load_run,
    weights_of,
)

RANDOM_NOTE = "RANDOM WEIGHTS: numbers say nothing about accuracy"
CONTROL_NOTE = (
    "random-weight control rows"  # some rows (not all) on random weights: a control, named in the title
)
CSV_COLUMNS = (
    "method",
    "protocol",
    "seed",
    "dataset",
    "category",
    *METRIC_KEYS,
    "n_images",
    "train_s",
    "test_s",
    "images_per_s",
    "device",
    "weights",
    "run_dir",
)
MAX_DATASETS_PER_TABLE = 3  # wider tables stop being readable; more datasets continue in a second table


# ---------------------------------------------------------------------------------------------------------------
# tables


def _bold_best(cells: list[Cell], stats: list[Stat]) -> None:
    """Bold the best displayed value; a mean over fewer categories (marked ``*``) competes only with its kind."""
    partial = [bool(c.mark) for c in cells]
    if any(partial) and not all(partial):
        stats = [Stat(None, None, 0, s.of) if p else s for s, p in zip(stats, partial)]
    keys = [s.key() for s in stats]
    defined = [k for k in keys if k is not None]
    if len(defined) < 2:  # a lone value is not "best" of anything
        return
    best = max(defined)
    for c, k in zip(cells, keys):
        c.bold = k == best


def _mark(cells: list[Cell], stats: list[Stat], groups: list[Group], dataset: str, key: str) -> list[str]:
    """Footnote markers: ``*`` a mean over fewer categories than exist, ``‡`` a value missing in some seeds."""
    notes = []
    for g, c, s in zip(groups, cells, stats):
        part = g.partial_mean(dataset, key)
        if part:
            c.mark += "*"
            notes.append(
                f"\\* {g.label}, {dataset} {SHORT[key]}: mean over {part[0]} of {part[1]} categories (the others are undefined)."
            )
        if s.mean is not None and s.n < s.of:
            c.mark += "‡"
            notes.append(f"‡ {g.label}, {dataset} {SHORT[key]}: defined in {s.n} of {s.of} seeds.")
    return notes


def _metric_table(
    caption: str, groups: list[Group], datasets: list[str], keys: Sequence[str], timing: bool
) -> Table:
    header = ["method", "seeds"] + [SHORT[k] for d in datasets for k in keys]
    col_groups = [("", 2)] + [(d, len(keys)) for d in datasets]
    if timing:
        header += ["train s", "test img/s", "device"]
        col_groups.append(("cost", 3))
    rows = [[Cell(g.label), Cell(", ".join(map(str, g.seeds)))] for g in groups]
    notes: list[str] = []
    for d in datasets:
        for k in keys:
            stats = [g.metric(d, k) for g in groups]
            cells = [Cell(s.text()) for s in stats]
            notes += _mark(cells, stats, groups, d, k)
            _bold_best(cells, stats)
            for row, c in zip(rows, cells):
                row.append(c)
    if timing:
        for row, g in zip(rows, groups):
            train_s, ips = g.timing("train_s"), g.timing("images_per_s")
            row.append(Cell(NULL if train_s.mean is None else f"{train_s.mean:.1f}"))
            row.append(Cell(NULL if ips.mean is None else f"{ips.mean:.1f}"))
            row.append(Cell(g.devices()))
    return Table(caption, header, rows, col_groups, notes)


def _chunks(items: list[str], n: int) -> list[list[str]]:
    return [items[i : i + n] for i in range(0, len(items), n)] or [[]]


def _category_tables(groups: list[Group], dataset: str) -> list[Table]:
    cats = categories_of(groups, dataset)
    tables = []
    for k in MAIN_KEYS:
        rows, notes = [], []
        for cat in [*cats, "mean"]:
            stats = [g.metric(dataset, k, cat) for g in groups]
            cells = [Cell(s.text()) for s in stats]
            notes += _mark(cells, stats, groups, dataset, k) if cat == "mean" else []
            _bold_best(cells, stats)
            rows.append([Cell("**mean**" if cat == "mean" else cat)] + cells)
        caption = f"{dataset} — {SHORT[k]} per category"
        tables.append(Table(caption, ["category"] + [g.label for g in groups], rows, notes=notes))
    return tables


def _n_images(groups: list[Group], dataset: str) -> str:
    counts = {r.datasets[dataset].get("n_images") for g in groups for r in g.runs if dataset in r.datasets}
    counts.discard(None)
    return "/".join(str(c) for c in sorted(counts)) if counts else "?"


# ---------------------------------------------------------------------------------------------------------------
# header


def _distinct(values: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{v} ({n} runs)" for v, n in counts.items())


def _backbone_text(run: Run) -> str:
    """``vision: dinov3 `vit_large_patch16_dinov3`, text: clip `ViT-L-14-336-quickgelu` `` from the identity."""
    b = run.data.get("backbone") or {}
    if not isinstance(b, dict) or not b:
        return "unknown"

    def one(d: dict[str, Any]) -> str:
        kind = f"{d['kind']} " if d.get("kind") else ""
        return f"{kind}`{d.get('name', '?')}`"

    parts = [f"{k}: {one(v)}" for k, v in b.items() if isinstance(v, dict)]
    if "name" in b:
        parts.insert(0, one(b))
    parts += [f"{k} `{v}`" for k, v in b.items() if k in ("vision", "text") and isinstance(v, str)]
    size = b.get("image_size")
    return ", ".join(parts or ["unknown"]) + (f" at {size}²" if isinstance(size, int) else "")


def _data_text(run: Run) -> str:
    """Where a protocol's data came from: the auxiliary set, the target sets and their root folders."""
    cfg = (run.data.get("config") or {}).get("data") or {}
    train = cfg.get("train") or {}
    tests = cfg.get("test") or []
    train_on = run.data.get("train_on") or train.get("name") or "?"
    targets = ", ".join(f"`{d.get('name', '?')}`" for d in tests) or ", ".join(f"`{d}`" for d in run.datasets)
    roots = {str(Path(d["root"]).parent) for d in [train, *tests] if d.get("root")}
    synth = cfg.get("synthetic") or {}
    if any(not d.get("root") for d in [train, *tests]) and synth.get("root"):
        roots.add(
            f"generated under {synth['root']} (seed {synth.get('seed', 0)}, {synth.get('size', '?')} px)"
        )
    where = f" (data: {', '.join(sorted(roots))})" if roots else ""
    return f"train on `{train_on}` → test on {targets}{where}"


def _per_label(texts: dict[str, str]) -> str:
    if len(set(texts.values())) == 1 and len(texts) > 1:
        return f"all methods: {next(iter(texts.values()))}"
    return "; ".join(f"**{lab}**: {t}" for lab, t in texts.items())


def _header(runs: list[Run], groups: dict[str, list[Group]]) -> list[str]:
    if not runs:
        return ["No finished runs."]
    lines = []
    by_label: dict[str, list[Run]] = {}
    for r in runs:
        by_label.setdefault(r.label, []).append(r)
    backbones = _per_label({lab: _distinct(_backbone_text(r) for r in rs) for lab, rs in by_label.items()})
    lines.append(f"**Backbones** — {backbones}.")
    weights = _per_label({lab: f"`{_distinct(weights_of(r) for r in rs)}`" for lab, rs in by_label.items()})
    random = [lab for lab, rs in by_label.items() if any(is_random(r) for r in rs)]
    w = f"**Weights** — {weights}."
    if random:
        who = "every method" if len(random) == len(by_label) else ", ".join(random)
        w += f" Randomly initialised (untrained) backbones in {who}: these rows measure the pipeline, not the method."
    lines.append(w)
    firsts = {r.protocol: r for r in reversed(runs)}
    for p in dict.fromkeys(r.protocol for r in runs):
        lines.append(f"**Data, protocol {p}** — {_data_text(firsts[p])}.")
    commits = _distinct(str((r.data.get("versions") or {}).get("git", "unknown")) for r in runs)
    lines.append(f"**Code** — commit `{commits}`.")
    pkgs = ordered_union((r.data.get("versions") or {}).keys() for r in runs)
    vers = ", ".join(
        f"{k} {_distinct(str((r.data.get('versions') or {}).get(k, '?')) for r in runs)}"
        for k in pkgs
        if k != "git"
    )
    if vers:
        lines.append(f"**Versions** — {vers}.")
    seeds = sorted({r.seed for r in runs})
    protocols = ", ".join(dict.fromkeys(r.protocol for r in runs))
    lines.append(f"**Runs** — {len(runs)} runs; seeds {', '.join(map(str, seeds))}; protocols {protocols}.")
    lines.append(
        "**Reading the tables** — percentages with one decimal; "
        + ("mean ± sample std over seeds; " if len(seeds) > 1 else "")
        + f"`{NULL}` = undefined (null in metrics.json, excluded from every mean); best per column in bold; "
        "\\* = the dataset mean ran over fewer categories than the dataset has; AUPRO integrates PRO up to "
        "FPR 0.3 (MVTec definition, 8-connected regions); the legacy AUPRO is the AnomalyCLIP-family variant; "
        "cost = training wall time in seconds and test images per second (evaluation incl. metrics) on the device."
    )
    return lines


# ---------------------------------------------------------------------------------------------------------------
# the document


def _random_suffix(runs: list[Run]) -> str:
    """The title's warning: every row on random weights → RANDOM_NOTE; only some (controls) → names them."""
    random = list(dict.fromkeys(r.label for r in runs if is_random(r)))
    if not random:
        return ""
    if len(random) == len({r.label for r in runs}):
        return f" — {RANDOM_NOTE}"
    return f" — {CONTROL_NOTE}: {', '.join(random)}"


def build_document(
    runs: list[Run], title: str, plots: Mapping[str, Path], failures: Sequence[Mapping[str, Any]]
) -> tuple[str, list[Section]]:
    """The leaderboard as a title and sections, rendered by ``to_markdown`` and ``to_html``."""
    groups = group_runs(runs)
    full_title = title + _random_suffix(runs)
    sections = [Section("About these numbers", 2, _header(runs, groups))]
    for p, gs in groups.items():
        dsets = datasets_of(gs)
        sec = Section(f"Protocol {p}", 2)
        halves = ordered_union(g.protocols for g in gs)
        if halves != [p]:
            sec.paragraphs.append(
                f"Merged from protocols {', '.join(halves)} (each dataset's numbers come from the run that tested "
                "on it; train s adds up their trainings)."
            )
        for i, chunk in enumerate(_chunks(dsets, MAX_DATASETS_PER_TABLE)):
            sec.tables.append(
                _metric_table(f"Protocol {p} — main metrics", gs, chunk, MAIN_KEYS, timing=i == 0)
            )
        for chunk in _chunks(dsets, MAX_DATASETS_PER_TABLE):
            sec.tables.append(
                _metric_table(
                    f"Protocol {p} — pixel AP, F1-max, legacy AUPRO", gs, chunk, SECOND_KEYS, timing=False
                )
            )
        sec.images = [plots[k] for k in plots if k.startswith(f"bars_{slug(p)}_")]
        sections.append(sec)
        for d in dsets:
            n_cats = len(categories_of(gs, d))
            ds = Section(f"Protocol {p} — {d} per category", 3)
            ds.paragraphs.append(f"{n_cats} categories, {_n_images(gs, d)} test images.")
            ds.tables = _category_tables(gs, d)
            gkey = f"gallery_{slug(p)}_{slug(d)}"
            ds.images = [plots[gkey]] if gkey in plots else []
            sections.append(ds)
    if failures:
        rows = [
            [
                Cell(str(f.get("label", "?"))),
                Cell(str(f.get("protocol", "?"))),
                Cell(str(f.get("seed", "?"))),
                Cell(_one_line(str(f.get("error", "")))),
                Cell(str(f.get("run_dir", ""))),
            ]
            for f in failures
        ]
        sections.append(
            Section(
                "Failed runs",
                2,
                [
                    f"{len(failures)} run(s) failed and are missing from the tables above (traceback in each run's error.txt)."
                ],
                [Table("Failed runs", ["method", "protocol", "seed", "error", "run folder"], rows)],
            )
        )
    return full_title, sections


def _one_line(s: str, limit: int = 160) -> str:
    s = " ".join(s.strip().splitlines()[-1:]) if s.strip() else ""
    return s if len(s) <= limit else s[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------------------------
# CSV


def csv_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One flat row per run × dataset × category, plus a ``mean`` pseudo-category per dataset."""
    rows = []
    for r in runs:
        t = r.timing
        common = {
            "method": r.label,
            "protocol": r.protocol,
            "seed": r.seed,
            "train_s": t.get("train_s"),
            "test_s": t.get("test_s"),
            "images_per_s": t.get("images_per_s"),
            "device": t.get("device"),
            "weights": weights_of(r),
            "run_dir": str(r.run_dir),
        }
        for d, ds in r.datasets.items():
            for cat, values in [*ds["categories"].items(), ("mean", ds["mean"])]:
                row = {
                    **common,
                    "dataset": d,
                    "category": cat,
                    "n_images": ds.get("n_images") if cat == "mean" else None,
                }
                row.update({k: values.get(k) for k in METRIC_KEYS})
                rows.append(row)
    return rows


def write_leaderboard_csv(runs: Sequence[Run], path: Path) -> Path:
    """``leaderboard.csv``: one row per run × dataset × category (and a ``mean`` row per dataset)."""
    return write_csv(csv_rows(runs), CSV_COLUMNS, path)


# ---------------------------------------------------------------------------------------------------------------
# entry point


def write_leaderboard(
    metrics_files: list[Path],
    out: Path,
    title: str,
    *,
    labels: Mapping[Path, str] | None = None,
    failures: Sequence[Mapping[str, Any]] = (),
    plots: bool = True,
) -> dict[str, Path]:
    """Write the leaderboard of the given runs into ``out``.

    Args:
        metrics_files: one ``metrics.json`` per run; their order is the order of the rows.
        out: the results folder (created).
        title: the first line of the leaderboard (a random-weights warning is appended when it applies).
        labels: row name per metrics file; default: the file's ``method``, plus ``_<variant>`` when it has one.
        failures: failed runs to list (dicts with label, protocol, seed, error, run_dir).
        plots: draw the bar charts and heatmap galleries.

    Returns:
        name → path of every file written: ``md``, ``csv``, ``html`` and one entry per plot (its file stem).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = {Path(k): v for k, v in (labels or {}).items()}
    runs = [load_run(Path(p), labels.get(Path(p))) for p in metrics_files]
    written: dict[str, Path] = {}
    plot_files: dict[str, Path] = {}
    if plots and runs:
        from zsad.results.plots import draw_all  # matplotlib loads only when plots are drawn

        plot_files = draw_all(group_runs(runs), out / "plots")
    title_line, sections = build_document(runs, title, plot_files, failures)
    written["md"] = out / "leaderboard.md"
    written["md"].write_text(to_markdown(title_line, sections, out))
    written["csv"] = write_leaderboard_csv(runs, out / "leaderboard.csv")
    written["html"] = out / "leaderboard.html"
    written["html"].write_text(to_html(title_line, sections, warning=RANDOM_NOTE))
    written.update(plot_files)
    return written
