"""MVTec-style layouts: MVTec AD, MPDD, DTD-Synthetic, BTAD, MVTec AD 2, the generic folder and the synthetic sets.

``<root>/<category>/<test>/<defect>/<name>.<ext>`` with masks ``<root>/<category>/<gt>/<defect>/<name>_mask.<ext>``;
the normal folder (``good``, BTAD's ``ok``) has no masks. Masks are found by name, never by position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from data_modules.errors import DataError
from data_modules.readers._common import (
    ReadReport,
    clean_class_name,
    find_by_stem,
    index_by_stem,
    list_images,
    missing_mask_error,
    require_dir,
    require_nonempty,
    select_categories,
    subdirs,
)
from data_modules.types import Sample


@dataclass(frozen=True)
class MVTecLayout:
    """Where a MVTec-style dataset keeps its test images and masks (paths relative to a category folder)."""

    test_dir: str = "test"
    gt_dir: str = "ground_truth"
    normal_dirs: tuple[str, ...] = ("good",)
    mask_suffixes: tuple[str, ...] = ("_mask", "")
    masks: str = "required"  # "required" | "auto" (generic folder: no ground_truth anywhere → image-only)

    def describe(self) -> str:
        return (
            f"<root>/<category>/{self.test_dir}/<defect>/<name>.png with masks "
            f"<root>/<category>/{self.gt_dir}/<defect>/<name>{self.mask_suffixes[0]}.png "
            f"(normal folder: {'/'.join(self.normal_dirs)})"
        )


MVTEC = MVTecLayout()
BTAD = MVTecLayout(normal_dirs=("ok",), mask_suffixes=("", "_mask"))
MVTEC_AD2 = MVTecLayout(
    test_dir="test_public", gt_dir="test_public/ground_truth", mask_suffixes=("_mask", "")
)
FOLDER = MVTecLayout(normal_dirs=("good", "ok", "normal"), masks="auto")


def _category_dirs(root: Path, layout: MVTecLayout, report: ReadReport) -> dict[str, Path]:
    require_dir(root, f"a dataset folder in MVTec layout: {layout.describe()}")
    if (root / layout.test_dir).is_dir():  # the root is itself one category
        return {root.name: root}
    found = {d.name: d for d in subdirs(root, report) if (d / layout.test_dir).is_dir()}
    if not found:
        raise DataError(
            f"no category folder with a '{layout.test_dir}' sub-folder under {root}; expected {layout.describe()}"
        )
    return found


def _read_category(
    dataset: str,
    cat: str,
    cat_dir: Path,
    layout: MVTecLayout,
    class_name: str,
    with_masks: bool,
    report: ReadReport,
) -> list[Sample]:
    test_dir = cat_dir / layout.test_dir
    gt_root = cat_dir / layout.gt_dir
    samples = []
    for defect_dir in subdirs(test_dir, report):
        if defect_dir == gt_root:  # MVTec AD 2 keeps ground_truth inside test_public
            continue
        normal = defect_dir.name in layout.normal_dirs
        images = list_images(defect_dir, report)
        masks = {}
        if with_masks and not normal and (gt_root / defect_dir.name).is_dir():
            masks = index_by_stem(list_images(gt_root / defect_dir.name, report))
        for img in images:
            mask = None
            if with_masks and not normal:
                stems = [img.stem + s for s in layout.mask_suffixes]
                mask = find_by_stem(masks, stems)
                if mask is None:
                    expected = [gt_root / defect_dir.name / f"{s}.png" for s in stems]
                    raise missing_mask_error(img, expected)
            samples.append(
                Sample(
                    dataset=dataset,
                    category=cat,
                    image_path=img.resolve(),
                    mask_path=None if mask is None else mask.resolve(),
                    label=0 if normal else 1,
                    defect_type="good" if normal else defect_dir.name,
                    class_name=class_name,
                )
            )
    require_nonempty(samples, cat, test_dir)
    return samples


def read_mvtec_layout(
    dataset: str,
    root: str | Path,
    categories: Sequence[str] | None,
    report: ReadReport,
    layout: MVTecLayout = MVTEC,
    class_name: Callable[[str], str] = clean_class_name,
) -> list[Sample]:
    """Read the test split of a MVTec-style dataset; see the module docstring for the layout."""
    root = Path(root).expanduser()
    found = _category_dirs(root, layout, report)
    cats = select_categories(list(found), categories, root)
    with_masks = True
    if layout.masks == "auto":
        with_masks = any((found[c] / layout.gt_dir).is_dir() for c in cats)
        if not with_masks:
            report.notes.append(f"no '{layout.gt_dir}' folder in any category: image-level labels only")
    samples: list[Sample] = []
    for cat in cats:
        samples += _read_category(
            dataset, cat, found[cat], layout, class_name(cat) or cat, with_masks, report
        )
    return samples
