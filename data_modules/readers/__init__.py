"""Dataset readers: one per dataset family, each returning the test split as a list of ``Sample`` records.

``read(name, root, categories)`` is the one entry point; nothing outside this package knows a folder layout.
Reader names (``READERS``): mvtec, visa, mpdd, btad, ksdd2, sdd, dagm, dtd, mvtec2, headct, brainmri, br35h, isic,
colondb, clinicdb, kvasir, endo, tn3k, meta (a ``meta.json`` file or its folder), folder (any MVTec-layout tree)
and synthetic_textures / synthetic_objects (the generated benchmark; root = the generator's output folder or the
domain folder itself).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from data_modules.errors import DataError
from data_modules.readers import medical, mvtec, surfaces, visa
from data_modules.readers._common import ReadReport, clean_class_name
from data_modules.readers.meta_json import read_meta
from data_modules.types import Sample

log = logging.getLogger("data_modules")

Reader = Callable[[Path, Sequence[str] | None, ReadReport], list[Sample]]

BTAD_NAMES = {"01": "product", "02": "product", "03": "product"}


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset supports. ``None`` = decided by what is on disk (generic formats).

    Attributes:
        name: reader name.
        pixel: has ground-truth masks (pixel metrics).
        image: has normal and anomalous images (image metrics).
        layout: the expected on-disk layout, for error messages and ``zsad data check``.
    """

    name: str
    pixel: bool | None
    image: bool | None
    layout: str


def _mvtec_family(
    dataset: str, layout: mvtec.MVTecLayout, class_name: Callable[[str], str] = clean_class_name
) -> Reader:
    return partial(mvtec.read_mvtec_layout, dataset, layout=layout, class_name=class_name)


def _synthetic(domain: str) -> Reader:
    def read(root: Path, categories: Sequence[str] | None, report: ReadReport) -> list[Sample]:
        root = Path(root).expanduser()
        base = root / domain if (root / domain).is_dir() else root
        return mvtec.read_mvtec_layout(f"synthetic_{domain}", base, categories, report, layout=mvtec.MVTEC)

    return read


_MVT = "MVTec layout <cat>/test/<defect>/*.png + <cat>/ground_truth/<defect>/*_mask.png"
_TABLE: dict[str, tuple[Reader, bool | None, bool | None, str]] = {
    "mvtec": (_mvtec_family("mvtec", mvtec.MVTEC), True, True, _MVT),
    "mpdd": (_mvtec_family("mpdd", mvtec.MVTEC), True, True, _MVT),
    "dtd": (_mvtec_family("dtd", mvtec.MVTEC), True, True, _MVT),
    "btad": (
        _mvtec_family("btad", mvtec.BTAD, lambda c: BTAD_NAMES.get(c) or clean_class_name(c) or "product"),
        True,
        True,
        "<cat>/test/{ok,ko}/* + <cat>/ground_truth/ko/*",
    ),
    "mvtec2": (
        _mvtec_family("mvtec2", mvtec.MVTEC_AD2),
        True,
        True,
        "<cat>/test_public/{good,bad}/* + <cat>/test_public/ground_truth/bad/<stem>_mask.png",
    ),
    "visa": (visa.read_visa, True, True, "split_csv/1cls.csv (object,split,label,image,mask)"),
    "ksdd2": (surfaces.read_ksdd2, True, True, "test/NNNNN.png + test/NNNNN_GT.png"),
    "sdd": (surfaces.read_sdd, True, True, "kos*/Part*.jpg + kos*/Part*_label.bmp"),
    "dagm": (surfaces.read_dagm, True, True, "ClassN/{Train,Test}/NNNN.PNG + .../Label/NNNN_label.PNG"),
    "headct": (medical.read_headct, False, True, "head_ct/NNN.png + labels.csv (id, hemorrhage)"),
    "brainmri": (medical.read_brainmri, False, True, "{no,yes}/* or brain_tumor_dataset/{no,yes}/*"),
    "br35h": (medical.read_br35h, False, True, "{no,yes}/*"),
    "isic": (medical.read_isic, True, False, "ISIC_*.jpg + ISIC_*_Segmentation.png (any sub-folders)"),
    "colondb": (
        medical.segmentation_reader("colondb"),
        True,
        False,
        "images/ + masks/ or Original/ + Ground Truth/",
    ),
    "clinicdb": (
        medical.segmentation_reader("clinicdb"),
        True,
        False,
        "images/ + masks/ or Original/ + Ground Truth/",
    ),
    "kvasir": (medical.segmentation_reader("kvasir"), True, False, "images/ + masks/"),
    "endo": (medical.segmentation_reader("endo"), True, False, "images/ + masks/"),
    "tn3k": (medical.segmentation_reader("tn3k"), True, False, "test-image/ + test-mask/"),
    "meta": (read_meta, None, None, "meta.json: split → category → items (AnomalyCLIP format)"),
    "folder": (_mvtec_family("folder", mvtec.FOLDER), None, None, _MVT + " (masks optional)"),
    "synthetic_textures": (_synthetic("textures"), True, True, "<out>/textures/ in " + _MVT),
    "synthetic_objects": (_synthetic("objects"), True, True, "<out>/objects/ in " + _MVT),
}

READERS: tuple[str, ...] = tuple(_TABLE)


def _entry(name: str) -> tuple[Reader, bool | None, bool | None, str]:
    key = name.lower()
    if key not in _TABLE:
        raise DataError(f"unknown dataset reader {name!r}; known readers: {', '.join(READERS)}")
    return _TABLE[key]


def dataset_info(name: str) -> DatasetInfo:
    """Static facts about a reader's dataset (pixel/image task; ``None`` = as present on disk)."""
    _, pixel, image, layout = _entry(name)
    return DatasetInfo(name.lower(), pixel, image, layout)


def tasks_of(name: str, samples: Sequence[Sample]) -> tuple[bool, bool]:
    """``(pixel, image)`` for a read dataset: the static facts, or, for generic formats, what the samples hold."""
    info = dataset_info(name)
    pixel = info.pixel if info.pixel is not None else any(s.mask_path is not None for s in samples)
    image = info.image if info.image is not None else len({s.label for s in samples}) == 2
    return pixel, image


def read_with_report(
    name: str, root: str | Path, categories: Sequence[str] | None = None
) -> tuple[list[Sample], ReadReport]:
    """Like ``read`` but also returns what was skipped (hidden and non-image files, notes)."""
    reader = _entry(name)[0]
    report = ReadReport()
    samples = reader(Path(root), list(categories) if categories is not None else None, report)
    return samples, report


def read(name: str, root: str | Path, categories: list[str] | None = None) -> list[Sample]:
    """Read the test split of dataset ``name`` under ``root`` (all categories, or the ones given, in that order).

    Raises:
        DataError: unknown reader, missing root, wrong layout, an anomalous image without its mask, an empty
            category, an unknown category. The message names the path and the expected layout.
    """
    samples, report = read_with_report(name, root, categories)
    log.info(report.summary(name, samples))
    return samples


__all__ = [
    "READERS",
    "DatasetInfo",
    "DataError",
    "Reader",
    "dataset_info",
    "read",
    "read_with_report",
    "tasks_of",
]
