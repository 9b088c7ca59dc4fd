"""The synthetic benchmark: deterministic, pixel-exact masks, MVTec layout, regenerated only when options change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_modules.errors import DataError
from data_modules.readers import read
from data_modules.synthetic import (
    DOMAIN_DIRS,
    DOMAINS,
    SynthOptions,
    categories,
    contact_sheet,
    ensure_synthetic,
    generate_synthetic,
    render_item,
)

SMALL = SynthOptions(size=32, n_test=4, n_train=1)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = _files(generate_synthetic(tmp_path / "a", SMALL, False))
    b = _files(generate_synthetic(tmp_path / "b", SMALL, False))
    c = _files(generate_synthetic(tmp_path / "c", SynthOptions(seed=1, size=32, n_test=4, n_train=1), False))
    assert a == b and len(a) > 0
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a) == len(a)  # every image changes with the seed


def test_masks_are_exactly_the_changed_pixels() -> None:
    for domain in DOMAIN_DIRS:
        for cat, defects in categories(domain).items():
            for i, defect in enumerate(defects):
                image, mask, clean = render_item(domain, cat, "test", i, seed=3, size=48, defect=defect)
                changed = (image != clean).any(axis=2)
                assert mask.any(), (domain, cat, defect)
                np.testing.assert_array_equal(changed, mask, err_msg=f"{domain}/{cat}/{defect}")
            normal, nmask, nclean = render_item(domain, cat, "test", 0, seed=3, size=48, defect=None)
            assert not nmask.any() and np.array_equal(normal, nclean)
            # the clean rendering of an anomalous item is the same item's rendering without a defect
            assert np.array_equal(render_item(domain, cat, "test", 0, 3, 48, defects[0])[2], nclean)


def test_layout_is_readable_and_masks_match_labels(tmp_path: Path) -> None:
    out = generate_synthetic(tmp_path / "s", SMALL, False)
    all_defects = set()
    for domain in DOMAIN_DIRS:
        samples = read(f"synthetic_{domain}", out)
        assert len({s.category for s in samples}) >= 4 and len(samples) == 4 * len(categories(domain))
        assert read(f"synthetic_{domain}", out / domain) == samples  # the domain folder works as root too
        for s in samples:
            if s.label:
                m = np.asarray(Image.open(s.mask_path)) > 0
                assert m.any() and m.shape == (32, 32)
                all_defects.add(s.defect_type)
            else:
                assert s.mask_path is None and s.defect_type == "good"
        assert sum(s.label for s in samples) == 2 * len(categories(domain))
        assert len(list((out / domain).glob("*/train/good/*.png"))) == len(categories(domain))
    assert len(all_defects) >= 5
    assert all(read(name, out / folder) == read(name, out) for name, folder in DOMAINS.items())
    assert {s.class_name for s in read("synthetic_objects", out)} >= {"metal nut", "pill"}


def test_ensure_regenerates_only_when_options_change(tmp_path: Path) -> None:
    out = tmp_path / "s"
    ensure_synthetic(out, seed=0, size=32, n_test=2, n_train=0, show_progress=False)
    marker = out / "textures" / "carpet" / "test" / "good" / "000.png"
    stamp = marker.stat().st_mtime_ns
    ensure_synthetic(out, seed=0, size=32, n_test=2, n_train=0, show_progress=False)
    assert marker.stat().st_mtime_ns == stamp  # nothing rewritten
    ensure_synthetic(out, seed=0, size=32, n_test=4, n_train=0, show_progress=False)
    assert len(list((out / "textures" / "carpet" / "test").rglob("*.png"))) == 4
    assert json.loads((out / "manifest.json").read_text())["options"]["n_test"] == 4
    foreign = tmp_path / "foreign"
    (foreign / "textures").mkdir(parents=True)
    with pytest.raises(DataError, match="manifest"):
        ensure_synthetic(foreign, show_progress=False)


def test_contact_sheet(tmp_path: Path) -> None:
    out = generate_synthetic(tmp_path / "s", SMALL, False)
    png = contact_sheet(out, tmp_path / "sheet.png", per_category=4)
    sheet = np.asarray(Image.open(png))
    n_rows = sum(len(categories(d)) for d in DOMAIN_DIRS)
    assert sheet.shape == (n_rows * 36, 4 * 36, 3)
    assert ((sheet[..., 0] == 255) & (sheet[..., 1] == 0) & (sheet[..., 2] == 0)).any()  # mask outlines drawn
