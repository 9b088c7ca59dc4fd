"""Records of the data layer: a ``Sample`` (what a reader returns) and a ``Batch`` (what a model sees)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor

# Where the text prompts' class name comes from (``data.class_name``):
#   cleaned         the reader's cleaned name (``Sample.class_name``: "metal nut", "pcb", "product");
#   reference_path  AVA-DINO's official rule ``image_path.split('/')[-4]``, raw: "metal_nut" for MVTec, "Data" for
#                   every VisA image, "01" for BTAD (see ``data_modules.dataset.reference_class_name``).
ClassNameSource = Literal["cleaned", "reference_path"]
CLASS_NAME_SOURCES: tuple[str, ...] = get_args(ClassNameSource)
# How a mask is resized to the input size (``data.mask_resize``):
#   float  bilinear on a 0/1 float mask, then > 0.5: exact-half pixels become background;
#   uint8  the official AVA-DINO / AnomalyCLIP loaders' rule: bilinear on the 0/255 mask as a uint8 mode-L image,
#          then /255 > 0.5: exact-half pixels (rounded to 128) become foreground.
MaskResizeRule = Literal["float", "uint8"]
MASK_RESIZE_RULES: tuple[str, ...] = get_args(MaskResizeRule)


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` naming the config key and the choices."""
    if value not in choices:
        raise ValueError(f"{key}: unknown value {value!r}; expected one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class Sample:
    """One test item of a dataset, as a reader found it on disk.

    Attributes:
        dataset: dataset key (``mvtec``, ``visa``, ``synthetic_textures`` …).
        category: category as named by the dataset (``macaroni1``, ``01``).
        image_path: absolute path of the image.
        mask_path: absolute path of the ground-truth mask; ``None`` for a normal image (its mask is all zero) and for
            every image of an image-only dataset.
        label: 0 normal, 1 anomalous.
        defect_type: ``good`` for normal images, else the defect folder / class name.
        class_name: cleaned name shown to text prompts (``macaroni``, ``pcb``, ``brain``).
    """

    dataset: str
    category: str
    image_path: Path
    mask_path: Path | None
    label: int
    defect_type: str
    class_name: str


@dataclass
class Batch:
    """A collated batch. Lightning moves it with ``.to`` and pins it with ``.pin_memory``.

    Attributes:
        image: float [B, 3, H, W], normalised.
        mask: bool [B, 1, H, W] or ``None`` for image-only datasets.
        label: long [B].
        category, class_name, dataset, path: one string per sample.
    """

    image: Tensor
    mask: Tensor | None
    label: Tensor
    category: list[str]
    class_name: list[str]
    dataset: list[str]
    path: list[str]
    index: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def __post_init__(self) -> None:
        b = self.image.shape[0]
        if self.image.ndim != 4 or self.image.shape[1] != 3:
            raise ValueError(f"Batch.image must be [B,3,H,W], got {tuple(self.image.shape)}")
        if self.mask is not None and (
            self.mask.ndim != 4 or self.mask.shape[0] != b or self.mask.shape[1] != 1
        ):
            raise ValueError(f"Batch.mask must be [B,1,H,W], got {tuple(self.mask.shape)}")
        if self.label.shape != (b,):
            raise ValueError(f"Batch.label must be [B], got {tuple(self.label.shape)}")
        for name in ("category", "class_name", "dataset", "path"):
            if len(getattr(self, name)) != b:
                raise ValueError(f"Batch.{name} must have {b} entries, got {len(getattr(self, name))}")

    def __len__(self) -> int:
        return self.image.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(
            mv(self.image),
            mv(self.mask),
            mv(self.label),
            self.category,
            self.class_name,
            self.dataset,
            self.path,
            mv(self.index),
        )

    def pin_memory(self) -> Batch:
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(
            pin(self.image),
            pin(self.mask),
            pin(self.label),
            self.category,
            self.class_name,
            self.dataset,
            self.path,
            pin(self.index),
        )

    @property
    def gt(self) -> Tensor | None:
        """float [B, H, W] ground truth for losses, or ``None``."""
        return None if self.mask is None else self.mask[:, 0].float()
