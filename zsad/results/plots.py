"""Leaderboard plots: per-dataset bar charts and heatmap galleries (matplotlib, Agg canvas, no pyplot state).

The gallery reads each run's ``gallery/<dataset>/<category>.npz`` (keys ``paths``, ``maps`` [n,H,W] and, when
present, ``masks``, ``labels``, ``scores``, ``extra_<name>`` and ``extras_spec``). Extras are drawn by their declared
kind (``extras_spec``, written by the Evaluator from the method's ``extra_specs()``), never by their shape:
``image_map`` (EntroAD's entropy map) gets a column of its own, ``image_table`` (AVA-DINO's routing weights per tap)
and ``batch_table`` (MPAMA's expert shares per MoE layer, one table per category) get a heat-map column, and
``image_scalar`` values (EntroAD's gate) are written under the map. A file without ``extras_spec`` has its extras
left out, with a warning.
Each method's maps share one colour scale over the whole gallery (1st–99th percentile), so a normal image that
looks dark is one the method scored low compared with its anomalous images.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from zsad.results.aggregate import Group, categories_of, datasets_of
from zsad.results.render import slug
from zsad.results.schema import MAIN_KEYS, SHORT

log = logging.getLogger("zsad.results")
GALLERY_ROWS = 12  # images per gallery figure, spread over the categories
CELL_IN = 1.75  # inches per gallery cell
MAP_CMAP = "inferno"
EXTRA_CMAP = "viridis"


def draw_all(groups: dict[str, list[Group]], out: Path, gallery_rows: int = GALLERY_ROWS) -> dict[str, Path]:
    """Every plot of the leaderboard; returns file stem → path."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for protocol, gs in groups.items():
        for d in datasets_of(gs):
            path = out / f"bars_{slug(protocol)}_{slug(d)}.png"
            written[path.stem] = bar_chart(gs, protocol, d, path)
        for d in datasets_of(gs):
            path = out / f"gallery_{slug(protocol)}_{slug(d)}.png"
            if gallery(gs, protocol, d, path, gallery_rows) is not None:
                written[path.stem] = path
    return written


def _save(fig: Figure, path: Path, dpi: int) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return path


# ---------------------------------------------------------------------------------------------------------------
# bar charts


def bar_chart(groups: Sequence[Group], protocol: str, dataset: str, path: Path) -> Path:
    """Grouped bars: the main metrics (x) × methods (bars), mean over seeds with ± std error bars."""
    n = len(groups)
    width = 0.8 / max(n, 1)
    x = np.arange(len(MAIN_KEYS))
    fig = Figure(figsize=(max(6.5, 1.6 + 0.42 * n * len(MAIN_KEYS)), 4.2), layout="constrained")
    ax = fig.add_subplot()
    colors = _palette(n)
    for i, g in enumerate(groups):
        stats = [g.metric(dataset, k) for k in MAIN_KEYS]
        pos = x - 0.4 + width * (i + 0.5)
        h = [100 * s.mean if s.mean is not None else 0.0 for s in stats]
        err = [100 * s.std if s.std is not None else 0.0 for s in stats]
        ax.bar(
            pos, h, width * 0.92, yerr=err if any(err) else None, color=colors[i], label=g.label, capsize=2
        )
        for p, s, k in zip(pos, stats, MAIN_KEYS):
            text = (
                "–" if s.mean is None else f"{100 * s.mean:.1f}" + ("*" if g.partial_mean(dataset, k) else "")
            )
            y = 1.5 if s.mean is None else 100 * s.mean + (100 * s.std if s.std else 0) + 1.0
            ax.text(p, y, text, ha="center", va="bottom", fontsize=7, rotation=90 if n > 3 else 0)
    ax.set_xticks(x, [SHORT[k] for k in MAIN_KEYS])
    ax.set_ylim(0, 112)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("%")
    ax.axhline(50, color="0.6", lw=0.7, ls="--", zorder=0)
    ax.grid(axis="y", color="0.9", zorder=0)
    ax.set_axisbelow(True)
    seeds = max(len(g.seeds) for g in groups)
    ax.set_title(
        f"{dataset} — protocol {protocol}" + (f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""),
        fontsize=11,
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.text(
        1.0,
        -0.12,
        "dashed: 50 % (chance AUROC); – = undefined; * = mean over fewer categories",
        transform=ax.transAxes,
        ha="right",
        fontsize=7,
        color="0.4",
    )
    return _save(fig, path, dpi=120)


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# heatmap gallery


@dataclass
class GalleryItem:
    """One image of one method's gallery."""

    category: str
    path: str
    map: np.ndarray
    mask: np.ndarray | None
    label: int | None
    score: float | None
    extra_maps: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    tables: dict[str, ExtraTable] = field(default_factory=dict)


@dataclass
class ExtraTable:
    """A small labelled table: an image's (``image_table``) or its category's (``batch_table``)."""

    values: np.ndarray  # [R, C]
    rows: list[str]
    cols: list[str]
    row_name: str = ""
    col_name: str = ""
    per_category: bool = False


def read_gallery(run_dir: Path, dataset: str) -> dict[str, GalleryItem]:
    """image path → item, from every ``<run_dir>/gallery/<dataset>/<category>.npz``; extras by their declaration."""
    folder = Path(run_dir) / "gallery" / dataset
    items: dict[str, GalleryItem] = {}
    for f in sorted(folder.glob("*.npz")):
        try:
            z = dict(np.load(f, allow_pickle=False))
        except (OSError, ValueError) as e:
            log.warning("gallery %s unreadable (%s); skipped in the plot", f, e)
            continue
        if "paths" not in z or "maps" not in z:
            log.warning("gallery %s lacks 'paths' or 'maps'; skipped in the plot", f)
            continue
        specs = _extras_spec(f, z)
        for i, p in enumerate(z["paths"]):
            items[str(p)] = _item(f.stem, str(p), z, i, specs)
    return items


def _extras_spec(f: Path, z: dict[str, np.ndarray]) -> dict[str, dict]:
    """The gallery file's declared extras; none (with a warning) for a file that has extras but no declaration."""
    if "extras_spec" in z:
        return json.loads(str(z["extras_spec"]))
    if any(k.startswith("extra_") for k in z):
        log.warning("gallery %s has extras but no extras_spec (an older Evaluator); extras left out", f)
    return {}


def _item(category: str, path: str, z: dict[str, np.ndarray], i: int, specs: dict[str, dict]) -> GalleryItem:
    item = GalleryItem(
        category=category,
        path=path,
        map=np.asarray(z["maps"][i], dtype=np.float32),
        mask=np.asarray(z["masks"][i]).squeeze().astype(bool) if "masks" in z and z["masks"].size else None,
        label=int(z["labels"][i]) if "labels" in z else None,
        score=float(z["scores"][i]) if "scores" in z else None,
    )
    for name, spec in specs.items():
        v = z.get(f"extra_{name}")  # the Evaluator stores a method's extras as extra_<name>
        if v is None:
            continue
        kind = spec["kind"]
        if kind == "image_map":
            item.extra_maps[name] = np.asarray(v[i], dtype=np.float32)
        elif kind == "image_scalar":
            item.scalars[name] = float(v[i])
        elif kind in ("image_table", "batch_table"):
            per_category = kind == "batch_table"
            item.tables[name] = ExtraTable(
                np.asarray(v if per_category else v[i], dtype=np.float32),
                list(spec["rows"]),
                list(spec["cols"]),
                spec.get("row_name", ""),
                spec.get("col_name", ""),
                per_category,
            )
    return item


def _pick(
    items_by_label: dict[str, dict[str, GalleryItem]], categories: list[str], rows: int
) -> list[tuple[str, str]]:
    """(category, path) rows: per category an anomalous image first, then a normal one, spread over categories."""
    per_cat: dict[str, list[GalleryItem]] = {c: [] for c in categories}
    seen: set[str] = set()
    for items in items_by_label.values():
        for it in items.values():
            if it.path not in seen and it.category in per_cat:
                seen.add(it.path)
                per_cat[it.category].append(it)
    cats = [c for c in categories if per_cat[c]]
    if not cats:
        return []
    k = max(1, rows // len(cats))
    picked = []
    for c in cats:
        anom = [i for i in per_cat[c] if i.label == 1]
        norm = [i for i in per_cat[c] if i.label != 1]
        order = anom[:1] + norm[:1] + anom[1:] + norm[1:]
        picked += [(c, i.path) for i in order[:k]]
    return picked[:rows]


def _load_image(path: str, shape: tuple[int, int]) -> np.ndarray | None:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((shape[1], shape[0]), Image.BILINEAR))
    except (OSError, ValueError):
        return None


def _scale(maps: list[np.ndarray]) -> tuple[float, float]:
    if not maps:
        return 0.0, 1.0
    v = np.concatenate([m.ravel() for m in maps])
    lo, hi = np.percentile(v, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1e-6)


def gallery(
    groups: Sequence[Group], protocol: str, dataset: str, path: Path, rows: int = GALLERY_ROWS
) -> Path | None:
    """A grid of image | ground truth | each method's map (| extra maps). None when no run has a gallery."""
    labels = [g.label for g in groups]
    # The lowest seed of each row stands for the method: galleries are illustrations, not statistics.
    items = {}
    for g in groups:
        run = next((r for r in g.runs if dataset in r.datasets), None)
        if run is not None:
            items[g.label] = read_gallery(run.run_dir, dataset)
    items = {k: v for k, v in items.items() if v}
    if not items:
        return None
    picks = _pick(items, categories_of(groups, dataset), rows)
    if not picks:
        return None
    extra_cols = [
        (lab, key)
        for lab in labels
        if lab in items
        for key in sorted({k for it in items[lab].values() for k in it.extra_maps})
    ]
    table_cols = [
        (lab, key)
        for lab in labels
        if lab in items
        for key in sorted({k for it in items[lab].values() for k in it.tables})
    ]
    columns = (
        ["image", "ground truth"]
        + labels
        + [f"{lab}: {key}" for lab, key in extra_cols]
        + [f"{lab}: {key}" for lab, key in table_cols]
    )
    scales = {lab: _scale([items[lab][p].map for _, p in picks if p in items[lab]]) for lab in items}
    extra_scales = {
        (lab, key): _scale(
            [
                items[lab][p].extra_maps[key]
                for _, p in picks
                if p in items[lab] and key in items[lab][p].extra_maps
            ]
        )
        for lab, key in extra_cols
    }

    fig = Figure(figsize=(CELL_IN * len(columns), CELL_IN * 1.12 * len(picks) + 0.9), layout="constrained")
    fig.suptitle(
        f"{dataset} — protocol {protocol}: anomaly maps (each method on its own colour scale, shared by its images; "
        "white line = ground truth)",
        fontsize=10,
    )
    axes = fig.subplots(len(picks), len(columns), squeeze=False)
    for r, (cat, p) in enumerate(picks):
        ref = next(items[lab][p] for lab in items if p in items[lab])
        shape = ref.map.shape
        image = _load_image(p, shape)
        mask = ref.mask
        has_gt = mask is not None and mask.shape == shape and bool(mask.any())
        cells = axes[r]
        _show(cells[0], image if image is not None else np.full((*shape, 3), 200, np.uint8))
        if image is None:
            cells[0].text(
                0.5,
                0.5,
                "image\nnot found",
                ha="center",
                va="center",
                transform=cells[0].transAxes,
                fontsize=7,
            )
        state = {1: "anomalous", 0: "normal"}.get(ref.label, "label ?")
        cells[0].set_ylabel(f"{cat}\n{Path(p).stem} ({state})", fontsize=7)
        _show(
            cells[1], mask.astype(float) if mask is not None else np.zeros(shape), cmap="gray", vmin=0, vmax=1
        )
        if mask is None:
            cells[1].text(
                0.5,
                0.5,
                "no mask",
                ha="center",
                va="center",
                transform=cells[1].transAxes,
                fontsize=7,
                color="w",
            )
        for j, lab in enumerate(labels, start=2):
            it = items.get(lab, {}).get(p)
            if it is None:
                _blank(cells[j], "not in gallery")
                continue
            lo, hi = scales[lab]
            _show(cells[j], it.map, cmap=MAP_CMAP, vmin=lo, vmax=hi)
            if has_gt and mask.shape == it.map.shape:
                cells[j].contour(mask, levels=[0.5], colors="w", linewidths=0.6)
            info = [f"score {it.score:.3g}"] if it.score is not None else []
            info += [f"{k} {v:.2f}" for k, v in list(it.scalars.items())[:2]]
            cells[j].set_xlabel("  ".join(info), fontsize=7)
        for j, (lab, key) in enumerate(extra_cols, start=2 + len(labels)):
            it = items[lab].get(p)
            if it is None or key not in it.extra_maps:
                _blank(cells[j], "–")
                continue
            lo, hi = extra_scales[(lab, key)]
            _show(cells[j], it.extra_maps[key], cmap=EXTRA_CMAP, vmin=lo, vmax=hi)
        for j, (lab, key) in enumerate(table_cols, start=2 + len(labels) + len(extra_cols)):
            it = items[lab].get(p)
            if it is None or key not in it.tables:
                _blank(cells[j], "–")
                continue
            _table(cells[j], it.tables[key], cat)
    for j, name in enumerate(columns):
        if name in scales:
            lo, hi = scales[name]
            name = f"{name}\n[{lo:.3g}, {hi:.3g}]"
        axes[0][j].set_title(name, fontsize=8, fontweight="bold")
    return _save(fig, path, dpi=100)


def _show(ax, img: np.ndarray, **kw) -> None:  # noqa: ANN001
    ax.imshow(img, interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])


def _table(ax, t: ExtraTable, category: str) -> None:  # noqa: ANN001
    """A labelled heat map of a small table on a fixed [0, 1] scale (shares and routing weights are fractions)."""
    lo, hi = (0.0, 1.0) if t.values.min() >= 0 and t.values.max() <= 1 else (None, None)
    ax.imshow(t.values, cmap=EXTRA_CMAP, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
    r, c = t.values.shape
    ax.set_yticks(range(r), t.rows[:r] if len(t.rows) == r else range(r), fontsize=5)
    ax.set_xticks(range(c), t.cols[:c] if len(t.cols) == c else range(c), fontsize=5, rotation=90)
    if r * c <= 40:
        for y in range(r):
            for x in range(c):
                v = float(t.values[y, x])
                ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=4, color="w" if v < 0.6 else "k")
    what = f"{t.row_name} × {t.col_name}".strip(" ×")
    ax.set_xlabel(f"{what}, {category} mean" if t.per_category else what, fontsize=6)


def _blank(ax, text: str) -> None:  # noqa: ANN001
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=7, color="0.4")
