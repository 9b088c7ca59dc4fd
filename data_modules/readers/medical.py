"""Medical sets, each a single category with a configured prompt name.

Image-only (no masks): HeadCT, BrainMRI, Br35H. Pixel-only (every image anomalous, one mask each): ISIC 2016,
CVC-ColonDB, CVC-ClinicDB, Kvasir-SEG, Endo, TN3K.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from data_modules.errors import DataError
from data_modules.readers._common import (
    ReadReport,
    find_by_stem,
    index_by_stem,
    list_images,
    missing_mask_error,
    require_dir,
    require_nonempty,
    select_categories,
)
from data_modules.types import Sample

MEDICAL_NAMES = {
    "headct": "brain",
    "brainmri": "brain",
    "br35h": "brain",
    "isic": "skin lesion",
    "colondb": "colon polyp",
    "clinicdb": "colon polyp",
    "kvasir": "colon polyp",
    "endo": "colon polyp",
    "tn3k": "thyroid nodule",
}


def _sample(dataset: str, img: Path, label: int, mask: Path | None, defect: str) -> Sample:
    return Sample(
        dataset=dataset,
        category=dataset,
        image_path=img.resolve(),
        mask_path=None if mask is None else mask.resolve(),
        label=label,
        defect_type=defect if label else "good",
        class_name=MEDICAL_NAMES[dataset],
    )


def _headct_labels(csv_path: Path) -> dict[int, int]:
    if not csv_path.is_file():
        raise DataError(
            f"HeadCT label file {csv_path} not found; expected <root>/labels.csv with columns id, hemorrhage"
        )
    with csv_path.open(newline="") as f:
        rows = list(csv.reader(f))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "id" not in header or "hemorrhage" not in header:
        raise DataError(f"{csv_path}: header {header}, expected columns 'id' and 'hemorrhage'")
    i_id, i_lab = header.index("id"), header.index("hemorrhage")
    try:
        return {int(r[i_id]): int(r[i_lab]) for r in rows[1:] if r}
    except (ValueError, IndexError) as exc:
        raise DataError(f"{csv_path}: malformed row ({exc}); expected integer id and 0/1 hemorrhage") from exc


def read_headct(root: str | Path, categories: Sequence[str] | None, report: ReadReport) -> list[Sample]:
    """HeadCT: ``<root>/head_ct/NNN.png`` + ``<root>/labels.csv`` (``id, hemorrhage``); image labels only."""
    root = Path(root).expanduser()
    img_dir = require_dir(root / "head_ct", "HeadCT layout <root>/head_ct/NNN.png with <root>/labels.csv")
    if (img_dir / "head_ct").is_dir():  # the Kaggle archive nests the folder
        img_dir = img_dir / "head_ct"
    select_categories(["headct"], categories, root)
    labels = _headct_labels(root / "labels.csv")
    samples = []
    for img in list_images(img_dir, report):
        key = int(img.stem) if img.stem.isdigit() else None
        if key not in labels:
            raise DataError(f"image {img} has no row in {root / 'labels.csv'} (expected id {img.stem})")
        samples.append(_sample("headct", img, labels[key], None, "hemorrhage"))
    require_nonempty(samples, "headct", img_dir)
    return samples


def _read_no_yes(
    dataset: str, root: str | Path, categories: Sequence[str] | None, report: ReadReport
) -> list[Sample]:
    root = Path(root).expanduser()
    layout = f"{dataset} layout <root>/no/* (normal) and <root>/yes/* (tumour)"
    require_dir(root, layout)
    select_categories([dataset], categories, root)
    samples = []
    for sub, label in (("no", 0), ("yes", 1)):
        folder = require_dir(root / sub, layout)
        samples += [_sample(dataset, p, label, None, "tumor") for p in list_images(folder, report)]
    require_nonempty(samples, dataset, root)
    return samples


def read_brainmri(root: str | Path, categories: Sequence[str] | None, report: ReadReport) -> list[Sample]:
    """BrainMRI: ``<root>/{no,yes}/*``; image labels only."""
    return _read_no_yes("brainmri", root, categories, report)


def read_br35h(root: str | Path, categories: Sequence[str] | None, report: ReadReport) -> list[Sample]:
    """Br35H: ``<root>/{no,yes}/*`` (the unlabelled ``pred`` folder is not read); image labels only."""
    return _read_no_yes("br35h", root, categories, report)


@dataclass(frozen=True)
class _SegLayout:
    images: str
    masks: str
    mask_suffix: str = ""


_SEG_LAYOUTS = {
    "colondb": _SegLayout("images", "masks"),
    "clinicdb": _SegLayout("images", "masks"),
    "kvasir": _SegLayout("images", "masks"),
    "endo": _SegLayout("images", "masks"),
    "tn3k": _SegLayout("test-image", "test-mask"),
}


def _read_segmentation(
    dataset: str, root: str | Path, categories: Sequence[str] | None, report: ReadReport
) -> list[Sample]:
    lay = _SEG_LAYOUTS[dataset]
    root = Path(root).expanduser()
    layout = (
        f"{dataset} layout <root>/{lay.images}/<name> with masks <root>/{lay.masks}/<name> (same file names)"
    )
    img_dir = require_dir(root / lay.images, layout)
    mask_dir = require_dir(root / lay.masks, layout)
    select_categories([dataset], categories, root)
    masks = index_by_stem(list_images(mask_dir, report))
    samples = []
    for img in list_images(img_dir, report):
        mask = find_by_stem(masks, [img.stem + lay.mask_suffix])
        if mask is None:
            raise missing_mask_error(img, [mask_dir / img.name])
        samples.append(_sample(dataset, img, 1, mask, "lesion"))
    require_nonempty(samples, dataset, img_dir)
    return samples


def read_isic(root: str | Path, categories: Sequence[str] | None, report: ReadReport) -> list[Sample]:
    """ISIC 2016 part 1 test: images and ``<name>_Segmentation.png`` masks anywhere under the root (searched
    recursively, so both the official two-folder layout and a single folder work)."""
    root = require_dir(
        Path(root).expanduser(),
        "ISIC layout: ISIC_NNNNNNN.jpg images with ISIC_NNNNNNN_Segmentation.png masks",
    )
    select_categories(["isic"], categories, root)
    files = list_images(root, report, recursive=True)
    masks = index_by_stem(p for p in files if p.stem.lower().endswith("_segmentation"))
    samples = []
    for img in (p for p in files if not p.stem.lower().endswith("_segmentation")):
        mask = find_by_stem(masks, [img.stem + "_Segmentation"])
        if mask is None:
            raise missing_mask_error(img, [img.with_name(img.stem + "_Segmentation.png")])
        samples.append(_sample("isic", img, 1, mask, "lesion"))
    require_nonempty(samples, "isic", root)
    return samples


def segmentation_reader(dataset: str) -> Callable[[Path, Sequence[str] | None, ReadReport], list[Sample]]:
    """A reader for one of the ``images/`` + ``masks/`` sets (CVC-ColonDB, CVC-ClinicDB, Kvasir, Endo, TN3K)."""

    def read(root: str | Path, categories: Sequence[str] | None, report: ReadReport) -> list[Sample]:
        return _read_segmentation(dataset, root, categories, report)

    read.__doc__ = (
        f"{dataset}: {_SEG_LAYOUTS[dataset].images}/ + {_SEG_LAYOUTS[dataset].masks}/; all anomalous."
    )
    return read
