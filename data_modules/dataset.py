"""``Sample`` records → tensors, and the collate function that builds a ``Batch``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from data_modules.imageio import load_image, load_mask
from data_modules.types import Batch, Sample

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,  # CLIP's own preprocessing
    "bilinear": Image.Resampling.BILINEAR,  # DINO's
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def resize_image(image: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """Resize ``uint8 [H, W, 3]`` to ``size × size`` with PIL (antialiased, as the methods' reference code does)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), INTERPOLATIONS[interpolation]))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a binary mask: bilinear on 0/1 floats, then ``> 0.5`` (the metric protocol's rule)."""
    if mask.shape[0] == size and mask.shape[1] == size:
        return mask
    soft = Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(soft) > 0.5


class ZSADDataset(Dataset):
    """Test items of one dataset (or the pooled auxiliary set) at a method's input size.

    Args:
        samples: records from a reader.
        image_size: square side the image (and mask) is resized to.
        mean, std: per-channel normalisation applied to ``[0, 1]`` pixels.
        interpolation: image resampling, ``bicubic`` (CLIP methods) or ``bilinear`` (DINO).
        with_masks: ``True`` for datasets with pixel ground truth (normal images get all-zero masks); ``False`` for
            image-only datasets (every item's mask is ``None``).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        with_masks: bool = True,
    ) -> None:
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation {interpolation!r} unknown; expected one of {list(INTERPOLATIONS)}"
            )
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {mean} and {std}")
        self.samples = list(samples)
        self.image_size = int(image_size)
        self.interpolation = interpolation
        self.with_masks = with_masks
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, s: Sample) -> Tensor:
        arr = resize_image(load_image(s.image_path), self.image_size, self.interpolation)
        img = (
            torch.from_numpy(np.array(arr)).permute(2, 0, 1).float().div_(255.0)
        )  # PIL's buffer is read-only
        return (img - self.mean) / self.std

    def _mask(self, s: Sample) -> Tensor | None:
        if not self.with_masks:
            return None
        if s.mask_path is None:
            return torch.zeros(1, self.image_size, self.image_size, dtype=torch.bool)
        return torch.from_numpy(resize_mask(load_mask(s.mask_path), self.image_size).copy())[None]

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        return {
            "image": self._image(s),
            "mask": self._mask(s),
            "label": s.label,
            "category": s.category,
            "class_name": s.class_name,
            "dataset": s.dataset,
            "path": str(s.image_path),
            "index": index,
        }


def collate(items: Sequence[dict[str, Any]]) -> Batch:
    """Stack dataset items into a ``Batch`` (mask ``None`` when the items carry none)."""
    has_mask = [it["mask"] is not None for it in items]
    if any(has_mask) and not all(has_mask):
        raise ValueError("collate: some items have masks and some do not; a batch must come from one dataset")
    return Batch(
        image=torch.stack([it["image"] for it in items]),
        mask=torch.stack([it["mask"] for it in items]) if all(has_mask) else None,
        label=torch.tensor([it["label"] for it in items], dtype=torch.long),
        category=[it["category"] for it in items],
        class_name=[it["class_name"] for it in items],
        dataset=[it["dataset"] for it in items],
        path=[it["path"] for it in items],
        index=torch.tensor([it["index"] for it in items], dtype=torch.long),
    )
