"""``Sample`` records → tensors, and the collate function that builds a ``Batch``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data_modules.errors import DataError
from data_modules.imageio import load_image, load_mask
from data_modules.types import CLASS_NAME_SOURCES, MASK_RESIZE_RULES, Batch, Sample, check_choice

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


def resize_mask(mask: np.ndarray, size: int, rule: str = "float") -> np.ndarray:
    """Resize a binary mask to ``size × size`` with PIL bilinear, then threshold at one half.

    Args:
        mask: bool [H, W].
        size: square side.
        rule: ``float`` resizes the 0/1 mask as float32 and keeps ``> 0.5`` (exact-half pixels drop out);
            ``uint8`` resizes it as a 0/255 mode-L image, as the official AVA-DINO loader does, and keeps
            ``/255 > 0.5``: the uint8 image rounds an exact half (127.5) to 128, so those pixels stay foreground.
    """
    check_choice("data.mask_resize", rule, MASK_RESIZE_RULES)
    if mask.shape[0] == size and mask.shape[1] == size:
        return mask
    if rule == "uint8":
        gray = Image.fromarray(mask.astype(np.uint8) * np.uint8(255), mode="L")
        soft = gray.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(soft, dtype=np.float32) / np.float32(255.0) > 0.5
    soft = Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(soft) > 0.5


def reference_class_name(image_path: str | Path) -> str:
    """AVA-DINO's official class name: ``image_path.split('/')[-4]``, used raw (no cleaning).

    That is the category folder of an MVTec-layout path (``metal_nut/test/good/000.png`` → ``metal_nut``), but
    ``Data`` for every VisA image (``candle/Data/Images/Anomaly/000.JPG``) and ``01`` for BTAD.
    """
    parts = Path(image_path).as_posix().split("/")
    if len(parts) < 4:
        raise DataError(f"data.class_name=reference_path needs at least 4 path components, got {image_path}")
    return parts[-4]


CACHE_VERSION = 1


def _file_stamp(path: str | Path | None) -> list[Any] | None:
    if path is None:
        return None
    st = os.stat(path)
    return [str(path), st.st_size, st.st_mtime_ns]


def resized_cache_key(
    samples: Sequence[Sample],
    image_size: int,
    interpolation: str,
    with_masks: bool,
    mask_resize: str = "float",
) -> str:
    """SHA-1 of everything that decides the cached pixels: files (path, size, mtime), side, resampling, masks and
    the mask-resize rule."""
    desc = {
        "version": CACHE_VERSION,
        "size": int(image_size),
        "interpolation": interpolation,
        "with_masks": bool(with_masks),
        "mask_resize": mask_resize,
        "files": [
            [_file_stamp(s.image_path), _file_stamp(s.mask_path) if with_masks else None] for s in samples
        ],
    }
    return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()


class _Decode(Dataset):
    """Decode + resize one sample to uint8 pixels (and a bool mask); fills the cache in loader workers."""

    def __init__(
        self, samples: Sequence[Sample], size: int, interpolation: str, with_masks: bool, mask_resize: str
    ) -> None:
        self.samples = samples
        self.size = size
        self.interpolation = interpolation
        self.with_masks = with_masks
        self.mask_resize = mask_resize

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray, np.ndarray | None]:
        s = self.samples[index]
        image = resize_image(load_image(s.image_path), self.size, self.interpolation)
        mask = None
        if self.with_masks and s.mask_path is not None:
            mask = resize_mask(load_mask(s.mask_path), self.size, self.mask_resize)
        return index, image, mask


def _keep(item: Any) -> Any:  # noqa: ANN401 — identity collate at module level (picklable for workers)
    return item


class ResizedCache:
    """Decoded and resized pixels of a sample list, stored once as ``.npy`` memmaps (``data.cache_resized``).

    The folder ``<root>/resized_<size>_<interpolation>_<key>`` holds ``images.npy`` (uint8 [N, S, S, 3]) and, for
    datasets with pixel labels, ``masks.npy`` (bool [N, S, S]). The key covers every file's path, size and mtime,
    the side, the resampling and the mask-resize rule, so a changed file or setting builds a new folder. The folder appears by an atomic
    rename once complete, so an interrupted build is never read. Memmaps are opened lazily in each process (a
    loader worker maps the file itself instead of receiving a pickled copy of the pixels).

    Args:
        samples: the dataset's samples, in item order.
        image_size: square side.
        interpolation: image resampling name (see ``INTERPOLATIONS``).
        with_masks: whether masks are cached.
        root: cache folder (created if needed).
        mask_resize: mask-resize rule (see ``resize_mask``).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        interpolation: str,
        with_masks: bool,
        root: str | Path,
        mask_resize: str = "float",
    ) -> None:
        self.samples = list(samples)
        self.size = int(image_size)
        self.interpolation = interpolation
        self.with_masks = with_masks
        self.mask_resize = check_choice("data.mask_resize", mask_resize, MASK_RESIZE_RULES)
        key = resized_cache_key(self.samples, self.size, interpolation, with_masks, self.mask_resize)
        self.folder = Path(root) / f"resized_{self.size}_{interpolation}_{key[:20]}"
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None

    @property
    def ready(self) -> bool:
        return (self.folder / "images.npy").is_file()

    def build(self, num_workers: int = 0) -> None:
        """Decode and resize every sample once (in ``num_workers`` loader workers) unless the cache exists."""
        if self.ready:
            return
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.folder.with_name(f"{self.folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        n, s = len(self.samples), self.size
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, s, s, 3))
        masks = None
        if self.with_masks:
            masks = np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.bool_, shape=(n, s, s))
        loader = DataLoader(
            _Decode(self.samples, s, self.interpolation, self.with_masks, self.mask_resize),
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_keep,
        )
        for index, image, mask in tqdm(loader, desc=f"resize cache {s}²", unit="img", leave=False):
            images[index] = image
            if masks is not None:
                masks[index] = False if mask is None else mask
        images.flush()
        if masks is not None:
            masks.flush()
        del images, masks
        try:
            os.replace(tmp, self.folder)
        except OSError:  # another process finished the same cache first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
            if not self.ready:
                raise

    def _open(self) -> None:
        if not self.ready:
            raise FileNotFoundError(f"resized cache {self.folder} is missing; call build() first")
        self._images = np.load(self.folder / "images.npy", mmap_mode="r")
        if self.with_masks:
            self._masks = np.load(self.folder / "masks.npy", mmap_mode="r")

    def image(self, index: int) -> np.ndarray:
        """uint8 [S, S, 3] pixels of item ``index`` (a read-only view into the memmap)."""
        if self._images is None:
            self._open()
        return self._images[index]

    def mask(self, index: int) -> np.ndarray:
        """bool [S, S] mask of item ``index`` (all False for a normal image)."""
        if self._images is None:
            self._open()
        if self._masks is None:
            raise ValueError(f"resized cache {self.folder} holds no masks (built with with_masks=False)")
        return self._masks[index]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None, "_masks": None}


class ZSADDataset(Dataset):
    """Test items of one dataset (or the pooled auxiliary set) at a method's input size.

    Args:
        samples: records from a reader.
        image_size: square side the image (and mask) is resized to.
        mean, std: per-channel normalisation applied to ``[0, 1]`` pixels.
        interpolation: image resampling, ``bicubic`` (CLIP methods) or ``bilinear`` (DINO).
        with_masks: ``True`` for datasets with pixel ground truth (normal images get all-zero masks); ``False`` for
            image-only datasets (every item's mask is ``None``).
        cache_dir: folder of a :class:`ResizedCache` (decode and resize once, then read memmaps), or ``None`` to
            decode and resize every time. Items are identical either way.
        cache_workers: loader workers that fill the cache on its first use.
        class_name: where an item's ``class_name`` (the prompts' object name) comes from: ``cleaned`` (the
            reader's) or ``reference_path`` (AVA-DINO's path rule, see ``reference_class_name``).
        mask_resize: ``float`` or ``uint8`` (the official loaders' rule), see ``resize_mask``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        with_masks: bool = True,
        cache_dir: str | Path | None = None,
        cache_workers: int = 0,
        class_name: str = "cleaned",
        mask_resize: str = "float",
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
        self.class_name = check_choice("data.class_name", class_name, CLASS_NAME_SOURCES)
        self.mask_resize = check_choice("data.mask_resize", mask_resize, MASK_RESIZE_RULES)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.cache: ResizedCache | None = None
        if cache_dir is not None:
            self.cache = ResizedCache(
                self.samples, self.image_size, interpolation, with_masks, cache_dir, self.mask_resize
            )
            self.cache.build(cache_workers)

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, index: int) -> Tensor:
        if self.cache is not None:
            arr = self.cache.image(index)
        else:
            s = self.samples[index]
            arr = resize_image(load_image(s.image_path), self.image_size, self.interpolation)
        # np.array copies: PIL's buffer and the memmap are read-only.
        img = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float().div_(255.0)
        return (img - self.mean) / self.std

    def _mask(self, index: int) -> Tensor | None:
        if not self.with_masks:
            return None
        if self.cache is not None:
            return torch.from_numpy(np.array(self.cache.mask(index)))[None]
        s = self.samples[index]
        if s.mask_path is None:
            return torch.zeros(1, self.image_size, self.image_size, dtype=torch.bool)
        mask = resize_mask(load_mask(s.mask_path), self.image_size, self.mask_resize)
        return torch.from_numpy(mask.copy())[None]

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        return {
            "image": self._image(index),
            "mask": self._mask(index),
            "label": s.label,
            "category": s.category,
            "class_name": (
                s.class_name if self.class_name == "cleaned" else reference_class_name(s.image_path)
            ),
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
