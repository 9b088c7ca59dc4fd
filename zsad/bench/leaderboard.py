"""The leaderboard: ``metrics.json`` files → ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard.html`` and plots.

Pure Python + numpy/matplotlib (no torch): it can be re-run on copied result folders anywhere.

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

import base64
import csv
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The metric keys of metrics.json (spec §3); duplicated from zsad.metrics so that this module needs no torch.
IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "pixel_aupro_legacy")
METRIC_KEYS = IMAGE_KEYS + PIXEL_KEYS
MAIN_KEYS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")  # what papers report
SECOND_KEYS = ("pixel_ap", "image_f1max", "pixel_f1max", "pixel_aupro_legacy")
SHORT = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "pixel_f1max": "P-F1max",
    "pixel_aupro": "P-AUPRO",
    "pixel_aupro_legacy": "P-AUPRO (legacy)",
}
NULL = "–"
RANDOM_NOTE = "RANDOM WEIGHTS: numbers say nothing about accuracy"
RANDOM_TOKENS = {"none", "random", "random init", ""}
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
# reading metrics.json


@dataclass
class Run:
    """One evaluated run, as read from its ``metrics.json``."""

    path: Path
    label: str  # the leaderboard row (method name, or an ablation's name)
    method: str
    protocol: str
    seed: int
    data: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    @property
    def datasets(self) -> dict[str, Any]:
        return self.data["datasets"]

    @property
    def timing(self) -> dict[str, Any]:
        return self.data.get("timing") or {}


def load_run(path: Path, label: str | None = None) -> Run:
    """Read and check one ``metrics.json``.

    Raises:
        ValueError: the file is not JSON or lacks a required key (the message names the file and the key).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read metrics.json: {e}") from e
    for key in ("method", "protocol", "seed", "datasets"):
        if key not in data:
            raise ValueError(f"{path}: metrics.json lacks the key {key!r} (spec §4)")
    if not isinstance(data["datasets"], dict):
        raise ValueError(f"{path}: 'datasets' must map dataset name → results")
    for name, ds in data["datasets"].items():
        if not isinstance(ds, dict) or "categories" not in ds or "mean" not in ds:
            raise ValueError(f"{path}: datasets.{name} must hold 'categories' and 'mean'")
        for cat, values in list(ds["categories"].items()) + [("mean", ds["mean"])]:
            for key, v in values.items():
                if v is not None and not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                    raise ValueError(
                        f"{path}: datasets.{name}.{cat}.{key} = {v!r}; expected a fraction in [0,1] or null"
                    )
    return Run(
        path=Path(path),
        label=label or str(data["method"]) + (f"_{data['variant']}" if data.get("variant") else ""),
        method=str(data["method"]),
        protocol=str(data["protocol"]),
        seed=int(data["seed"]),
        data=data,
    )


WEIGHT_KEYS = ("pretrained", "weights")


def _walk_weights(node: Any, prefix: str = "") -> Iterable[tuple[str, str]]:
    """Every ``pretrained``/``weights`` leaf in a nested dict, with the dotted key of its parent."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in WEIGHT_KEYS and not isinstance(v, (dict, list)):
                yield prefix, str(v)
            elif isinstance(v, dict):
                yield from _walk_weights(v, f"{prefix}.{k}" if prefix else str(k))


def weight_sources(run: Run) -> list[tuple[str, str]]:
    """(backbone, weight source) pairs: from ``metrics.backbone`` (the model's identity), else the config."""
    found = list(_walk_weights(run.data.get("backbone") or {}))
    if not found:
        found = [
            (k.removeprefix("method").lstrip("."), v)
            for k, v in _walk_weights((run.data.get("config") or {}).get("method") or {}, "method")
        ]
    return found


def weights_of(run: Run) -> str:
    """The weight source of a run's backbones as one string (``none`` = random initialisation)."""
    found = weight_sources(run)
    if not found:
        return "unknown"
    if len({v for _, v in found}) == 1:
        return found[0][1]
    return ", ".join(f"{k or 'backbone'}={v}" for k, v in found)


def is_random(run: Run) -> bool:
    """True when any backbone of the run was built with random weights (``pretrained: none``)."""
    return any(v.strip().lower() in RANDOM_TOKENS or "random" in v.lower() for _, v in weight_sources(run))


# ---------------------------------------------------------------------------------------------------------------
# aggregation over seeds


@dataclass
class Stat:
    """Mean ± sample std of one value over seeds; ``n`` = seeds where it is defined, ``of`` = seeds in all."""

    mean: float | None
    std: float | None
    n: int
    of: int

    def text(self) -> str:
        if self.mean is None:
            return NULL
        s = f"{100 * self.mean:.1f}"
        if self.std is not None:
            s += f" ± {100 * self.std:.1f}"
        return s

    def key(self) -> float | None:
        """The value compared for bold: the mean at the displayed precision."""
        return None if self.mean is None else round(100 * self.mean, 1)


def stat(values: Sequence[float | None]) -> Stat:
    defined = [float(v) for v in values if v is not None]
    if not defined:
        return Stat(None, None, 0, len(values))
    mean = sum(defined) / len(defined)
    std = None
    if len(values) > 1 and len(defined) > 1:
        std = math.sqrt(sum((v - mean) ** 2 for v in defined) / (len(defined) - 1))
    return Stat(mean, std, len(defined), len(values))


@dataclass
class Group:
    """All seeds of one leaderboard row (label) under one protocol."""

    protocol: str
    label: str
    runs: list[Run] = field(default_factory=list)

    def metric(self, dataset: str, key: str, category: str = "mean") -> Stat:
        vals = []
        for r in self.runs:
            ds = r.datasets.get(dataset)
            if ds is None:
                continue
            node = ds["mean"] if category == "mean" else ds["categories"].get(category)
            vals.append(None if node is None else node.get(key))
        return stat(vals)

    def partial_mean(self, dataset: str, key: str) -> tuple[int, int] | None:
        """(categories in the mean, categories) when some run's mean left out categories, else None."""
        worst = None
        for r in self.runs:
            ds = r.datasets.get(dataset)
            if ds is None or ds["mean"].get(key) is None:
                continue
            total = len(ds["categories"])
            counts = ds.get("n_categories_in_mean") or {}
            n = counts.get(key)
            if n is None:
                n = sum(1 for c in ds["categories"].values() if c.get(key) is not None)
            if n < total and (worst is None or n < worst[0]):
                worst = (int(n), total)
        return worst

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.runs})

    @property
    def protocols(self) -> list[str]:
        return list(dict.fromkeys(r.protocol for r in self.runs))

    def timing(self, key: str) -> Stat:
        """Over seeds; ``train_s`` adds up the trainings of one seed (a merged protocol trains twice)."""
        if key != "train_s":
            return stat([None if r.timing.get(key) is None else float(r.timing[key]) for r in self.runs])
        per_seed = []
        for s in self.seeds:
            vals = [r.timing.get(key) for r in self.runs if r.seed == s]
            per_seed.append(None if any(v is None for v in vals) else float(sum(vals)))
        return stat(per_seed)

    def devices(self) -> str:
        return ", ".join(dict.fromkeys(str(r.timing.get("device", "?")) for r in self.runs))


def protocol_family(protocol: str) -> str:
    """``A_mvtec`` → ``A``: the halves of a protocol (spec §1: MVTec → others, VisA → MVTec) share one table."""
    return protocol.split("_")[0]


def _halves_disjoint(runs: Sequence[Run]) -> bool:
    """Merging a family is safe when no (row, seed) gets the same dataset from two of its protocols."""
    seen: set[tuple[str, int, str]] = set()
    for r in runs:
        for d in r.datasets:
            if (r.label, r.seed, d) in seen:
                return False
            seen.add((r.label, r.seed, d))
    return True


def group_runs(runs: Sequence[Run]) -> dict[str, list[Group]]:
    """Table key → row groups, in the order the runs came (the grid's order).

    The key is the protocol family (``A`` for ``A`` and ``A_mvtec``) when the family's protocols test on
    different datasets, else the protocol itself.
    """
    seen: dict[tuple[str, str, int], Path] = {}
    families: dict[str, list[Run]] = {}
    for r in runs:
        k = (r.protocol, r.label, r.seed)
        if k in seen:
            raise ValueError(
                f"two results for {r.label} / protocol {r.protocol} / seed {r.seed}: {seen[k]} and {r.path}"
            )
        seen[k] = r.path
        families.setdefault(protocol_family(r.protocol), []).append(r)
    out: dict[str, dict[str, Group]] = {}
    for fam, members in families.items():
        merge = _halves_disjoint(members)
        for r in members:
            key = fam if merge else r.protocol
            out.setdefault(key, {}).setdefault(r.label, Group(key, r.label)).runs.append(r)
    for groups in out.values():
        for g in groups.values():
            g.runs.sort(key=lambda r: (r.seed, r.protocol))
    return {p: list(g.values()) for p, g in out.items()}


def _ordered_union(items: Iterable[Iterable[str]]) -> list[str]:
    return list(dict.fromkeys(x for it in items for x in it))


def datasets_of(groups: Sequence[Group]) -> list[str]:
    return _ordered_union(r.datasets.keys() for g in groups for r in g.runs)


def categories_of(groups: Sequence[Group], dataset: str) -> list[str]:
    return _ordered_union(
        r.datasets[dataset]["categories"].keys() for g in groups for r in g.runs if dataset in r.datasets
    )


# ---------------------------------------------------------------------------------------------------------------
# a small document model rendered to markdown and HTML


@dataclass
class Cell:
    text: str
    bold: bool = False
    mark: str = ""  # footnote marker, outside the bold


@dataclass
class Table:
    caption: str
    header: list[str]
    rows: list[list[Cell]]
    # (group title, columns spanned) above the header
    groups: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Section:
    title: str
    level: int = 2
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)


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
    pkgs = _ordered_union((r.data.get("versions") or {}).keys() for r in runs)
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


def build_document(
    runs: list[Run], title: str, plots: Mapping[str, Path], failures: Sequence[Mapping[str, Any]]
) -> tuple[str, list[Section]]:
    """The leaderboard as a title and sections, rendered by ``to_markdown`` and ``to_html``."""
    groups = group_runs(runs)
    full_title = title + (f" — {RANDOM_NOTE}" if any(is_random(r) for r in runs) else "")
    sections = [Section("About these numbers", 2, _header(runs, groups))]
    for p, gs in groups.items():
        dsets = datasets_of(gs)
        sec = Section(f"Protocol {p}", 2)
        halves = _ordered_union(g.protocols for g in gs)
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
        sec.images = [plots[k] for k in plots if k.startswith(f"bars_{_slug(p)}_")]
        sections.append(sec)
        for d in dsets:
            n_cats = len(categories_of(gs, d))
            ds = Section(f"Protocol {p} — {d} per category", 3)
            ds.paragraphs.append(f"{n_cats} categories, {_n_images(gs, d)} test images.")
            ds.tables = _category_tables(gs, d)
            gkey = f"gallery_{_slug(p)}_{_slug(d)}"
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


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def to_markdown(title: str, sections: list[Section], out_dir: Path) -> str:
    lines = [f"# {title}", ""]
    for sec in sections:
        lines += ["#" * sec.level + " " + sec.title, ""]
        for p in sec.paragraphs:
            lines += [p, ""]
        for t in sec.tables:
            lines += [f"**{t.caption}**", ""]
            header = t.header
            if t.groups:
                names = [g for g, n in t.groups for _ in range(n)]
                header = [f"{g} · {h}" if g else h for g, h in zip(names, t.header)]
            lines.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
            lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
            for row in t.rows:
                cells = [(f"**{c.text}**" if c.bold else c.text) + c.mark for c in row]
                lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
            lines.append("")
            for n in dict.fromkeys(t.notes):
                lines += [f"<sub>{n}</sub>  "]
            if t.notes:
                lines.append("")
        for img in sec.images:
            lines += [f"![{img.stem}]({img.relative_to(out_dir).as_posix()})", ""]
    return "\n".join(lines).rstrip() + "\n"


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1400px;color:#222;padding:0 1em}
h1{font-size:1.5em}h1 .warn{color:#b00020}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:.85em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}td.best{font-weight:700;background:#eaf5ea}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
.note{font-size:.8em;color:#555;margin:0}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
"""


def _html_text(s: str) -> str:
    """Escape, then honour the two markdown bits the header uses: **bold** and `code`."""
    out, bold, code = [], False, False
    for ch in _split_marks(s):
        if ch == "**":
            out.append("</b>" if bold else "<b>")
            bold = not bold
        elif ch == "`":
            out.append("</code>" if code else "<code>")
            code = not code
        else:
            out.append(html.escape(ch.replace("\\*", "*")))
    return "".join(out)


def _split_marks(s: str) -> list[str]:
    parts, buf, i = [], "", 0
    while i < len(s):
        if s.startswith("\\*", i):
            buf += "\\*"
            i += 2
        elif s.startswith("**", i) or s[i] == "`":
            mark = "**" if s.startswith("**", i) else "`"
            parts += [buf, mark]
            buf = ""
            i += len(mark)
        else:
            buf += s[i]
            i += 1
    return parts + [buf]


def to_html(title: str, sections: list[Section]) -> str:
    warn = f" — {RANDOM_NOTE}"
    t = html.escape(title.replace(warn, ""))
    if title.endswith(warn):
        t += f' — <span class="warn">{html.escape(RANDOM_NOTE)}</span>'
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{t}</h1>",
    ]
    for sec in sections:
        parts.append(f"<h{sec.level}>{html.escape(sec.title)}</h{sec.level}>")
        parts += [f"<p>{_html_text(p)}</p>" for p in sec.paragraphs]
        for tab in sec.tables:
            parts.append(f"<table><caption>{html.escape(tab.caption)}</caption><thead>")
            if tab.groups and any(g for g, _ in tab.groups):
                parts.append(
                    "<tr>"
                    + "".join(f'<th colspan="{n}">{html.escape(g)}</th>' for g, n in tab.groups)
                    + "</tr>"
                )
            parts.append(
                "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in tab.header) + "</tr></thead><tbody>"
            )
            for row in tab.rows:
                cells = []
                for c in row:
                    cls = ' class="best"' if c.bold else ""
                    cells.append(f"<td{cls}>{_html_text(c.text)}{html.escape(c.mark)}</td>")
                parts.append("<tr>" + "".join(cells) + "</tr>")
            parts.append("</tbody></table>")
            parts += [f'<p class="note">{_html_text(n)}</p>' for n in dict.fromkeys(tab.notes)]
        for img in sec.images:
            data = base64.b64encode(img.read_bytes()).decode("ascii")
            parts.append(f'<img alt="{html.escape(img.stem)}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


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


def write_csv(runs: Sequence[Run], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in csv_rows(runs):
            w.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})
    return path


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
        from zsad.bench.plots import draw_all

        plot_files = draw_all(group_runs(runs), out / "plots")
    title_line, sections = build_document(runs, title, plot_files, failures)
    written["md"] = out / "leaderboard.md"
    written["md"].write_text(to_markdown(title_line, sections, out))
    written["csv"] = write_csv(runs, out / "leaderboard.csv")
    written["html"] = out / "leaderboard.html"
    written["html"].write_text(to_html(title_line, sections))
    written.update(plot_files)
    return written
