"""The generic ``meta.json`` format of AnomalyCLIP/AdaCLIP: split → category → items.

Items are ``{"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}`` with paths relative to the folder that
holds ``meta.json``; ``anomaly == 0`` means an all-zero mask. Only the ``test`` split is read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_modules.errors import DataError
from data_modules.readers._common import ReadReport, clean_class_name, select_categories
from data_modules.types import Sample

_KEYS = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")


def meta_file(root: str | Path) -> Path:
    """The meta file: ``root`` itself when it is a file, else ``root/meta.json``."""
    root = Path(root).expanduser()
    path = root if root.is_file() else root / "meta.json"
    if not path.is_file():
        raise DataError(
            f"{path} not found; expected a meta.json file (split → category → items) or a folder holding one"
        )
    return path


def _load(path: Path) -> dict[str, Any]:
    """The ``test`` split of the file: category → items."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    # AnomalyCLIP's DAGM script writes "Test"/"Train": the split key is matched in any letter case.
    tests = [v for k, v in data.items() if k.lower() == "test"] if isinstance(data, dict) else []
    if len(tests) != 1 or not isinstance(tests[0], dict):
        keys = list(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(
            f"{path}: expected an object with one 'test' key mapping category → list of items; found {keys}"
        )
    return tests[0]


def _item(item: Any, cat: str, pos: int, base: Path, path: Path) -> Sample:
    where = f"{path} test/{cat}[{pos}]"
    if not isinstance(item, dict) or any(k not in item for k in _KEYS):
        raise DataError(f"{where}: expected an object with keys {list(_KEYS)}, got {item!r}")
    if item["anomaly"] not in (0, 1):
        raise DataError(f"{where}: 'anomaly' is {item['anomaly']!r}, expected 0 or 1")
    image = base / item["img_path"]
    if not image.is_file():
        raise DataError(f"{where}: image {image} does not exist")
    mask = None
    if item["anomaly"] == 1 and item["mask_path"]:
        mask = base / item["mask_path"]
        if not mask.is_file():
            raise DataError(f"anomalous image {image} has no ground-truth mask; expected {mask} ({where})")
    # "class_name" is our own optional key (write_meta adds it): the prompt name survives a round trip.
    cls = str(item.get("class_name") or item["cls_name"] or cat)
    return Sample(
        dataset="meta",
        category=cat,
        image_path=image.resolve(),
        mask_path=None if mask is None else mask.resolve(),
        label=int(item["anomaly"]),
        defect_type="good" if item["anomaly"] == 0 else str(item["specie_name"] or "anomaly"),
        class_name=clean_class_name(cls) or cls,
    )


def read_meta(root: str | Path, categories: Sequence[str] | None, report: ReadReport) -> list[Sample]:
    """Read the test split of a ``meta.json``; categories in file order unless given."""
    path = meta_file(root)
    test = _load(path)
    cats = select_categories(list(test), categories, path) if categories else list(test)
    if not cats:
        raise DataError(f"{path}: the 'test' split has no categories")
    samples: list[Sample] = []
    for cat in cats:
        items = test[cat]
        if not isinstance(items, list) or not items:
            raise DataError(f"category {cat!r} has no test images in {path}")
        samples += [_item(it, cat, i, path.parent, path) for i, it in enumerate(items)]
    anomalous = [s for s in samples if s.label == 1]
    with_mask = [s for s in anomalous if s.mask_path is not None]
    if with_mask and len(with_mask) != len(anomalous):
        lacking = next(s for s in anomalous if s.mask_path is None)
        raise DataError(
            f"anomalous image {lacking.image_path} has an empty mask_path in {path} while other anomalous images have "
            "masks; give every anomalous image a mask (or none, for an image-only dataset)"
        )
    if anomalous and not with_mask:
        report.notes.append("no mask paths: image-level labels only")
    return samples
