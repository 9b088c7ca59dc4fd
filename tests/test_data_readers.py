"""Readers: tiny trees in each real layout read back to the right counts, labels, masks and class names; every
kind of bad input stops with a message naming the file and the expected layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_modules.errors import DataError
from data_modules.meta import write_meta
from data_modules.readers import READERS, dataset_info, read, read_with_report, tasks_of
from data_modules.readers._common import clean_class_name
from data_modules.types import Sample


def img(path: Path, value: int = 100, size: tuple[int, int] = (8, 8)) -> Path:
    """Write a tiny RGB image (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def mask(path: Path, fg: int = 255, empty: bool = False, size: tuple[int, int] = (8, 8)) -> Path:
    """Write a tiny mask with a 2×2 foreground square (or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0]), np.uint8)
    if not empty:
        arr[2:4, 2:4] = fg
    Image.fromarray(arr).save(path)
    return path


def by_name(samples: list[Sample]) -> dict[str, Sample]:
    return {s.image_path.name: s for s in samples}


def mvtec_tree(root: Path, cat: str = "metal_nut") -> Path:
    c = root / cat
    img(c / "train" / "good" / "000.png")
    img(c / "test" / "good" / "000.png")
    img(c / "test" / "good" / "001.PNG")
    (c / "test" / "good" / ".DS_Store").write_bytes(b"\0")
    img(c / "test" / "scratch" / "000.png")
    img(c / "test" / "scratch" / "002.png")  # no 001: pairing by position would shift
    mask(c / "ground_truth" / "scratch" / "000_mask.png", fg=255)
    mask(c / "ground_truth" / "scratch" / "001_mask.png", fg=255)  # stray mask without image
    mask(c / "ground_truth" / "scratch" / "002_mask.png", fg=9)
    (root / "license.txt").write_text("x")
    return root


# ------------------------------------------------------------------------------------------------ good layouts


def test_mvtec_layout_counts_labels_masks_by_name(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = mvtec_tree(tmp_path / "mvtec")
    img(root / "bottle" / "test" / "good" / "000.png")
    with caplog.at_level(logging.INFO, logger="data_modules"):
        samples = read("mvtec", root)
    assert [s.category for s in samples] == ["bottle"] + ["metal_nut"] * 4
    scratches = [x for x in samples if x.defect_type == "scratch"]
    assert {x.image_path.stem: x.mask_path.name for x in scratches} == {
        "000": "000_mask.png",
        "002": "002_mask.png",
    }
    assert all(x.label == 1 and x.image_path.is_absolute() and x.mask_path.is_absolute() for x in scratches)
    normals = [x for x in samples if x.label == 0]
    assert len(normals) == 3 and all(x.mask_path is None and x.defect_type == "good" for x in normals)
    assert {x.class_name for x in samples} == {"bottle", "metal nut"}
    assert "skipped 1 hidden file(s)" in caplog.text
    assert read("mvtec", root, ["metal_nut"])[0].category == "metal_nut"


def test_mpdd_dtd_and_generic_folder_share_the_layout(tmp_path: Path) -> None:
    root = mvtec_tree(tmp_path / "d", cat="Woven_001")
    for name in ("mpdd", "dtd", "folder"):
        samples = read(name, root)
        assert len(samples) == 4 and sum(s.label for s in samples) == 2
        assert {s.dataset for s in samples} == {name} and samples[0].class_name == "woven"
    # A generic folder without any ground_truth is image-only (and says so), not an error.
    bare = tmp_path / "bare"
    img(bare / "cup" / "test" / "good" / "a.jpg")
    img(bare / "cup" / "test" / "broken" / "b.JPG")
    samples, report = read_with_report("folder", bare)
    assert [s.label for s in samples] == [1, 0] and all(s.mask_path is None for s in samples)
    assert tasks_of("folder", samples) == (False, True) and "image-level labels only" in report.summary(
        "f", samples
    )


def test_visa_csv_small_integer_masks_and_class_names(tmp_path: Path) -> None:
    root = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    for cat in ("macaroni1", "pcb4"):
        img(root / cat / "Data" / "Images" / "Normal" / "0000.JPG")
        img(root / cat / "Data" / "Images" / "Anomaly" / "000.JPG")
        mask(root / cat / "Data" / "Masks" / "Anomaly" / "000.png", fg=1)
        rows += [
            f"{cat},train,normal,{cat}/Data/Images/Normal/0000.JPG,",
            f"{cat},test,normal,{cat}/Data/Images/Normal/0000.JPG,",
            f"{cat},test,anomaly,{cat}/Data/Images/Anomaly/000.JPG,{cat}/Data/Masks/Anomaly/000.png",
        ]
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    samples = read("visa", root)
    assert [(s.category, s.label) for s in samples] == [
        ("macaroni1", 0),
        ("macaroni1", 1),
        ("pcb4", 0),
        ("pcb4", 1),
    ]
    assert [s.class_name for s in samples] == ["macaroni", "macaroni", "pcb", "pcb"]
    assert samples[1].mask_path.name == "000.png" and samples[0].mask_path is None
    assert [s.category for s in read("visa", root, ["pcb4"])] == ["pcb4", "pcb4"]


def test_btad_ok_ko_mixed_extensions(tmp_path: Path) -> None:
    root = tmp_path / "btad"
    img(root / "01" / "test" / "ok" / "0000.bmp")
    img(root / "01" / "test" / "ko" / "0001.bmp")
    mask(root / "01" / "ground_truth" / "ko" / "0001.png")
    img(root / "03" / "test" / "ko" / "0000.png")
    mask(root / "03" / "ground_truth" / "ko" / "0000.bmp")
    samples = read("btad", root)
    assert [(s.category, s.label, s.defect_type) for s in samples] == [
        ("01", 1, "ko"),
        ("01", 0, "good"),
        ("03", 1, "ko"),
    ]
    assert samples[0].mask_path.name == "0001.png" and samples[2].mask_path.name == "0000.bmp"
    assert samples[0].class_name == "product"


def test_ksdd2_and_sdd_labels_come_from_mask_content(tmp_path: Path) -> None:
    k = tmp_path / "ksdd2"
    img(k / "test" / "10000.png")
    mask(k / "test" / "10000_GT.png", empty=True)
    img(k / "test" / "10001.png")
    mask(k / "test" / "10001_GT.png")
    s = by_name(read("ksdd2", k))
    assert (s["10000.png"].label, s["10000.png"].mask_path) == (0, None)
    assert s["10001.png"].label == 1 and s["10001.png"].mask_path.name == "10001_GT.png"
    assert s["10001.png"].class_name == "metal surface" and len(s) == 2

    d = tmp_path / "sdd"
    img(d / "kos01" / "Part0.jpg")
    mask(d / "kos01" / "Part0_label.bmp", empty=True)
    img(d / "kos02" / "Part5.jpg")
    mask(d / "kos02" / "Part5_label.bmp", fg=1)
    samples = read("sdd", d)
    assert [s.label for s in samples] == [0, 1] and samples[1].mask_path.name == "Part5_label.bmp"


def test_dagm_label_files_mark_anomalies_natural_class_order(tmp_path: Path) -> None:
    root = tmp_path / "dagm"
    for cls in ("Class1", "Class2", "Class10"):
        img(root / cls / "Train" / "0001.PNG")
        img(root / cls / "Test" / "0002.PNG")
        mask(root / cls / "Test" / "Label" / "0002_label.PNG")
        (root / cls / "Test" / "Label" / "Labels.txt").write_text("meta")
    samples, report = read_with_report("dagm", root)
    assert [s.category for s in samples[::2]] == ["Class1", "Class2", "Class10"]
    assert [s.label for s in samples[:2]] == [0, 1] and samples[1].mask_path.name == "0002_label.PNG"
    assert samples[0].class_name == "textured surface" and report.non_image == 3


def test_mvtec_ad2_test_public(tmp_path: Path) -> None:
    root = tmp_path / "mvtec2"
    c = root / "fruit_jelly" / "test_public"
    img(c / "good" / "000_regular.png")
    img(c / "bad" / "001_overexposed.png")
    mask(c / "ground_truth" / "bad" / "001_overexposed_mask.png")
    samples = read("mvtec2", root)
    assert [(s.label, s.defect_type) for s in samples] == [(1, "bad"), (0, "good")]
    assert samples[0].mask_path.name == "001_overexposed_mask.png" and samples[0].class_name == "fruit jelly"


def test_image_only_medical_sets(tmp_path: Path) -> None:
    h = tmp_path / "headct"
    img(h / "head_ct" / "000.png")
    img(h / "head_ct" / "001.png")
    (h / "labels.csv").write_text("id, hemorrhage\n0,1\n1,0\n")
    samples = read("headct", h)
    assert [s.label for s in samples] == [1, 0] and all(s.mask_path is None for s in samples)
    assert (
        samples[0].class_name == "brain" and not dataset_info("headct").pixel and dataset_info("headct").image
    )
    for name in ("brainmri", "br35h"):
        b = tmp_path / name
        img(b / "no" / "1 no.jpeg")
        img(b / "yes" / "Y1.JPG")
        img(b / "pred" / "pred0.jpg")  # Br35H's unlabelled folder is not read
        samples = read(name, b)
        assert [s.label for s in samples] == [0, 1] and samples[1].class_name == "brain"


def test_pixel_only_medical_sets(tmp_path: Path) -> None:
    names = {"colondb": ("images", "masks"), "kvasir": ("images", "masks"), "endo": ("images", "masks")}
    names |= {"clinicdb": ("images", "masks"), "tn3k": ("test-image", "test-mask")}
    for name, (im, ms) in names.items():
        root = tmp_path / name
        img(root / im / "2.png")
        img(root / im / "10.png")
        mask(root / ms / "10.png")
        mask(root / ms / "2.png", fg=1)
        samples = read(name, root)
        assert [s.image_path.name for s in samples] == ["2.png", "10.png"]
        assert [s.mask_path.name for s in samples] == ["2.png", "10.png"] and {s.label for s in samples} == {
            1
        }
        assert dataset_info(name).image is False and dataset_info(name).pixel
    assert read("tn3k", tmp_path / "tn3k")[0].class_name == "thyroid nodule"
    assert read("kvasir", tmp_path / "kvasir")[0].class_name == "colon polyp"
    isic = tmp_path / "isic"
    img(isic / "ISBI2016_ISIC_Part1_Test_Data" / "ISIC_0000003.jpg")
    mask(isic / "ISBI2016_ISIC_Part1_Test_GroundTruth" / "ISIC_0000003_Segmentation.png")
    (s,) = read("isic", isic)
    assert (
        s.mask_path.name == "ISIC_0000003_Segmentation.png" and s.class_name == "skin lesion" and s.label == 1
    )


def test_meta_json_and_write_meta_round_trip(tmp_path: Path) -> None:
    root = mvtec_tree(tmp_path / "m", cat="pcb4")
    meta = {
        "test": {
            "pcb4": [
                {
                    "img_path": "pcb4/test/scratch/000.png",
                    "mask_path": "pcb4/ground_truth/scratch/000_mask.png",
                    "cls_name": "pcb4",
                    "specie_name": "scratch",
                    "anomaly": 1,
                },
                {
                    "img_path": "pcb4/test/good/000.png",
                    "mask_path": "",
                    "cls_name": "pcb4",
                    "specie_name": "good",
                    "anomaly": 0,
                },
            ]
        },
        "train": {"pcb4": []},
    }
    (root / "meta.json").write_text(json.dumps(meta))
    samples = read("meta", root)
    assert [(s.label, s.class_name, s.category) for s in samples] == [(1, "pcb", "pcb4"), (0, "pcb", "pcb4")]
    assert samples[0].mask_path == (root / "pcb4/ground_truth/scratch/000_mask.png").resolve()

    original = read("mvtec", root)
    out = write_meta(original, tmp_path / "m", tmp_path / "elsewhere" / "meta.json")
    written = json.loads(out.read_text())
    assert all(not Path(it["img_path"]).is_absolute() for it in written["test"]["pcb4"])
    back = read("meta", out)

    def strip(ss: list[Sample]) -> list[tuple]:
        return [(s.category, s.image_path, s.mask_path, s.label, s.defect_type, s.class_name) for s in ss]

    assert strip(back) == strip(original)


def test_clean_class_names() -> None:
    assert clean_class_name("macaroni1") == "macaroni"
    assert clean_class_name("pipe_fryum") == "pipe fryum"
    assert clean_class_name("Woven_127") == "woven"
    assert clean_class_name("01") == ""


def test_registry_lists_every_family() -> None:
    expected = {
        "mvtec",
        "visa",
        "mpdd",
        "btad",
        "ksdd2",
        "sdd",
        "dagm",
        "dtd",
        "mvtec2",
        "headct",
        "brainmri",
        "br35h",
        "isic",
        "colondb",
        "clinicdb",
        "kvasir",
        "endo",
        "tn3k",
        "meta",
        "folder",
        "synthetic_textures",
        "synthetic_objects",
    }
    assert expected <= set(READERS)
    assert dataset_info("meta").pixel is None and dataset_info("MVTec").pixel is True


# -------------------------------------------------------------------------------------------------- bad input


def test_missing_root_and_wrong_layout_say_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist; expected .*ground_truth"):
        read("mvtec", tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    img(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match=r"no category folder with a 'test' sub-folder .* expected"):
        read("mvtec", tmp_path / "flat")
    with pytest.raises(DataError, match=r"1cls\.csv"):
        read("visa", tmp_path / "flat")
    with pytest.raises(DataError, match="masks"):
        read("kvasir", tmp_path / "flat")
    with pytest.raises(DataError, match="known readers"):
        read("imagenet", tmp_path)


def test_anomalous_image_without_mask(tmp_path: Path) -> None:
    root = mvtec_tree(tmp_path / "m")
    img(root / "metal_nut" / "test" / "scratch" / "003.png")
    with pytest.raises(DataError, match=r"003\.png has no ground-truth mask.*003_mask\.png"):
        read("mvtec", root)
    k = tmp_path / "kv"
    img(k / "images" / "a.png")
    (k / "masks").mkdir()
    with pytest.raises(DataError, match=r"a\.png has no ground-truth mask"):
        read("kvasir", k)
    s = tmp_path / "ksdd2"
    img(s / "test" / "10002.png")
    with pytest.raises(DataError, match=r"10002\.png has no ground-truth file.*10002_GT"):
        read("ksdd2", s)


def test_visa_row_with_missing_mask_file(tmp_path: Path) -> None:
    root = tmp_path / "visa"
    img(root / "candle" / "a.JPG")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\ncandle,test,anomaly,candle/a.JPG,candle/m.png\n"
    )
    with pytest.raises(DataError, match=r"a\.JPG has no ground-truth mask; expected .*m\.png"):
        read("visa", root)


def test_meta_with_partial_masks_is_an_error(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    img(tmp_path / "b.png")
    mask(tmp_path / "a_mask.png")
    item = {"cls_name": "x", "specie_name": "d", "anomaly": 1}
    meta = {
        "test": {
            "x": [
                item | {"img_path": "a.png", "mask_path": "a_mask.png"},
                item | {"img_path": "b.png", "mask_path": ""},
            ]
        }
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"b\.png has an empty mask_path"):
        read("meta", tmp_path)


def test_empty_and_unknown_categories(tmp_path: Path) -> None:
    root = mvtec_tree(tmp_path / "m")
    (root / "zipper" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"category 'zipper' has no test images"):
        read("mvtec", root)
    with pytest.raises(DataError, match=r"\['carpet'\] not found.*available"):
        read("mvtec", root, ["carpet"])


# ------------------------------------------------------------------------------ variants of the real downloads


def test_isic_single_folder_ignores_training_and_superpixels(tmp_path: Path) -> None:
    root = tmp_path / "isic"
    img(root / "ISIC_0000003.jpg")
    mask(root / "ISIC_0000003_Segmentation.png")
    img(root / "ISIC_0000003_superpixels.png")
    img(root / "ISBI2016_ISIC_Part1_Training_Data" / "ISIC_0000000.jpg")  # no mask: would fail if read
    samples, report = read_with_report("isic", root)
    assert [(s.image_path.name, s.mask_path.name) for s in samples] == [
        ("ISIC_0000003.jpg", "ISIC_0000003_Segmentation.png")
    ]
    text = report.summary("isic", samples)
    assert "1 file(s) under training folders" in text and "1 *_superpixels" in text


def test_cvc_original_ground_truth_and_png_tif_copies(tmp_path: Path) -> None:
    orig = tmp_path / "clinic_orig"
    img(orig / "Original" / "1.tif")
    img(orig / "Original" / "2.tif")
    mask(orig / "Ground Truth" / "2.tif")
    mask(orig / "Ground Truth" / "1.tif")
    assert [(s.image_path.name, s.mask_path.name) for s in read("clinicdb", orig)] == [
        ("1.tif", "1.tif"),
        ("2.tif", "2.tif"),
    ]
    kaggle = tmp_path / "clinic_kaggle"
    for sub, ext in (("PNG", "png"), ("TIF", "tif")):
        img(kaggle / sub / "Original" / f"7.{ext}")
        mask(kaggle / sub / "Ground Truth" / f"7.{ext}")
    samples, report = read_with_report("colondb", kaggle)
    assert [s.mask_path.parent.parent.name for s in samples] == ["PNG"]  # one copy only, not both
    assert "ignored the other copy" in report.summary("colondb", samples)


def test_kvasir_jpeg_masks_and_tn3k_trainval_not_read(tmp_path: Path) -> None:
    k = tmp_path / "Kvasir-SEG"
    img(k / "images" / "cju0qkwl35piu0993l0dewei2.jpg")
    mask(k / "masks" / "cju0qkwl35piu0993l0dewei2.jpg")
    (k / "kavsir_bboxes.json").write_text("{}")
    (s,) = read("kvasir", k)
    assert s.mask_path.suffix == ".jpg" and s.label == 1
    t = tmp_path / "tn3k"
    img(t / "test-image" / "0000.jpg")
    mask(t / "test-mask" / "0000.jpg")
    img(t / "trainval-image" / "0001.jpg")
    mask(t / "trainval-mask" / "0001.jpg")
    assert [s.image_path.name for s in read("tn3k", t)] == ["0000.jpg"]


def test_wrong_segmentation_layout_says_what_it_found(tmp_path: Path) -> None:
    img(tmp_path / "c" / "Images" / "1.png")
    img(tmp_path / "c" / "GT" / "1.png")
    with pytest.raises(DataError, match=r"Original/ \+ <root>/Ground Truth/.*found: GT/, Images/"):
        read("clinicdb", tmp_path / "c")


def test_visa_csv_with_byte_order_mark(tmp_path: Path) -> None:
    root = tmp_path / "visa"
    img(root / "candle" / "Data" / "Images" / "Normal" / "0000.JPG")
    (root / "split_csv").mkdir(parents=True)
    text = "object,split,label,image,mask\ncandle,test,normal,candle/Data/Images/Normal/0000.JPG,\n"
    (root / "split_csv" / "1cls.csv").write_text("\ufeff" + text, encoding="utf-8")
    assert [(s.category, s.label) for s in read("visa", root)] == [("candle", 0)]


def test_mvtec_ad2_ignores_train_and_validation(tmp_path: Path) -> None:
    c = tmp_path / "mvtec2" / "can"
    img(c / "train" / "good" / "000_regular.png")
    img(c / "validation" / "good" / "000_regular.png")
    img(c / "test_private" / "000.png")
    img(c / "test_public" / "good" / "001_regular.png")
    img(c / "test_public" / "bad" / "002_regular.png")
    mask(c / "test_public" / "ground_truth" / "bad" / "002_regular_mask.png")
    samples = read("mvtec2", tmp_path / "mvtec2")
    assert sorted(s.image_path.relative_to(c).as_posix() for s in samples) == [
        "test_public/bad/002_regular.png",
        "test_public/good/001_regular.png",
    ]


def test_btad_png_category_and_train_not_read(tmp_path: Path) -> None:
    root = tmp_path / "BTech_Dataset_transformed"
    img(root / "02" / "train" / "ok" / "0000.png")
    img(root / "02" / "test" / "ok" / "0000.png")
    img(root / "02" / "test" / "ko" / "0001.png")
    mask(root / "02" / "ground_truth" / "ko" / "0001.png")
    samples = read("btad", root)
    assert [(s.label, s.image_path.parent.parent.name) for s in samples] == [(1, "test"), (0, "test")]
    assert samples[0].mask_path.name == "0001.png"


def test_surface_sets_unpacked_one_level_down(tmp_path: Path) -> None:
    k = tmp_path / "ksdd2_zip"
    img(k / "KolektorSDD2" / "train" / "20000.png")  # train has no _GT here: reading it would fail
    img(k / "KolektorSDD2" / "test" / "10001.png")
    mask(k / "KolektorSDD2" / "test" / "10001_GT.png")
    assert [s.label for s in read("ksdd2", k)] == [1]
    d = tmp_path / "sdd_zip"
    img(d / "KolektorSDD" / "kos10" / "Part0.jpg")
    mask(d / "KolektorSDD" / "kos10" / "Part0_label.bmp", empty=True)
    (d / "KolektorSDD" / "kos10" / "Thumbs.db").write_bytes(b"\0")
    assert [s.label for s in read("sdd", d)] == [0]


def test_dagm_def_folders_and_lowercase_splits(tmp_path: Path) -> None:
    root = tmp_path / "DAGM_KaggleUpload"
    img(root / "Class1" / "train" / "0001.PNG")
    mask(root / "Class1" / "train" / "Label" / "0001_label.PNG")
    (root / "Class1" / "train" / "Label" / "Labels.txt").write_text("1\n1\t1\t0001.PNG\t0\t0001_label.PNG\n")
    img(root / "Class1_def" / "1.png")
    samples, report = read_with_report("dagm", root)
    assert [(s.category, s.label) for s in samples] == [("Class1", 1)]
    assert "Class1_def" in report.summary("dagm", samples)
    img(root / "Class2" / "0001.PNG")  # development release: no Train/Test
    with pytest.raises(DataError, match=r"Class2 has no Train/ or Test/ folder"):
        read("dagm", root)


def test_medical_image_sets_as_unpacked_from_kaggle(tmp_path: Path) -> None:
    h = tmp_path / "headct"
    img(h / "head_ct" / "head_ct" / "000.png")
    img(h / "head_ct" / "head_ct" / "001.png")
    (h / "labels.csv").write_text("id, hemorrhage\n0, 1\n1, 0\n")
    assert [(s.image_path.name, s.label) for s in read("headct", h)] == [("000.png", 1), ("001.png", 0)]
    nested = tmp_path / "brain_zip"
    img(nested / "brain_tumor_dataset" / "no" / "1 no.jpeg")
    img(nested / "brain_tumor_dataset" / "yes" / "Y1.jpg")
    assert [s.label for s in read("brainmri", nested)] == [0, 1]
    both = tmp_path / "brain_full"  # the Kaggle archive holds the images twice
    for base in (both, both / "brain_tumor_dataset"):
        img(base / "no" / "N1.jpg")
        img(base / "yes" / "Y1.jpg")
    samples, report = read_with_report("brainmri", both)
    assert len(samples) == 2 and all(s.image_path.parent.parent == both.resolve() for s in samples)
    assert "brain_tumor_dataset/" in report.summary("brainmri", samples)
    br = tmp_path / "br35h"
    img(br / "no" / "no0.jpg")
    img(br / "yes" / "y0.jpg")
    img(br / "pred" / "pred0.jpg")
    samples, report = read_with_report("br35h", br)
    assert len(samples) == 2 and "not read (no label): pred/" in report.summary("br35h", samples)


def test_meta_json_capital_split_key_and_absolute_paths(tmp_path: Path) -> None:
    a = img(tmp_path / "data" / "Class1" / "Test" / "0001.PNG")
    m = mask(tmp_path / "data" / "Class1" / "Test" / "Label" / "0001_label.PNG")
    item = {"img_path": str(a), "mask_path": str(m), "cls_name": "Class1", "specie_name": "", "anomaly": 1}
    (tmp_path / "meta.json").write_text(json.dumps({"Train": {"Class1": []}, "Test": {"Class1": [item]}}))
    (s,) = read("meta", tmp_path)
    assert s.image_path == a.resolve() and s.mask_path == m.resolve() and s.defect_type == "anomaly"
