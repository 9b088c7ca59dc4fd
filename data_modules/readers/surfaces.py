"""Surface-inspection sets: KolektorSDD2, KolektorSDD (SDD) and DAGM 2007.

KSDD2 and SDD ship a mask for every image, normal ones included, so their image label comes from the mask content
(any foreground pixel = anomalous). DAGM marks anomalous images by the presence of a ``Label/<name>_label.PNG`` file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from data_modules.errors import DataError
from data_modules.imageio import load_mask
from data_modules.readers._common import (
    ReadReport,
    descend,
    find_by_stem,
    index_by_stem,
    list_images,
    listing,
    require_dir,
    require_nonempty,
    select_categories,
    subdirs,
)
from data_modules.types import Sample

_KOS = re.compile(r"kos\d+", re.IGNORECASE)
_DAGM_CLASS = re.compile(r"class\d+", re.IGNORECASE)
_DAGM_DEF = re.compile(r"class\d+_def", re.IGNORECASE)

SURFACE_NAMES = {"ksdd2": "metal surface", "sdd": "metal surface", "dagm": "textured surface"}


def _paired_by_mask_content(
    dataset: str, category: str, pairs: Sequence[tuple[Path, Path]], class_name: str
) -> list[Sample]:
    out = []
    for img, mask in pairs:
        anomalous = bool(load_mask(mask).any())
        out.append(
            Sample(
                dataset=dataset,
                category=category,
                image_path=img.resolve(),
                mask_path=mask.resolve() if anomalous else None,
                label=int(anomalous),
                defect_type="defect" if anomalous else "good",
                class_name=class_name,
            )
        )
    return out


def _split_images_masks(files: Sequence[Path], mask_suffix: str) -> tuple[list[Path], dict[str, Path]]:
    """Separate ``<name>`` images from ``<name><mask_suffix>`` masks living in the same folder."""
    low = mask_suffix.lower()
    masks = [p for p in files if p.stem.lower().endswith(low)]
    images = [p for p in files if not p.stem.lower().endswith(low)]
    return images, index_by_stem(masks)


def _pair(images: Sequence[Path], masks: dict[str, Path], suffix: str) -> list[tuple[Path, Path]]:
    pairs = []
    for img in images:
        mask = find_by_stem(masks, [img.stem + suffix])
        if mask is None:
            raise DataError(
                f"image {img} has no ground-truth file; expected {img.with_name(img.stem + suffix + '.png')} "
                "(this dataset ships one for every image, normal ones included)"
            )
        pairs.append((img, mask))
    return pairs


def read_ksdd2(root: str | Path, categories: Sequence[str] | None, report: ReadReport) -> list[Sample]:
    """KolektorSDD2: ``<root>/test/NNNNN.png`` + ``NNNNN_GT.png``; one category ``ksdd2``."""
    layout = "KolektorSDD2 layout <root>/test/NNNNN.png with NNNNN_GT.png beside each image"
    root = require_dir(Path(root).expanduser(), layout)
    base = descend(root, lambda d: (d / "test").is_dir(), report)
    if base is None:
        raise DataError(f"no 'test' folder in {root} or one level below; expected {layout}; {listing(root)}")
    test = base / "test"  # train/ is never read
    select_categories(["ksdd2"], categories, root)
    images, masks = _split_images_masks(list_images(test, report), "_GT")
    samples = _paired_by_mask_content("ksdd2", "ksdd2", _pair(images, masks, "_GT"), SURFACE_NAMES["ksdd2"])
    require_nonempty(samples, "ksdd2", test)
    return samples


def _kos_folders(d: Path) -> list[Path]:
    return [k for k in subdirs(d, ReadReport()) if _KOS.fullmatch(k.name)]


def read_sdd(root: str | Path, categories: Sequence[str] | None, report: ReadReport) -> list[Sample]:
    """KolektorSDD: ``<root>/kos*/Part*.jpg`` + ``Part*_label.bmp``; one category ``sdd``."""
    root = require_dir(
        Path(root).expanduser(), "KolektorSDD layout <root>/kos*/Part*.jpg with Part*_label.bmp"
    )
    select_categories(["sdd"], categories, root)
    base = descend(root, lambda d: bool(_kos_folders(d)), report)
    if base is None:
        raise DataError(
            f"no kos* folder in {root} or one level below; expected KolektorSDD layout "
            f"<root>/kos*/Part*.jpg + Part*_label.bmp; {listing(root)}"
        )
    folders = _kos_folders(base)
    pairs = []
    for d in folders:
        images, masks = _split_images_masks(list_images(d, report), "_label")
        pairs += _pair(images, masks, "_label")
    samples = _paired_by_mask_content("sdd", "sdd", pairs, SURFACE_NAMES["sdd"])
    require_nonempty(samples, "sdd", root)
    return samples


def _dagm_classes(d: Path) -> list[Path]:
    return [c for c in subdirs(d, ReadReport()) if _DAGM_CLASS.fullmatch(c.name)]


def _child_dir(d: Path, name: str) -> Path | None:
    """The sub-folder of ``d`` called ``name`` in any letter case (``Train``/``train``)."""
    hits = [c for c in subdirs(d, ReadReport()) if c.name.lower() == name]
    return hits[0] if hits else None


def _dagm_class_dir(d: Path) -> Path:
    # Some copies unpack as ClassN/ClassN/{Train,Test}.
    nested = _child_dir(d, d.name.lower())
    return nested if nested is not None and _child_dir(d, "test") is None else d


def read_dagm(root: str | Path, categories: Sequence[str] | None, report: ReadReport) -> list[Sample]:
    """DAGM 2007: ``ClassN/{Train,Test}/NNNN.PNG``, masks ``ClassN/{Train,Test}/Label/NNNN_label.PNG``.

    Both splits are read (no method trains on DAGM), Train first; an image is anomalous iff it has a label file.
    """
    layout = "DAGM layout <root>/ClassN/{Train,Test}/NNNN.PNG with masks <root>/ClassN/{Train,Test}/Label/NNNN_label.PNG"
    root = require_dir(Path(root).expanduser(), layout)
    base = descend(root, lambda d: bool(_dagm_classes(d)), report)
    if base is None:
        raise DataError(f"no ClassN folder in {root} or one level below; expected {layout}; {listing(root)}")
    found = {d.name: _dagm_class_dir(d) for d in _dagm_classes(base)}
    extra = [d.name for d in subdirs(base, ReadReport()) if _DAGM_DEF.fullmatch(d.name)]
    if extra:
        # ClassN_def (older releases) repeat ClassN's defective images: reading them would count them twice.
        report.notes.append(f"not read (duplicates of ClassN's defective images): {', '.join(extra)}")
    samples: list[Sample] = []
    for cat in select_categories(list(found), categories, root):
        cat_samples: list[Sample] = []
        splits = [d for name in ("train", "test") if (d := _child_dir(found[cat], name)) is not None]
        if not splits:
            raise DataError(
                f"{found[cat]} has no Train/ or Test/ folder; expected {layout} (the older development release "
                f"with ellipse labels is not supported); {listing(found[cat])}"
            )
        for split_dir in splits:
            # Label/ also holds Labels.txt (a per-image table); the label images alone decide the labels.
            label_dir = _child_dir(split_dir, "label")
            masks = index_by_stem(list_images(label_dir, report)) if label_dir is not None else {}
            for img in list_images(split_dir, report):
                mask = find_by_stem(masks, [img.stem + "_label"])
                cat_samples.append(
                    Sample(
                        dataset="dagm",
                        category=cat,
                        image_path=img.resolve(),
                        mask_path=None if mask is None else mask.resolve(),
                        label=int(mask is not None),
                        defect_type="good" if mask is None else "defect",
                        class_name=SURFACE_NAMES["dagm"],
                    )
                )
        require_nonempty(cat_samples, cat, found[cat])
        samples += cat_samples
    return samples
