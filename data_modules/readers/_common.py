"""Helpers shared by the readers: folder scanning, name pairing, class-name cleaning, the read report."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data_modules.errors import DataError
from data_modules.imageio import is_image_file
from data_modules.types import Sample

_TRAILING_DIGITS = re.compile(r"[\s_\-]*\d+$")


@dataclass
class ReadReport:
    """What a reader skipped on its way (never silently): hidden files and non-image files."""

    hidden: int = 0
    non_image: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self, name: str, samples: Sequence[Sample]) -> str:
        cats = len({s.category for s in samples})
        n_anom = sum(s.label for s in samples)
        parts = [
            f"{name}: {len(samples)} images ({len(samples) - n_anom} normal, {n_anom} anomalous) in {cats} categories"
        ]
        parts.append(f"skipped {self.hidden} hidden file(s), {self.non_image} non-image file(s)")
        return "; ".join(parts + self.notes)


def natural_key(text: str) -> list[object]:
    """Sort key that orders ``Class2`` before ``Class10`` and ``2.png`` before ``10.png``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def clean_class_name(category: str) -> str:
    """Prompt name of a category: ``_``/``-`` → space, trailing digits dropped, lower case (``macaroni1`` → ``macaroni``).

    Returns an empty string for purely numeric names (BTAD's ``01``); readers give those a configured name.
    """
    name = _TRAILING_DIGITS.sub("", category.strip())
    return re.sub(r"[_\-\s]+", " ", name).strip().lower()


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a folder, else raise naming what layout was expected there."""
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "does not exist"
        raise DataError(f"{path} {state}; expected {what}")
    return path


def list_images(folder: Path, report: ReadReport, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` in natural order; hidden and non-image files are counted in ``report``."""
    entries = folder.rglob("*") if recursive else folder.iterdir()
    images = []
    for p in entries:
        if any(part.startswith(".") for part in p.relative_to(folder).parts):
            report.hidden += p.is_file()
        elif p.is_file():
            if is_image_file(p):
                images.append(p)
            else:
                report.non_image += 1
    return sorted(images, key=lambda p: natural_key(str(p.relative_to(folder))))


def subdirs(folder: Path, report: ReadReport) -> list[Path]:
    """Visible sub-folders in natural order (hidden folders are counted, not read)."""
    out = []
    for p in folder.iterdir():
        if p.name.startswith("."):
            report.hidden += 1
        elif p.is_dir():
            out.append(p)
    return sorted(out, key=lambda p: natural_key(p.name))


def index_by_stem(files: Iterable[Path]) -> dict[str, Path]:
    """Map file stem → path; looked up exactly first, then case-insensitively (see ``find_by_stem``)."""
    return {p.stem: p for p in files}


def find_by_stem(index: dict[str, Path], stems: Sequence[str]) -> Path | None:
    """The first file whose stem equals one of ``stems`` (exact match first, then ignoring case)."""
    for stem in stems:
        if stem in index:
            return index[stem]
    lowered = {k.lower(): v for k, v in index.items()}
    for stem in stems:
        if stem.lower() in lowered:
            return lowered[stem.lower()]
    return None


def select_categories(found: Sequence[str], wanted: Sequence[str] | None, where: Path) -> list[str]:
    """Categories to read: all found (natural order) or the requested ones in the requested order."""
    if not found:
        raise DataError(f"no categories found under {where}")
    if wanted is None:
        return sorted(found, key=natural_key)
    missing = [c for c in wanted if c not in found]
    if missing:
        raise DataError(
            f"categories {missing} not found under {where}; available: {sorted(found, key=natural_key)}"
        )
    return list(wanted)


def listing(folder: Path, limit: int = 8) -> str:
    """A short description of what ``folder`` holds, for layout errors (``found: images/, a.png, …``)."""
    if not folder.is_dir():
        return "found: nothing (not a folder)"
    names = sorted((p.name + "/" if p.is_dir() else p.name for p in folder.iterdir()), key=natural_key)
    names = [n for n in names if not n.startswith(".")]
    if not names:
        return "found: an empty folder"
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return "found: " + ", ".join(names[:limit]) + more


def descend(root: Path, accept: Callable[[Path], bool], report: ReadReport) -> Path | None:
    """``root`` if ``accept(root)``, else its one visible sub-folder that is accepted (archives often unpack into
    an extra folder, e.g. ``KolektorSDD/kos01``); ``None`` when neither fits. The descent is noted in ``report``."""
    if accept(root):
        return root
    hits = [d for d in subdirs(root, ReadReport()) if accept(d)]
    if len(hits) == 1:
        report.notes.append(f"read the dataset from the nested folder {hits[0]}")
        return hits[0]
    return None


def require_nonempty(samples: Sequence[Sample], category: str, where: Path) -> None:
    if not samples:
        raise DataError(f"category {category!r} has no test images under {where}")


def missing_mask_error(image: Path, expected: Sequence[Path]) -> DataError:
    tried = ", ".join(str(p) for p in expected)
    return DataError(f"anomalous image {image} has no ground-truth mask; expected one of: {tried}")
