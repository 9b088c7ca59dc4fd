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
    descend,
    find_by_stem,
    index_by_stem,
    list_images,
    listing,
    missing_mask_error,
    require_dir,
    require_nonempty,
    select_categories,
    subdirs,
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


def _headct_image_dir(root: Path, report: ReadReport) -> Path:
    """``<root>/head_ct``, or ``<root>/head_ct/head_ct`` as the Kaggle archive nests it."""
    layout = "HeadCT layout <root>/head_ct/NNN.png (or head_ct/head_ct/NNN.png) with <root>/labels.csv"
    img_dir = root / "head_ct"
    if not img_dir.is_dir():
        raise DataError(f"{img_dir} does not exist; expected {layout}; {listing(root)}")
    if (img_dir / "head_ct").is_dir():
        img_dir = img_dir / "head_ct"
        report.notes.append(f"images read from the nested folder {img_dir}")
    return img_dir


def read_headct(root: str | Path, categories: Sequence[str] | None, report: ReadReport) -> list[Sample]:
    """HeadCT: ``<root>/head_ct/NNN.png`` (or ``head_ct/head_ct``) + ``<root>/labels.csv`` (``id, hemorrhage``).

    Image labels only; ids in the file are integers (``0``) while files are zero-padded (``000.png``).
    """
    root = require_dir(Path(root).expanduser(), "HeadCT layout <root>/head_ct/NNN.png with <root>/labels.csv")
    img_dir = _headct_image_dir(root, report)
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


def _has_no_yes(d: Path) -> bool:
    return (d / "no").is_dir() and (d / "yes").is_dir()


def _read_no_yes(
    dataset: str, root: str | Path, categories: Sequence[str] | None, report: ReadReport
) -> list[Sample]:
    """``<root>/{no,yes}/*``, or one folder down (Kaggle's ``brain_tumor_dataset/{no,yes}``).

    The BrainMRI archive holds the same images twice (top level and ``brain_tumor_dataset/``): the top level is read
    and the copy is noted, never added. Other folders (Br35H's unlabelled ``pred/``) are not read, with a note.
    """
    layout = f"{dataset} layout <root>/no/* (normal) and <root>/yes/* (tumour)"
    root = require_dir(Path(root).expanduser(), layout)
    base = descend(root, _has_no_yes, report)
    if base is None:
        raise DataError(
            f"no 'no/' and 'yes/' folders in {root} or one level below; expected {layout}; {listing(root)}"
        )
    select_categories([dataset], categories, root)
    samples = []
    for sub, label in (("no", 0), ("yes", 1)):
        samples += [_sample(dataset, p, label, None, "tumor") for p in list_images(base / sub, report)]
    skipped = [d.name for d in subdirs(base, ReadReport()) if d.name not in ("no", "yes")]
    if skipped:
        report.notes.append(f"not read (no label): {', '.join(d + '/' for d in skipped)} in {base}")
    require_nonempty(samples, dataset, base)
    return samples


def read_brainmri(root: str | Path, categories: Sequence[str] | None, report: ReadReport) -> list[Sample]:
    """BrainMRI: ``<root>/{no,yes}/*`` or ``<root>/brain_tumor_dataset/{no,yes}/*``; image labels only."""
    return _read_no_yes("brainmri", root, categories, report)


def read_br35h(root: str | Path, categories: Sequence[str] | None, report: ReadReport) -> list[Sample]:
    """Br35H: ``<root>/{no,yes}/*``; the unlabelled ``pred/`` folder is not read (noted). Image labels only."""
    return _read_no_yes("br35h", root, categories, report)


@dataclass(frozen=True)
class _SegLayout:
    """Accepted ``(images, masks)`` folder pairs, most preferred first, and the sub-folders the pair may sit in."""

    pairs: tuple[tuple[str, str], ...]
    nests: tuple[str, ...] = ()


_POLYP_PAIRS = (("images", "masks"), ("Original", "Ground Truth"))
_SEG_LAYOUTS = {
    # CVC sets: the Kaggle/AnomalyCLIP/PraNet copies use images/+masks/; the original release and the Kaggle
    # "CVC-ClinicDB" upload use Original/+"Ground Truth/" (TIF), the latter once as PNG/ and once as TIF/.
    "colondb": _SegLayout(_POLYP_PAIRS, ("PNG", "TIF")),
    "clinicdb": _SegLayout(_POLYP_PAIRS, ("PNG", "TIF")),
    "kvasir": _SegLayout((("images", "masks"),)),
    "endo": _SegLayout((("images", "masks"),)),
    # TN3K also ships trainval-image/ + trainval-mask/, which are not read (zero-shot evaluation uses the test set).
    "tn3k": _SegLayout((("test-image", "test-mask"),)),
}


def _describe(lay: _SegLayout) -> str:
    pairs = " or ".join(f"<root>/{i}/ + <root>/{m}/" for i, m in lay.pairs)
    nest = f" (also inside {'/ or '.join(lay.nests)}/)" if lay.nests else ""
    return f"{pairs}{nest}, masks with the same file names"


def _find_seg_folders(dataset: str, root: Path, report: ReadReport) -> tuple[Path, Path]:
    """The first accepted (images, masks) pair under ``root``, its ``nests`` or one unnamed wrapper folder."""
    lay = _SEG_LAYOUTS[dataset]

    def pair_in(base: Path) -> tuple[Path, Path] | None:
        for i, m in lay.pairs:
            if (base / i).is_dir() and (base / m).is_dir():
                return base / i, base / m
        return None

    bases = [root] + [root / n for n in lay.nests if (root / n).is_dir()]
    wrapper = descend(root, lambda d: pair_in(d) is not None, ReadReport())
    if wrapper is not None and wrapper != root:
        bases.append(wrapper)
    hits = [(b, hit) for b in bases if (hit := pair_in(b)) is not None]
    if not hits:
        raise DataError(
            f"{dataset}: no image/mask folders in {root}; expected {_describe(lay)}; {listing(root)}"
        )
    base, (images, masks) = hits[0]
    if base != root:
        report.notes.append(f"read {images.relative_to(root)}/ + {masks.relative_to(root)}/")
    if len(hits) > 1:
        others = ", ".join(str(b.relative_to(root)) + "/" for b, _ in hits[1:])
        report.notes.append(f"ignored the other copy of the images in {others}")
    return images, masks


def _read_segmentation(
    dataset: str, root: str | Path, categories: Sequence[str] | None, report: ReadReport
) -> list[Sample]:
    root = require_dir(Path(root).expanduser(), f"{dataset} layout {_describe(_SEG_LAYOUTS[dataset])}")
    img_dir, mask_dir = _find_seg_folders(dataset, root, report)
    select_categories([dataset], categories, root)
    masks = index_by_stem(list_images(mask_dir, report))
    samples = []
    for img in list_images(img_dir, report):
        # Pair by stem: images and masks may differ in extension (Kvasir .jpg masks, CVC .tif/.png copies).
        mask = find_by_stem(masks, [img.stem])
        if mask is None:
            raise missing_mask_error(img, [mask_dir / img.name])
        samples.append(_sample(dataset, img, 1, mask, "lesion"))
    require_nonempty(samples, dataset, img_dir)
    return samples


def _isic_files(root: Path, report: ReadReport) -> tuple[list[Path], dict[str, Path]]:
    """Test images and ``_Segmentation`` masks under ``root``; training folders and superpixel files are left out."""
    images, masks, training, superpixels = [], [], 0, 0
    for p in list_images(root, report, recursive=True):
        if any("training" in part.lower() for part in p.relative_to(root).parts[:-1]):
            training += 1  # e.g. ISBI2016_ISIC_Part1_Training_Data beside the test folders: not the benchmark
        elif p.stem.lower().endswith("_superpixels"):
            superpixels += 1
        elif p.stem.lower().endswith("_segmentation"):
            masks.append(p)
        else:
            images.append(p)
    if training:
        report.notes.append(f"ignored {training} file(s) under training folders")
    if superpixels:
        report.notes.append(f"ignored {superpixels} *_superpixels file(s)")
    return images, index_by_stem(masks)


def read_isic(root: str | Path, categories: Sequence[str] | None, report: ReadReport) -> list[Sample]:
    """ISIC 2016 part 1 test: ``ISIC_NNNNNNN.jpg`` images with ``ISIC_NNNNNNN_Segmentation.png`` masks.

    Searched recursively, so the official two folders (``ISBI2016_ISIC_Part1_Test_Data/`` +
    ``ISBI2016_ISIC_Part1_Test_GroundTruth/``), a single folder and AnomalyCLIP's re-arranged copy all work.
    """
    layout = (
        "ISIC layout: ISIC_NNNNNNN.jpg images with ISIC_NNNNNNN_Segmentation.png masks anywhere under the root "
        "(e.g. ISBI2016_ISIC_Part1_Test_Data/ + ISBI2016_ISIC_Part1_Test_GroundTruth/)"
    )
    root = require_dir(Path(root).expanduser(), layout)
    select_categories(["isic"], categories, root)
    images, masks = _isic_files(root, report)
    samples = []
    for img in images:
        mask = find_by_stem(masks, [img.stem + "_Segmentation"])
        if mask is None:
            raise missing_mask_error(img, [img.with_name(img.stem + "_Segmentation.png")])
        samples.append(_sample("isic", img, 1, mask, "lesion"))
    if not samples:
        raise DataError(f"no ISIC test images under {root}; expected {layout}; {listing(root)}")
    return samples


def segmentation_reader(dataset: str) -> Callable[[Path, Sequence[str] | None, ReadReport], list[Sample]]:
    """A reader for one of the ``images/`` + ``masks/`` sets (CVC-ColonDB, CVC-ClinicDB, Kvasir, Endo, TN3K)."""

    def read(root: str | Path, categories: Sequence[str] | None, report: ReadReport) -> list[Sample]:
        return _read_segmentation(dataset, root, categories, report)

    read.__doc__ = f"{dataset}: {_describe(_SEG_LAYOUTS[dataset])}; every image anomalous."
    return read
