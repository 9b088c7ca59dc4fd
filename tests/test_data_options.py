"""The data options that reproduce the official loaders: ``data.class_name`` and ``data.mask_resize``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from data_modules.datamodule import ZSADDataModule
from data_modules.dataset import (
    ZSADDataset,
    reference_class_name,
    resize_mask,
    resized_cache_key,
)
from data_modules.errors import DataError
from data_modules.readers import read
from zsad.config import ConfigError, compose

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _half_mask() -> np.ndarray:
    """8×8, columns 0-2 on: at a 2× downscale output column 1 averages to exactly one half.

    PIL's bilinear 2× filter weighs input columns 2j-1 … 2j+2 by 1/8, 3/8, 3/8, 1/8, so an edge between columns 2
    and 3 gives 1/8 + 3/8 = 0.5 in output column 1.
    """
    m = np.zeros((8, 8), bool)
    m[:, :3] = True
    return m


def test_mask_rules_differ_exactly_on_half_pixels() -> None:
    m = _half_mask()
    soft = np.asarray(Image.fromarray(m.astype(np.float32)).resize((4, 4), Image.Resampling.BILINEAR))
    half = soft == 0.5
    assert half[:, 1].all() and half.sum() == 4  # the construction gives exact halves in column 1 only
    as_float, as_uint8 = resize_mask(m, 4, "float"), resize_mask(m, 4, "uint8")
    assert not as_float[half].any()  # > 0.5 on floats: an exact half is background
    assert as_uint8[half].all()  # uint8 rounds 127.5 to 128, and 128/255 > 0.5: foreground
    assert (as_float == as_uint8)[~half].all()
    assert (as_float == (soft > 0.5)).all()
    # the uint8 rule by hand, as the official loader computes it: mode-L 0/255 bilinear, ToTensor (/255), > 0.5
    gray = Image.fromarray(np.where(m, 255, 0).astype(np.uint8), mode="L").resize(
        (4, 4), Image.Resampling.BILINEAR
    )
    assert (as_uint8 == (np.asarray(gray, dtype=np.float32) / 255 > 0.5)).all()


def test_same_size_masks_are_unchanged_by_either_rule() -> None:
    m = _half_mask()
    assert (resize_mask(m, 8, "float") == m).all() and (resize_mask(m, 8, "uint8") == m).all()


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """An MVTec-layout category ``metal_nut`` with one normal and one anomalous image (the half mask, 8×8)."""
    root = tmp_path / "mvtec"
    for rel, arr in (
        ("metal_nut/test/good/000.png", np.full((8, 8, 3), 90, np.uint8)),
        ("metal_nut/test/stain/000.png", np.full((8, 8, 3), 30, np.uint8)),
        ("metal_nut/ground_truth/stain/000_mask.png", np.where(_half_mask(), 255, 0).astype(np.uint8)),
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / rel)
    return root


def _items(ds: ZSADDataset) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("cached", [False, True])
def test_dataset_applies_the_mask_rule(tree: Path, tmp_path: Path, cached: bool) -> None:
    samples = read("mvtec", tree)
    cache = tmp_path / "cache" if cached else None
    masks = {
        rule: _items(ZSADDataset(samples, 4, MEAN, STD, "bilinear", True, cache_dir=cache, mask_resize=rule))[
            1
        ]["mask"][0].numpy()
        for rule in ("float", "uint8")
    }
    assert (masks["float"] == resize_mask(_half_mask(), 4, "float")).all()
    assert (masks["uint8"] == resize_mask(_half_mask(), 4, "uint8")).all()
    assert masks["uint8"].sum() == masks["float"].sum() + 4
    if cached:  # one folder per rule: the cache key includes it
        assert len(list((tmp_path / "cache").glob("resized_4_bilinear_*"))) == 2


def test_cache_key_includes_the_mask_rule(tree: Path) -> None:
    samples = read("mvtec", tree)
    keys = {rule: resized_cache_key(samples, 4, "bilinear", True, rule) for rule in ("float", "uint8")}
    assert keys["float"] != keys["uint8"]


def test_class_name_sources(tree: Path) -> None:
    samples = read("mvtec", tree)
    cleaned = _items(ZSADDataset(samples, 4, MEAN, STD, "bilinear", True))
    raw = _items(ZSADDataset(samples, 4, MEAN, STD, "bilinear", True, class_name="reference_path"))
    assert [it["class_name"] for it in cleaned] == ["metal nut"] * 2
    assert [it["class_name"] for it in raw] == ["metal_nut"] * 2  # raw: underscore kept


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/d/visa/candle/Data/Images/Anomaly/000.JPG", "Data"),  # every VisA image
        ("/d/btad/01/test/ko/0000.bmp", "01"),
        ("/d/mvtec/metal_nut/test/good/000.png", "metal_nut"),
        ("rel/pipe_fryum/test/bad/1.png", "pipe_fryum"),
    ],
)
def test_reference_class_name_is_the_fourth_component_from_the_end(path: str, name: str) -> None:
    assert reference_class_name(path) == path.split("/")[-4] == name


def test_reference_class_name_needs_four_components() -> None:
    with pytest.raises(DataError, match="data.class_name"):
        reference_class_name("test/good/0.png")


@pytest.mark.parametrize(
    ("key", "kw"), [("data.class_name", "class_name"), ("data.mask_resize", "mask_resize")]
)
def test_bad_values_name_the_key(tree: Path, key: str, kw: str) -> None:
    samples = read("mvtec", tree)
    with pytest.raises(ValueError, match=key):
        ZSADDataset(samples, 4, MEAN, STD, **{kw: "bogus"})
    with pytest.raises(ValueError, match=key):
        ZSADDataModule(None, [], 4, MEAN, STD, **{kw: "bogus"})
    with pytest.raises(ConfigError, match=f"{key}.*bogus.*expected one of"):
        compose(overrides=["method=ava_dino", f"{key}=bogus"])


def test_defaults_are_unchanged() -> None:
    cfg = compose(overrides=["method=ava_dino"])
    assert cfg.data.class_name == "cleaned" and cfg.data.mask_resize == "float"


def test_run_config_reaches_the_loaders(tree: Path) -> None:
    from zsad.run import build_datamodule

    cfg = compose(
        overrides=[
            "method=ava_dino",
            "data.class_name=reference_path",
            "data.mask_resize=uint8",
            "data.test_batch_size=2",
            f"data.test=[{{name: mvtec, root: '{tree}'}}]",
        ]
    )
    model = SimpleNamespace(input_size=4, mean=MEAN, std=STD, interpolation="bilinear")
    dm = build_datamodule(cfg, SimpleNamespace(model=model), with_train=False)
    batch = next(iter(dm.test_dataloader()[0]))
    assert batch.class_name == ["metal_nut", "metal_nut"]
    assert (batch.mask[1, 0].numpy() == resize_mask(_half_mask(), 4, "uint8")).all()
