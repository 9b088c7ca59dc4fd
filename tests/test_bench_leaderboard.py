"""The leaderboard writer, from hand-written run folders (metrics.json, gallery npz, tiny PNG images)."""

from __future__ import annotations

import base64
import csv
import json
import re
import statistics
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsad.results.leaderboard import RANDOM_NOTE, write_leaderboard
from zsad.results.plots import read_gallery

KEYS = (
    "image_auroc",
    "image_ap",
    "image_f1max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1max",
    "pixel_aupro",
    "pixel_aupro_legacy",
)
PNG = b"\x89PNG\r\n\x1a\n"


def _dataset(cats: dict[str, dict[str, float | None]]) -> dict:
    """A dataset entry of metrics.json; the mean is over defined values, as the spec says."""
    mean, counts = {}, {}
    for k in KEYS:
        defined = [c[k] for c in cats.values() if c[k] is not None]
        mean[k] = statistics.fmean(defined) if defined else None
        counts[k] = len(defined)
    return {"categories": cats, "mean": mean, "n_categories_in_mean": counts, "n_images": 12 * len(cats)}


def _values(base: float, step: float, null: tuple[str, ...] = ()) -> dict[str, float | None]:
    return {k: (None if k in null else round(base + step * i, 4)) for i, k in enumerate(KEYS)}


def _write_run(
    root: Path, method: str, seed: int, datasets: dict, weights: str = "none", protocol: str = "synthetic"
) -> Path:
    run = root / f"{method}-{protocol}-s{seed}"
    run.mkdir(parents=True)
    doc = {
        "method": method,
        "protocol": protocol,
        "train_on": "textures",
        "seed": seed,
        "backbone": {"kind": "clip", "name": "tiny", "pretrained": weights, "image_size": 112},
        "datasets": {name: _dataset(cats) for name, cats in datasets.items()},
        "timing": {"train_s": 30.0 + seed, "test_s": 2.0, "images_per_s": 50.0 + 10 * seed, "device": "cpu"},
        "versions": {"zsad": "0.1.0", "torch": "2.x", "git": "abc1234"},
        "config": {
            "data": {"train": {"name": "textures", "root": ""}, "test": [{"name": "objects", "root": ""}]}
        },
    }
    (run / "metrics.json").write_text(json.dumps(doc))
    return run / "metrics.json"


def _write_gallery(
    run: Path, dataset: str, category: str, images: list[Path], extras: dict, specs: dict | None = None
) -> None:
    """A gallery in the Evaluator's layout: float16 maps, uint8 masks, extras as extra_<name> declared in
    extras_spec (JSON: name → kind, rows, cols), index."""
    n = len(images)
    masks = np.zeros((n, 16, 16), np.uint8)
    masks[0, 4:9, 6:11] = 1
    maps = (np.linspace(0, 0.3, n * 256).reshape(n, 16, 16) + masks * 0.7).astype(np.float16)
    out = run / "gallery" / dataset
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out / f"{category}.npz",
        paths=np.asarray([str(p) for p in images], dtype=str),
        maps=maps,
        masks=masks,
        labels=np.asarray([1] + [0] * (n - 1), np.uint8),
        scores=maps.reshape(n, -1).max(1).astype(np.float32),
        index=np.arange(n),
        **{f"extra_{k}": v for k, v in extras.items()},
        **({"extras_spec": np.asarray(json.dumps(specs))} if specs is not None else {}),
    )


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:03d}.png"
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def grid(tmp_path: Path) -> dict:
    """ava_dino with seeds 0 and 1, entroad with seed 0; entroad misses screw's pixel AUPRO (null)."""
    runs = tmp_path / "runs"
    ava = [
        {
            "objects": {"bottle": _values(0.90, -0.01), "screw": _values(0.70, 0.01)},
            "textures": {"wood": _values(0.6, 0.0)},
        },
        {
            "objects": {"bottle": _values(0.86, -0.01), "screw": _values(0.72, 0.01)},
            "textures": {"wood": _values(0.62, 0.0)},
        },
    ]
    ent = {
        "objects": {"bottle": _values(0.75, 0.02), "screw": _values(0.74, 0.02, null=("pixel_aupro",))},
        "textures": {"wood": _values(0.5, 0.0)},
    }
    files = [
        _write_run(runs, "ava_dino", 0, ava[0]),
        _write_run(runs, "ava_dino", 1, ava[1]),
        _write_run(runs, "entroad", 0, ent),
    ]
    imgs = {c: _images(tmp_path / "img" / c, 2) for c in ("bottle", "screw")}
    rng = np.random.default_rng(0)
    routing = np.stack([np.full((4, 2), [0.3, 0.7]), np.full((4, 2), [0.9, 0.1])])
    table = {
        "rows": ["6", "12", "18", "24"],
        "cols": ["normal", "anomalous"],
        "row_name": "tap",
        "col_name": "",
    }
    ent_specs = {
        "entropy_map": {"kind": "image_map", "rows": [], "cols": []},
        "gate": {"kind": "image_scalar", "rows": [], "cols": []},
        "routing_weights": {"kind": "image_array", "rows": [], "cols": []},
    }
    for c in ("bottle", "screw"):
        _write_gallery(
            files[0].parent,
            "objects",
            c,
            imgs[c],
            {"routing_weights": routing.astype(np.float16)},
            {"routing_weights": {"kind": "image_table", **table}},
        )
        ent_extras = {
            "entropy_map": rng.random((2, 4, 4)).astype(np.float16),
            "gate": np.array([0.8, 0.2]),
            "routing_weights": rng.random((2, 2, 16)).astype(np.float16),  # per patch: kept, not drawn
        }
        _write_gallery(files[2].parent, "objects", c, imgs[c], ent_extras, ent_specs)
    out = tmp_path / "results"
    written = write_leaderboard(files, out, "Test bench")
    return {"files": files, "out": out, "written": written, "ava": ava, "ent": ent}


def _table(md: str, caption: str) -> tuple[list[str], dict[str, list[str]]]:
    """Header and rows (first cell → cells) of the first markdown table after a bold caption."""
    lines = md.splitlines()
    start = lines.index(f"**{caption}**") + 2
    split = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("*")] = cells[1:]
    return split[1:], rows


def _num(cell: str) -> float:
    return float(re.sub(r"[*‡]", "", cell).split("±")[0])


def _fmt(values: list[float]) -> str:
    m = f"{100 * statistics.fmean(values):.1f}"
    return m if len(values) == 1 else f"{m} ± {100 * statistics.stdev(values):.1f}"


def test_main_table_equals_metrics_json(grid: dict) -> None:
    md = grid["written"]["md"].read_text()
    header, rows = _table(md, "Protocol synthetic — main metrics")
    assert set(rows) == {"ava_dino", "entroad"}
    assert rows["ava_dino"][0] == "0, 1" and rows["entroad"][0] == "0"
    for col, name in enumerate(header[1:], start=1):
        if " · " not in name or name.startswith("cost"):
            continue
        dataset, short = name.split(" · ")
        key = {
            "I-AUROC": "image_auroc",
            "I-AP": "image_ap",
            "P-AUROC": "pixel_auroc",
            "P-AUPRO": "pixel_aupro",
        }[short]
        ava = [_dataset(run[dataset])["mean"][key] for run in grid["ava"]]
        ent = _dataset(grid["ent"][dataset])["mean"][key]
        assert rows["ava_dino"][col].strip("*") == _fmt(ava), (name, rows["ava_dino"][col])
        assert rows["entroad"][col].strip("*") == _fmt([ent]), (name, rows["entroad"][col])


def test_bold_marks_the_best_and_partial_means_are_marked(grid: dict) -> None:
    md = grid["written"]["md"].read_text()
    header, rows = _table(md, "Protocol synthetic — main metrics")
    for col, name in enumerate(header[1:], start=1):
        if name.startswith("cost"):
            continue
        cells = {m: r[col] for m, r in rows.items()}
        # entroad's object P-AUPRO is a mean over 1 of 2 categories: marked, and not compared with full means,
        # so no cell of that column is "best" (it is higher than ava_dino's, over fewer categories)
        if name == "objects · P-AUPRO":
            assert cells["entroad"].endswith("*") and _num(cells["entroad"]) > _num(cells["ava_dino"])
            assert not any(c.startswith("**") for c in cells.values())
            continue
        best = max(cells, key=lambda m: _num(cells[m]))
        for m, c in cells.items():
            assert c.startswith("**") == (m == best), (name, cells)
    assert "mean over 1 of 2 categories" in md


def test_null_shows_dash_and_is_excluded_from_the_mean(grid: dict) -> None:
    md = grid["written"]["md"].read_text()
    _, rows = _table(md, "objects — P-AUPRO per category")
    header_methods = ["ava_dino", "entroad"]
    ent_col = header_methods.index("entroad")
    assert rows["screw"][ent_col] == "–"
    bottle = grid["ent"]["objects"]["bottle"]["pixel_aupro"]
    assert _num(rows["mean"][ent_col]) == pytest.approx(round(100 * bottle, 1))
    with grid["written"]["csv"].open() as f:
        csv_rows = list(csv.DictReader(f))
    screw = [r for r in csv_rows if r["method"] == "entroad" and r["category"] == "screw"]
    assert len(screw) == 1 and screw[0]["pixel_aupro"] == ""


def test_csv_equals_metrics_json(grid: dict) -> None:
    with grid["written"]["csv"].open() as f:
        rows = list(csv.DictReader(f))
    expected = 0
    for path in grid["files"]:
        doc = json.loads(path.read_text())
        for d, ds in doc["datasets"].items():
            for cat, values in [*ds["categories"].items(), ("mean", ds["mean"])]:
                expected += 1
                match = [
                    r
                    for r in rows
                    if r["method"] == doc["method"]
                    and r["seed"] == str(doc["seed"])
                    and r["dataset"] == d
                    and r["category"] == cat
                ]
                assert len(match) == 1
                row = match[0]
                for k in KEYS:
                    assert (None if row[k] == "" else float(row[k])) == values[k], (d, cat, k)
                assert row["protocol"] == "synthetic" and row["weights"] == "none" and row["device"] == "cpu"
                assert float(row["images_per_s"]) == doc["timing"]["images_per_s"]
                assert Path(row["run_dir"]) == path.parent
    assert len(rows) == expected


def test_per_category_mean_over_seeds(grid: dict) -> None:
    md = grid["written"]["md"].read_text()
    _, rows = _table(md, "objects — I-AUROC per category")
    ava_bottle = [run["objects"]["bottle"]["image_auroc"] for run in grid["ava"]]
    assert rows["bottle"][0] == f"**{_fmt(ava_bottle)}**"  # 0.90/0.86 beat entroad's 0.75


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.images: list[str] = []
        self.best = 0
        self.title = ""
        self._in_h1 = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "img":
            self.images.append(a["src"])
        if tag == "td" and a.get("class") == "best":
            self.best += 1
        self._in_h1 = tag == "h1" or self._in_h1

    def handle_endtag(self, tag: str) -> None:
        if tag == "h1":
            self._in_h1 = False

    def handle_data(self, data: str) -> None:
        if self._in_h1:
            self.title += data


def test_html_is_self_contained_and_holds_the_tables(grid: dict) -> None:
    page = grid["written"]["html"].read_text()
    md = grid["written"]["md"].read_text()
    p = _Collector()
    p.feed(page)
    assert p.tags["table"] == md.count("\n|:---|")
    assert p.best == len(re.findall(r"\| \*\*[0-9]", md))
    plots = [k for k in grid["written"] if k.startswith(("bars_", "gallery_"))]
    assert len(p.images) == len(plots) > 0
    for src in p.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    assert "RANDOM WEIGHTS" in p.title
    assert "<link" not in page and 'src="http' not in page


def test_plots_are_valid_pngs(grid: dict) -> None:
    w = grid["written"]
    assert {"bars_synthetic_objects", "bars_synthetic_textures", "gallery_synthetic_objects"} <= set(w)
    assert "gallery_synthetic_textures" not in w  # no run saved a textures gallery
    for key in ("bars_synthetic_objects", "gallery_synthetic_objects"):
        assert w[key].read_bytes()[:8] == PNG
        with Image.open(w[key]) as im:
            assert im.width > 400 and im.height > 200
    md = w["md"].read_text()
    assert "![gallery_synthetic_objects](plots/gallery_synthetic_objects.png)" in md


def test_gallery_reader_understands_the_evaluator_layout(grid: dict) -> None:
    ava = read_gallery(grid["files"][0].parent, "objects")
    ent = read_gallery(grid["files"][2].parent, "objects")
    first = next(iter(ava.values()))
    routing = first.tables["routing_weights"]  # declared image_table: this image's taps × adapters
    assert routing.rows == ["6", "12", "18", "24"] and routing.cols == ["normal", "anomalous"]
    np.testing.assert_allclose(routing.values, np.full((4, 2), [0.3, 0.7]), atol=1e-3)
    assert not routing.per_category and first.scalars == {} and first.extra_maps == {}
    assert first.mask is not None and first.mask.dtype == bool and first.mask.sum() == 25
    e = next(iter(ent.values()))
    assert set(e.extra_maps) == {"entropy_map"} and e.extra_maps["entropy_map"].shape == (4, 4)
    assert e.scalars == {"gate": pytest.approx(0.8)} and e.tables == {}  # the image_array is not drawn


def test_gallery_without_declaration_leaves_extras_out(tmp_path: Path, caplog) -> None:
    """No guessing from shapes: an undeclared gallery file shows maps and scores, and says why no extras."""
    imgs = _images(tmp_path / "img", 2)
    _write_gallery(
        tmp_path / "run", "objects", "bottle", imgs, {"entropy_map": np.zeros((2, 4, 4)), "g": np.ones(2)}
    )
    with caplog.at_level("WARNING", logger="zsad.results"):
        items = read_gallery(tmp_path / "run", "objects")
    assert len(items) == 2 and all(not it.extra_maps and not it.scalars for it in items.values())
    assert "no extras_spec" in caplog.text


def test_title_warns_only_with_random_weights(tmp_path: Path) -> None:
    cats = {"objects": {"bottle": _values(0.8, 0.0)}}
    real = [_write_run(tmp_path / "a", "ava_dino", 0, cats, weights="lvd1689m")]
    w = write_leaderboard(real, tmp_path / "out_a", "Real", plots=False)
    assert RANDOM_NOTE not in w["md"].read_text().splitlines()[0]
    mixed = real + [_write_run(tmp_path / "a", "entroad", 0, cats, weights="none")]
    w = write_leaderboard(mixed, tmp_path / "out_b", "Mixed", plots=False)
    # some rows random (a control row): the title names them instead of discarding every number
    assert w["md"].read_text().splitlines()[0] == "# Mixed — random-weight control rows: entroad"
    only_random = [_write_run(tmp_path / "c", "entroad", 0, cats, weights="none")]
    w = write_leaderboard(only_random, tmp_path / "out_c", "Random", plots=False)
    assert w["md"].read_text().splitlines()[0] == f"# Random — {RANDOM_NOTE}"


def test_bad_inputs_are_refused_with_the_file_named(tmp_path: Path) -> None:
    cats = {"objects": {"bottle": _values(0.8, 0.0)}}
    a = _write_run(tmp_path / "a", "ava_dino", 0, cats)
    b = _write_run(tmp_path / "b", "ava_dino", 0, cats)
    with pytest.raises(ValueError, match="two results for ava_dino"):
        write_leaderboard([a, b], tmp_path / "out", "dup", plots=False)
    doc = json.loads(b.read_text())
    doc["datasets"]["objects"]["categories"]["bottle"]["image_auroc"] = 87.5  # a percentage, not a fraction
    b.write_text(json.dumps(doc))
    with pytest.raises(
        ValueError, match=r"b/ava_dino-synthetic-s0/metrics.json: datasets.objects.bottle.image_auroc"
    ):
        write_leaderboard([b], tmp_path / "out", "bad", plots=False)


def test_labels_and_failures(tmp_path: Path) -> None:
    cats = {"objects": {"bottle": _values(0.8, 0.0)}}
    a = _write_run(tmp_path / "a", "mpama", 0, cats)
    b = _write_run(tmp_path / "b", "mpama", 0, {"objects": {"bottle": _values(0.7, 0.0)}})
    fail = {
        "label": "entroad",
        "protocol": "synthetic",
        "seed": 0,
        "error": "RuntimeError: boom",
        "run_dir": "x",
    }
    w = write_leaderboard(
        [a, b], tmp_path / "out", "abl", labels={b: "mpama_top1"}, failures=[fail], plots=False
    )
    md = w["md"].read_text()
    _, rows = _table(md, "Protocol synthetic — main metrics")
    assert set(rows) == {"mpama", "mpama_top1"}
    assert rows["mpama_top1"][1] == "70.0" and rows["mpama"][1] == "**80.0**"
    assert "## Failed runs" in md and "RuntimeError: boom" in md


def test_protocol_halves_share_one_table(tmp_path: Path) -> None:
    """A (MVTec → others) and A_mvtec (VisA → MVTec) fill one "Protocol A" table; train s adds both up."""
    files = [
        _write_run(tmp_path, "ava_dino", 0, {"visa": {"candle": _values(0.8, 0.0)}}, protocol="A"),
        _write_run(tmp_path, "ava_dino", 0, {"mvtec": {"bottle": _values(0.9, 0.0)}}, protocol="A_mvtec"),
    ]
    md = write_leaderboard(files, tmp_path / "out", "halves", plots=False)["md"].read_text()
    header, rows = _table(md, "Protocol A — main metrics")
    assert "## Protocol A_mvtec" not in md and "Merged from protocols A, A_mvtec" in md
    assert header[1] == "visa · I-AUROC" and header[5] == "mvtec · I-AUROC"
    assert rows["ava_dino"][1] == "80.0" and rows["ava_dino"][5] == "90.0"
    assert rows["ava_dino"][header.index("cost · train s")] == "60.0"  # 30 s + 30 s, one seed

    # two protocols of a family that test on the same dataset are not merged: their numbers differ in kind
    clash = [
        _write_run(
            tmp_path / "c", "ava_dino", 0, {"objects": {"pill": _values(0.6, 0.0)}}, protocol="synthetic"
        ),
        _write_run(
            tmp_path / "c", "ava_dino", 0, {"objects": {"pill": _values(0.7, 0.0)}}, protocol="synthetic_x"
        ),
    ]
    md = write_leaderboard(clash, tmp_path / "out_c", "clash", plots=False)["md"].read_text()
    assert "## Protocol synthetic\n" in md and "## Protocol synthetic_x\n" in md
