"""Dataset, collate, DataModule and the category-aligned test sampler."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.datamodule import CategoryBatchSampler, DatasetSpec, ZSADDataModule
from data_modules.dataset import ZSADDataset, collate
from data_modules.readers import read
from data_modules.synthetic import SynthOptions, generate_synthetic
from data_modules.types import Batch, Sample

MEAN, STD = (0.1, 0.2, 0.3), (0.5, 0.5, 0.25)


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(
        tmp_path_factory.mktemp("synth"), SynthOptions(size=32, n_test=4, n_train=0), False
    )


@pytest.fixture(scope="module")
def visa_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MVTec-layout set whose masks hold VisA-style small integers and differ in size from their images."""
    root = tmp_path_factory.mktemp("visa_like")
    for cat in ("candle", "pcb1"):
        _png(root / cat / "test" / "good" / "0.png", np.full((8, 8, 3), 51, np.uint8))
        _png(root / cat / "test" / "bad" / "1.png", np.full((8, 8), 51, np.uint8))  # grayscale file
        m = np.zeros((16, 16), np.uint8)
        m[:8, :8] = 2  # class id 2, top-left quarter
        _png(root / cat / "ground_truth" / "bad" / "1_mask.png", m)
    return root


def _image_only(root: Path) -> Path:
    for sub, v in (("no", 10), ("yes", 200)):
        for i in range(3):
            _png(root / sub / f"{i}.jpg", np.full((6, 9, 3), v, np.uint8))
    return root


def test_dataset_normalises_resizes_and_binarises(visa_like: Path) -> None:
    samples = read("folder", visa_like, ["candle"])
    ds = ZSADDataset(samples, image_size=4, mean=MEAN, std=STD, interpolation="bilinear", with_masks=True)
    batch = collate([ds[i] for i in range(len(ds))])
    assert isinstance(batch, Batch) and batch.image.shape == (2, 3, 4, 4) and batch.mask.dtype == torch.bool
    expected = (0.2 - torch.tensor(MEAN)) / torch.tensor(STD)  # pixel 51 = 0.2
    torch.testing.assert_close(batch.image[:, :, 0, 0], expected.expand(2, 3), atol=1e-6, rtol=0)
    by_label = {int(lab): i for i, lab in enumerate(batch.label)}
    quarter = torch.zeros(4, 4, dtype=torch.bool)
    quarter[:2, :2] = True
    assert torch.equal(batch.mask[by_label[1], 0], quarter)  # 16x16 mask of small ints → 4x4, > 0 then > 0.5
    assert not batch.mask[by_label[0]].any()  # normal image of a pixel dataset: all-zero mask
    assert batch.index.tolist() == [0, 1] and batch.category == ["candle", "candle"]


def test_image_only_dataset_has_no_masks(tmp_path: Path) -> None:
    samples = read("brainmri", _image_only(tmp_path / "b"))
    ds = ZSADDataset(samples, 8, MEAN, STD, with_masks=False)
    batch = collate([ds[0], ds[4]])
    assert batch.mask is None and batch.gt is None and batch.label.tolist() == [0, 1]
    with pytest.raises(ValueError, match="interpolation"):
        ZSADDataset(samples, 8, MEAN, STD, interpolation="area")


def _cats(sizes: dict[str, int]) -> list[Sample]:
    out = []
    for cat, n in sizes.items():
        out += [Sample("d", cat, Path(f"/{cat}/{i}.png"), None, 0, "good", cat) for i in range(n)]
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_category_batch_sampler_aligns_ranks(world: int) -> None:
    sizes = {"a": 5, "b": 2, "c": 1, "d": 7}
    samples = _cats(sizes)
    per_rank = [
        list(CategoryBatchSampler(samples, batch_size=2, rank=r, world_size=world)) for r in range(world)
    ]
    assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank
    for step in zip(*per_rank):  # all ranks are in the same category at every step
        cats = {samples[i].category for batch in step for i in batch}
        assert len(cats) == 1
    covered = {i for batches in per_rank for batch in batches for i in batch}
    assert covered == set(range(len(samples)))
    for batches in per_rank:
        flat = [i for b in batches for i in b]
        for cat, n in sizes.items():
            assert sum(samples[i].category == cat for i in flat) == math.ceil(n / world)
        assert all(1 <= len(b) <= 2 for b in batches)
    if world == 1:
        assert sorted(i for b in per_rank[0] for i in b) == list(range(len(samples)))  # no padding


def test_datamodule_round_trip(synth: Path, visa_like: Path, tmp_path: Path) -> None:
    brain = _image_only(tmp_path / "brain")
    dm = ZSADDataModule(
        train=DatasetSpec("synthetic_textures", str(synth)),
        test=[
            DatasetSpec("synthetic_objects", str(synth)),
            DatasetSpec("brainmri", str(brain)),
            DatasetSpec("folder", str(visa_like)),
        ],
        image_size=16,
        mean=MEAN,
        std=STD,
        batch_size=3,
        test_batch_size=3,
        seed=0,
    )
    dm.setup("fit")
    dm.setup("test")
    assert dm.test_names == ["synthetic_objects", "brainmri", "folder"] and len(dm.train_samples) == 20
    train = list(dm.train_dataloader())
    assert (
        len(train) == math.ceil(20 / 3)
        and train[0].image.shape == (3, 3, 16, 16)
        and train[0].mask is not None
    )
    seen = sorted(p for b in train for p in b.path)
    assert seen == sorted(str(s.image_path) for s in dm.train_samples)
    loaders = dm.test_dataloader()
    assert len(loaders) == 3
    for loader, samples in zip(loaders, dm.test_samples):
        batches = list(loader)
        assert all(len(set(b.category)) == 1 for b in batches)
        assert sorted(i for b in batches for i in b.index.tolist()) == list(range(len(samples)))
        for b in batches:
            assert b.path == [str(samples[i].image_path) for i in b.index.tolist()]
    brain_batches = list(loaders[1])
    assert all(b.mask is None for b in brain_batches) and brain_batches[0].dataset == ["brainmri"] * 3
    obj = next(iter(loaders[0]))
    assert obj.mask.shape == (3, 1, 16, 16) and obj.mask[obj.label == 0].sum() == 0


def test_train_shuffle_is_seeded(synth: Path) -> None:
    def first_paths(seed: int) -> list[str]:
        dm = ZSADDataModule(
            DatasetSpec("synthetic_textures", str(synth)), [], 16, MEAN, STD, batch_size=20, seed=seed
        )
        return next(iter(dm.train_dataloader())).path

    assert first_paths(0) == first_paths(0)
    assert first_paths(0) != first_paths(1)


def test_workers_give_the_same_batches(synth: Path) -> None:
    kw = dict(
        train=None,
        test=[DatasetSpec("synthetic_objects", str(synth), ["pill", "screw"])],
        image_size=16,
        mean=MEAN,
        std=STD,
        test_batch_size=3,
    )
    serial = list(ZSADDataModule(**kw, num_workers=0).test_dataloader()[0])
    parallel = list(ZSADDataModule(**kw, num_workers=2, persistent_workers=True).test_dataloader()[0])
    assert len(serial) == len(parallel) == 4
    for a, b in zip(serial, parallel):
        assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) and a.path == b.path


def test_duplicate_reader_names_are_disambiguated(synth: Path) -> None:
    dm = ZSADDataModule(
        None,
        [DatasetSpec("folder", str(synth / "textures")), DatasetSpec("folder", str(synth / "objects"))],
        16,
        MEAN,
        STD,
    )
    dm.setup("test")
    assert dm.test_names == ["folder:textures", "folder:objects"]
    assert {s.dataset for s in dm.test_samples[1]} == {"folder:objects"}
