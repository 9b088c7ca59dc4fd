"""Image and mask decoding: every file format the datasets ship comes back as uint8 RGB / bool masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_modules.errors import DataError
from data_modules.imageio import image_size, is_image_file, load_image, load_mask


def _save(arr: np.ndarray, path: Path, mode: str | None = None) -> Path:
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    img.save(path)
    return path


def test_16bit_grayscale_image_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    assert (out[..., 0] == out[..., 2]).all()


def test_palette_rgba_and_grayscale_images(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2] = (200, 10, 30)
    rgb[2:] = (5, 120, 250)
    pal = tmp_path / "pal.png"
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(pal)
    assert Image.open(pal).mode == "P"
    np.testing.assert_array_equal(load_image(pal), rgb)

    rgba = np.dstack([rgb, np.full((4, 4), 7, np.uint8)])
    np.testing.assert_array_equal(load_image(_save(rgba, tmp_path / "a.png")), rgb)

    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    out = load_image(_save(gray, tmp_path / "g.png"))
    assert out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out[..., 1], gray)


def test_masks_foreground_is_any_nonzero_value(tmp_path: Path) -> None:
    small = np.array([[0, 1], [2, 0]], np.uint8)  # VisA-style class ids
    np.testing.assert_array_equal(load_mask(_save(small, tmp_path / "v.png")), small > 0)
    m16 = np.array([[0, 1], [0, 65535]], np.uint16)
    Image.fromarray(m16).save(tmp_path / "m16.png")
    # The threshold applies to the raw 16-bit values: 1/65535 would round to 0 if it were scaled first.
    np.testing.assert_array_equal(load_mask(tmp_path / "m16.png"), [[False, True], [False, True]])
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "p.png"), [[False, True], [True, False]])
    alpha_only = np.zeros((2, 2, 4), np.uint8)
    alpha_only[0, 1, 3] = 255
    np.testing.assert_array_equal(
        load_mask(_save(alpha_only, tmp_path / "a.png")), [[False, True], [False, False]]
    )
    Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1").save(tmp_path / "b.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "b.png"), [[False, True]])


def test_jpeg_mask_ignores_compression_noise(tmp_path: Path) -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 255
    Image.fromarray(mask).save(tmp_path / "m.jpg", quality=60)
    raw = np.asarray(Image.open(tmp_path / "m.jpg"))
    assert ((raw > 0) & (mask == 0)).any()  # the file really has ringing around the square
    out = load_mask(tmp_path / "m.jpg")
    assert (out == (mask > 0)).mean() > 0.98


def test_truncated_and_non_image_files_name_the_file(tmp_path: Path) -> None:
    path = _save(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), tmp_path / "t.png")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"t\.png"):
        load_image(path)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(DataError, match="notes.png"):
        load_mask(bad)
    with pytest.raises(DataError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_header_size_and_extension_filter(tmp_path: Path) -> None:
    p = _save(np.zeros((5, 7, 3), np.uint8), tmp_path / "X.PNG")
    assert image_size(p) == (7, 5)
    assert is_image_file(p) and is_image_file(Path("a.JPG")) and is_image_file(Path("a.bmp"))
    assert not is_image_file(Path(".DS_Store")) and not is_image_file(Path("labels.txt"))
    assert not is_image_file(Path("._000.png"))
