"""Write samples in the ``meta.json`` interchange format (AnomalyCLIP/AdaCLIP)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from data_modules.types import Sample


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def write_meta(samples: Sequence[Sample], root: str | Path, path: str | Path | None = None) -> Path:
    """Write ``samples`` as a ``meta.json`` and return its path.

    ``cls_name`` is the category (as AnomalyCLIP's files have it); the cleaned prompt name goes to an extra
    ``class_name`` key that other tools ignore and our reader prefers.

    Args:
        samples: test samples (any dataset), grouped by category in the order given.
        root: folder that the paths are made relative to; the file goes to ``root/meta.json`` unless ``path`` is set.
        path: optional explicit file; then paths are relative to its folder, as the format requires.
    """
    out = Path(path) if path is not None else Path(root) / "meta.json"
    base = out.parent
    test: dict[str, list[dict[str, object]]] = {}
    for s in samples:
        test.setdefault(s.category, []).append(
            {
                "img_path": _rel(s.image_path, base),
                "mask_path": "" if s.mask_path is None else _rel(s.mask_path, base),
                "cls_name": s.category,
                "specie_name": s.defect_type,
                "anomaly": int(s.label),
                "class_name": s.class_name,
            }
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"test": test, "train": {c: [] for c in test}}, indent=1))
    return out
