"""The functional metrics against the reference test vectors, scikit-learn and brute-force re-implementations."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from zsad.metrics import (
    METRIC_KEYS,
    aupro,
    aupro_legacy,
    auroc,
    average_precision,
    binary_metrics,
    connected_components,
    evaluate,
    f1_max,
    pixel_metrics,
)

# The reference vectors live beside the repository (../shared/testvectors), not in it; ZSAD_TESTVECTORS overrides.
VECTORS = Path(
    os.environ.get(
        "ZSAD_TESTVECTORS", Path(__file__).resolve().parents[2] / "shared" / "testvectors" / "metrics"
    )
)
if not (VECTORS / "expected.json").is_file():  # a missing reference is a failure, never a silent skip
    raise FileNotFoundError(
        f"metric reference vectors not found at {VECTORS}; set ZSAD_TESTVECTORS to their folder"
    )
EXPECTED = json.loads((VECTORS / "expected.json").read_text())
DETAILS = json.loads((VECTORS / "details.json").read_text())
KEY_MAP = {"aupro_mvtec_0.3": "pixel_aupro", "aupro_zsad_legacy": "pixel_aupro_legacy"}
CASES = sorted(EXPECTED)


def _load(case: str) -> dict[str, np.ndarray]:
    with np.load(VECTORS / f"{case}.npz") as z:
        return {k: z[k] for k in z.files}


def _assert_matches(result: dict, expected: dict, tol: float = 1e-6) -> None:
    for key, want in expected.items():
        got = result[KEY_MAP.get(key, key)]
        if want is None:
            assert got is None, f"{key}: expected null, got {got}"
        else:
            assert got is not None and abs(got - want) <= tol, f"{key}: got {got}, expected {want}"


# --------------------------------------------------------------------------------------------- reference vectors
@pytest.mark.parametrize("case", CASES)
def test_reference_vectors_numpy(case: str) -> None:
    z = _load(case)
    result = evaluate(z["maps"], z["masks"], z["scores"], z["labels"])
    assert set(result) == set(METRIC_KEYS)
    assert all(v is None or type(v) is float for v in result.values())
    _assert_matches(result, EXPECTED[case])


@pytest.mark.parametrize("case", CASES)
def test_reference_vectors_torch_small_chunks_float64(case: str) -> None:
    """Chunk boundaries inside tie groups, the float64 (unpacked) sort path and torch inputs change nothing."""
    z = {k: torch.from_numpy(v) for k, v in _load(case).items()}
    result = evaluate(z["maps"].double(), z["masks"], z["scores"], z["labels"].bool(), chunk_size=97)
    _assert_matches(result, EXPECTED[case])


def test_torch_and_numpy_paths_agree() -> None:
    z = _load("case7_logits")
    from_numpy = evaluate(z["maps"], z["masks"], z["scores"], z["labels"])
    from_torch = evaluate(*(torch.from_numpy(z[k]) for k in ("maps", "masks", "scores", "labels")))
    for key in METRIC_KEYS:
        assert from_numpy[key] == pytest.approx(from_torch[key], abs=1e-12)


@pytest.mark.parametrize("case", ["case1_small_random", "case2_ties", "case7_logits"])
def test_regions_are_8_connected(case: str) -> None:
    z = _load(case)
    labels, n = connected_components(z["masks"])
    assert n == DETAILS[case]["regions"]["n_regions_8conn"]
    assert n != DETAILS[case]["regions"]["n_regions_4conn"]
    # a region never spans two images
    for r in range(1, n + 1):
        assert len(np.unique(np.nonzero(labels == r)[0])) == 1
    wrong = DETAILS[case]["connectivity_4_variants"]
    result = pixel_metrics(z["maps"], z["masks"])
    assert abs(result["pixel_aupro"] - wrong["aupro_mvtec_0.3"]) > 1e-3
    assert abs(result["pixel_aupro_legacy"] - wrong["aupro_zsad_legacy"]) > 1e-3


def test_raw_logits_are_not_squashed() -> None:
    """Case 7 spans [-20, 30]: a float32 sigmoid would create ties and move the metrics (details.json)."""
    z = _load("case7_logits")
    result = evaluate(z["maps"], z["masks"], z["scores"], z["labels"])
    squashed = DETAILS["case7_logits"]["if_float32_sigmoid_applied"]
    assert abs(result["image_auroc"] - squashed["image_auroc"]) > 1e-2
    assert abs(result["pixel_ap"] - squashed["pixel_ap"]) > 1e-3


def test_single_metric_functions_match_evaluate() -> None:
    z = _load("case1_small_random")
    exp = EXPECTED["case1_small_random"]
    assert auroc(z["scores"], z["labels"]) == pytest.approx(exp["image_auroc"], abs=1e-9)
    assert average_precision(z["maps"], z["masks"]) == pytest.approx(exp["pixel_ap"], abs=1e-9)
    assert f1_max(z["maps"], z["masks"]) == pytest.approx(exp["pixel_f1max"], abs=1e-9)
    assert aupro(z["maps"], z["masks"]) == pytest.approx(exp["aupro_mvtec_0.3"], abs=1e-9)
    assert aupro_legacy(z["maps"], z["masks"]) == pytest.approx(exp["aupro_zsad_legacy"], abs=1e-9)


# --------------------------------------------------------------------------------------------- scikit-learn
def _sklearn_f1max(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmax(2 * p * r / (p + r)))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["continuous64", "continuous32", "heavy_ties", "all_tied_but_one"])
def test_binary_metrics_agree_with_sklearn(seed: int, kind: str) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    y = rng.random(n) < rng.uniform(0.05, 0.6)
    y[:2] = [True, False]
    if kind == "continuous64":
        s = rng.normal(size=n) * 5 + y
    elif kind == "continuous32":
        s = (rng.normal(size=n) + 0.8 * y).astype(np.float32)
    elif kind == "heavy_ties":
        s = rng.integers(-2, 3, size=n) + y * rng.integers(0, 2, size=n)
    else:
        s = np.zeros(n, dtype=np.float32)
        s[int(rng.integers(n))] = 1.0
    for chunk in (3, 1 << 22):
        got = binary_metrics(s, y, chunk_size=chunk)
        assert got["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert got["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert got["f1max"] == pytest.approx(_sklearn_f1max(y, s), abs=1e-12)


def test_negative_zero_ties_with_zero() -> None:
    scores = np.array([-0.0, 0.0, 1.0, -1.0], dtype=np.float32)
    labels = np.array([0, 1, 1, 0])
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auroc(scores, labels) == pytest.approx(0.875)


def test_float32_order_over_the_whole_range() -> None:
    """Huge, subnormal, negative and signed-zero float32 scores keep their order and ties (packed sort keys)."""
    base = np.array([-3e30, -1.5, -1e-40, -0.0, 0.0, 1e-45, 2.5, 3e30], dtype=np.float32)
    rng = np.random.default_rng(0)
    scores = rng.choice(base, size=300)
    labels = rng.random(300) < 0.4
    got = binary_metrics(scores, labels, chunk_size=17)
    assert got["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert got["f1max"] == pytest.approx(_sklearn_f1max(labels, scores), abs=1e-12)


def test_undefined_values_are_none() -> None:
    s = np.array([0.1, 0.5, 0.9])
    assert binary_metrics(s, np.zeros(3)) == {"auroc": None, "ap": None, "f1max": None}
    only_pos = binary_metrics(s, np.ones(3))
    assert only_pos["auroc"] is None and only_pos["ap"] == 1.0 and only_pos["f1max"] == 1.0
    maps = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    none_pixel = evaluate(maps, np.zeros((3, 8, 8), np.uint8), s, np.zeros(3))
    assert all(v is None for v in none_pixel.values())
    image_only = evaluate(maps, None, s, np.array([0, 1, 1]))
    assert image_only["image_auroc"] == 1.0
    assert all(image_only[k] is None for k in METRIC_KEYS if k.startswith("pixel_"))
    all_anomalous = pixel_metrics(maps, np.ones((3, 8, 8), np.uint8))
    assert all_anomalous["pixel_auroc"] is None and all_anomalous["pixel_aupro"] is None
    assert all_anomalous["pixel_ap"] == 1.0


def test_bad_inputs_are_rejected_with_clear_errors() -> None:
    maps = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="masks must hold only 0 and 1"):
        pixel_metrics(maps, np.full((2, 4, 4), 255, np.uint8))
    with pytest.raises(ValueError, match="masks must have the shape of maps"):
        pixel_metrics(maps, np.zeros((2, 5, 4), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="scores have 3 elements but labels have 2"):
        auroc(np.zeros(3), np.array([0, 1]))
    with pytest.raises(ValueError, match="maps hold 2 images but scores have 3"):
        evaluate(maps, None, np.zeros(3), np.array([0, 1, 1]))


# --------------------------------------------------------------------------------------------- AUPRO brute force
def _brute_curve(maps: np.ndarray, masks: np.ndarray, thresholds: np.ndarray, strict: bool):
    """FPR and PRO at each threshold, one full pass per threshold (slow, obviously correct)."""
    # Independent labeller: scikit-image, one image at a time (default connectivity = 8 in 2-D).
    labels = np.zeros(masks.shape, np.int64)
    n = 0
    for i, m in enumerate(masks):
        lab, k = measure.label(m, return_num=True)
        labels[i] = np.where(lab > 0, lab + n, 0)
        n += k
    sizes = np.bincount(labels.ravel())[1:]
    normal = masks == 0
    fpr, pro = [], []
    for t in thresholds:
        pred = maps > t if strict else maps >= t
        fpr.append((pred & normal).sum() / normal.sum())
        pro.append(np.mean(np.bincount(labels[pred], minlength=n + 1)[1:] / sizes))
    return np.array(fpr), np.array(pro)


def _brute_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    fpr, pro = _brute_curve(maps, masks, np.unique(maps)[::-1], strict=False)
    x, y = np.r_[0.0, fpr], np.r_[0.0, pro]
    area = 0.0
    for i in range(1, len(x)):
        if x[i] <= limit:
            area += (x[i] - x[i - 1]) * (y[i] + y[i - 1]) / 2
        elif x[i - 1] < limit:
            y_lim = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
            area += (limit - x[i - 1]) * (y[i - 1] + y_lim) / 2
    return area / limit


def _brute_legacy(maps: np.ndarray, masks: np.ndarray) -> float:
    lo, hi = float(maps.min()), float(maps.max())
    fpr, pro = _brute_curve(maps, masks, np.arange(lo, hi, (hi - lo) / 200), strict=True)
    keep = fpr < 0.3
    f = fpr[keep]
    return float(auc((f - f.min()) / (f.max() - f.min()), pro[keep]))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("quantised", [False, True])
def test_aupro_matches_brute_force(seed: int, quantised: bool) -> None:
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 24, 24), np.uint8)
    masks[0, 3:8, 3:9] = 1
    masks[0, 8:11, 9:12] = 1  # touches the first block only diagonally
    masks[2, 10:20, 5:7] = 1
    masks[3, rng.integers(0, 24, 15), rng.integers(0, 24, 15)] = 1
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    if quantised:  # quantised maps: heavy ties across normal and anomalous pixels
        maps = np.round(maps * 2) / 2
    maps = maps.astype(np.float32)
    result = pixel_metrics(maps, masks, chunk_size=101)
    assert result["pixel_aupro"] == pytest.approx(_brute_aupro(maps.astype(np.float64), masks), abs=1e-9)
    assert result["pixel_aupro_legacy"] == pytest.approx(
        _brute_legacy(maps.astype(np.float64), masks), abs=1e-9
    )
    flat = binary_metrics(maps, masks)
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert result["pixel_ap"] == pytest.approx(flat["ap"], abs=1e-12)
    assert result["pixel_f1max"] == pytest.approx(flat["f1max"], abs=1e-12)


def test_legacy_undefined_on_constant_map() -> None:
    z = _load("case4_constant_map")
    assert aupro_legacy(z["maps"], z["masks"]) is None
    assert aupro(z["maps"], z["masks"]) == pytest.approx(0.15, abs=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES)
def test_cuda_matches_reference(case: str) -> None:
    z = {k: torch.from_numpy(v).cuda() for k, v in _load(case).items()}
    _assert_matches(evaluate(z["maps"], z["masks"], z["scores"], z["labels"], chunk_size=997), EXPECTED[case])
