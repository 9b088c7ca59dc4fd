"""VisA from its official split file ``split_csv/1cls.csv`` (rows ``object,split,label,image,mask``).

Paths in the file are relative to the dataset root. VisA masks hold small non-zero integers, not 255; the mask
loader treats any value > 0 as foreground.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from data_modules.errors import DataError
from data_modules.readers._common import ReadReport, clean_class_name, require_dir, select_categories
from data_modules.types import Sample

SPLIT_FILE = Path("split_csv") / "1cls.csv"
_COLUMNS = ("object", "split", "label", "image", "mask")


def _rows(csv_path: Path) -> list[dict[str, str]]:
    if not csv_path.is_file():
        raise DataError(
            f"VisA split file {csv_path} not found; expected <root>/{SPLIT_FILE} (object,split,label,image,mask)"
        )
    with csv_path.open(newline="", encoding="utf-8-sig") as f:  # a BOM would hide the first column
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in _COLUMNS if c not in header]
        if missing:
            raise DataError(f"{csv_path}: missing columns {missing}; expected header {','.join(_COLUMNS)}")
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def _sample(row: dict[str, str], root: Path, csv_path: Path, line: int) -> Sample:
    label = row["label"].lower()
    if label not in ("normal", "anomaly"):
        raise DataError(f"{csv_path} line {line}: label {row['label']!r}, expected 'normal' or 'anomaly'")
    image = root / row["image"]
    if not image.is_file():
        raise DataError(f"{csv_path} line {line}: image {image} does not exist")
    mask = None
    if label == "anomaly":
        if not row["mask"]:
            raise DataError(
                f"{csv_path} line {line}: anomalous image {image} has no mask path in the mask column"
            )
        mask = root / row["mask"]
        if not mask.is_file():
            raise DataError(
                f"anomalous image {image} has no ground-truth mask; expected {mask} ({csv_path} line {line})"
            )
    cat = row["object"]
    return Sample(
        dataset="visa",
        category=cat,
        image_path=image.resolve(),
        mask_path=None if mask is None else mask.resolve(),
        label=int(label == "anomaly"),
        defect_type="good" if label == "normal" else "anomaly",
        class_name=clean_class_name(cat) or cat,
    )


def read_visa(root: str | Path, categories: Sequence[str] | None, report: ReadReport) -> list[Sample]:
    """Read VisA's test split (1-class protocol); categories in natural order unless given."""
    root = require_dir(Path(root).expanduser(), f"the VisA root holding {SPLIT_FILE} and <object>/Data/…")
    csv_path = root / SPLIT_FILE
    rows = [(i + 2, r) for i, r in enumerate(_rows(csv_path)) if r["split"].lower() == "test"]
    found = list(dict.fromkeys(r["object"] for _, r in rows))
    cats = select_categories(found, categories, csv_path)
    by_cat: dict[str, list[Sample]] = {c: [] for c in cats}
    for line, row in rows:
        if row["object"] in by_cat:
            by_cat[row["object"]].append(_sample(row, root, csv_path, line))
    return [s for c in cats for s in by_cat[c]]
