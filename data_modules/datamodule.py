"""``ZSADDataModule``: one auxiliary training set, N target test sets, and the category-aligned test sampler.

Under DDP the DataModule distributes data itself (a ``DistributedSampler`` for training, ``CategoryBatchSampler``
for testing), so the Trainer must be built with ``use_distributed_sampler=False``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from data_modules.dataset import ZSADDataset, collate
from data_modules.errors import DataError
from data_modules.readers import read, tasks_of
from data_modules.types import CLASS_NAME_SOURCES, MASK_RESIZE_RULES, Sample, check_choice


@dataclass
class DatasetSpec:
    """A dataset by reader name, root folder and optional category subset (``None`` = all)."""

    name: str
    root: str
    categories: list[str] | None = None


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class CategoryBatchSampler(Sampler[list[int]]):
    """Test batches that never span two categories, identical in count on every rank.

    Categories come in order of first appearance. Within a category the indices are dealt round-robin over the
    ranks; a rank that got fewer repeats its own items (or the category's, when it got none) up to
    ``ceil(n / world_size)``, so every rank sees the same number of items per category and all ranks cross a
    category boundary at the same step. Duplicates carry their original index, so consumers dedupe by index.

    Args:
        samples: the dataset's samples (only ``category`` is read).
        batch_size: maximum batch size; the last batch of a category may be smaller.
        rank, world_size: this process's rank and the number of ranks.
    """

    def __init__(
        self, samples: Sequence[Sample], batch_size: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"CategoryBatchSampler: bad batch_size={batch_size}, rank={rank}, world_size={world_size}"
            )
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault(s.category, []).append(i)
        self.batches: list[list[int]] = []
        for idx in groups.values():
            per_rank = math.ceil(len(idx) / world_size)
            mine = idx[rank::world_size] or idx
            padded = [mine[j % len(mine)] for j in range(per_rank)]
            self.batches += [padded[j : j + batch_size] for j in range(0, per_rank, batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a loader worker from torch's per-worker seed (itself derived from the loader's)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class ZSADDataModule(L.LightningDataModule):
    """The auxiliary set's test split for training (all categories pooled) and one test loader per target set.

    Args:
        train: auxiliary dataset, or ``None`` for test-only runs.
        test: target datasets, evaluated in this order.
        image_size, mean, std, interpolation: the method's input preprocessing.
        batch_size, test_batch_size: loader batch sizes.
        num_workers, pin_memory, persistent_workers: loader settings (persistence only applies with workers;
            pinning only with CUDA).
        seed: seeds the training shuffle and the workers.
        cache_dir: when set, every dataset is decoded and resized once into a ``ResizedCache`` under this folder
            (``data.cache_resized``) and read from memmaps afterwards; ``None`` decodes every time.
        class_name: the prompts' class-name source, ``cleaned`` or ``reference_path`` (``data.class_name``).
        mask_resize: the mask-resize rule, ``float`` or ``uint8`` (``data.mask_resize``).
    """

    def __init__(
        self,
        train: DatasetSpec | None,
        test: list[DatasetSpec],
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        interpolation: str = "bicubic",
        batch_size: int = 8,
        test_batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        class_name: str = "cleaned",
        mask_resize: str = "float",
    ) -> None:
        super().__init__()
        # Checked here, not first in a loader worker: a wrong value stops before any data is read.
        self.class_name = check_choice("data.class_name", class_name, CLASS_NAME_SOURCES)
        self.mask_resize = check_choice("data.mask_resize", mask_resize, MASK_RESIZE_RULES)
        self.train_spec = train
        self.test_specs = list(test)
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.interpolation = interpolation
        self.batch_size = batch_size
        self.test_batch_size = test_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.seed = seed
        self.cache_dir = cache_dir
        self.test_names = _unique_names(self.test_specs)
        self.train_samples: list[Sample] = []
        self.test_samples: list[list[Sample]] = []
        self._test_masks: list[bool] = []

    def setup(self, stage: str | None = None) -> None:
        """Read the sample lists (once): the auxiliary set for ``fit``, the targets for ``test``/``predict``."""
        if stage in (None, "fit") and self.train_spec is not None and not self.train_samples:
            spec = self.train_spec
            self.train_samples = read(spec.name, spec.root, spec.categories)
            if not tasks_of(spec.name, self.train_samples)[0]:
                raise DataError(
                    f"auxiliary dataset {spec.name!r} at {spec.root} has no masks; training needs pixel labels"
                )
        if stage in (None, "test", "validate", "predict") and not self.test_samples:
            for spec, name in zip(self.test_specs, self.test_names):
                samples = read(spec.name, spec.root, spec.categories)
                if name != spec.name or any(s.dataset != name for s in samples):
                    samples = [dataclasses.replace(s, dataset=name) for s in samples]
                self.test_samples.append(samples)
                self._test_masks.append(tasks_of(spec.name, samples)[0])

    def _dataset(self, samples: list[Sample], with_masks: bool) -> ZSADDataset:
        return ZSADDataset(
            samples,
            self.image_size,
            self.mean,
            self.std,
            self.interpolation,
            with_masks,
            cache_dir=self.cache_dir,
            cache_workers=self.num_workers,
            class_name=self.class_name,
            mask_resize=self.mask_resize,
        )

    def _loader_kwargs(self) -> dict[str, object]:
        workers = self.num_workers > 0
        return {
            "num_workers": self.num_workers,
            "collate_fn": collate,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.persistent_workers and workers,
            "worker_init_fn": seed_worker if workers else None,
            "generator": torch.Generator().manual_seed(self.seed),
        }

    def train_dataloader(self) -> DataLoader:
        """Shuffled (deterministically by ``seed``) pooled auxiliary samples; a ``DistributedSampler`` under DDP."""
        if self.train_spec is None:
            raise DataError("train_dataloader: no auxiliary (train) dataset configured")
        if not self.train_samples:
            self.setup("fit")
        dataset = self._dataset(self.train_samples, with_masks=True)
        rank, world = dist_rank_world()
        kwargs = self._loader_kwargs()
        if world > 1:
            sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=self.seed, drop_last=False)
            return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, **kwargs)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, **kwargs)

    def auxiliary_dataloader(
        self, batch_size: int | None = None, num_workers: int | None = None
    ) -> DataLoader:
        """The auxiliary samples for one pass in their order: no shuffle and no sampler (under DDP every rank sees
        every sample), with masks, preprocessed as the training batches (EntroAD builds its memory from these).

        Args:
            batch_size, num_workers: default: the training loader's.
        """
        if not self.train_samples:
            self.setup("fit")
        workers = self.num_workers if num_workers is None else int(num_workers)
        return DataLoader(
            self._dataset(self.train_samples, with_masks=True),
            batch_size=self.batch_size if batch_size is None else int(batch_size),
            shuffle=False,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per target dataset, in the configured order, batched by ``CategoryBatchSampler``."""
        if not self.test_samples:
            self.setup("test")
        rank, world = dist_rank_world()
        loaders = []
        for samples, with_masks in zip(self.test_samples, self._test_masks):
            sampler = CategoryBatchSampler(samples, self.test_batch_size, rank, world)
            loaders.append(
                DataLoader(self._dataset(samples, with_masks), batch_sampler=sampler, **self._loader_kwargs())
            )
        return loaders


def _unique_names(specs: Sequence[DatasetSpec]) -> list[str]:
    """Reader names, disambiguated by root folder name when one reader serves two targets (two ``meta`` sets)."""
    names = [s.name.lower() for s in specs]
    out = [n if names.count(n) == 1 else f"{n}:{Path(s.root).name}" for n, s in zip(names, specs)]
    if len(set(out)) != len(out):
        raise DataError(f"test datasets are not distinguishable by name and root folder: {out}")
    return out
