"""Exact anomaly-detection metrics (``specs/protocol.md`` §3) as plain functions.

Every metric of one family comes from a single descending sort of the pooled scores: the sorted order is swept
once, in chunks, and the integrals of every curve (ROC, precision-recall, PRO, the legacy PRO grid) are
accumulated on the fly at the end of each tie group. Nothing of size "number of distinct thresholds" is kept, so
the peak memory is the sort itself (values + int64 order) plus one chunk, and the work runs on the device where
the inputs are. Counts and rates are accumulated in float64.

Inputs may be numpy arrays or torch tensors. Scores are used raw (no sigmoid, no clamping). Undefined values are
``None``: AUROC needs both classes, AP and F1-max a positive, AUPRO a ground-truth region and a normal pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import torch
from torch import Tensor

from zsad.results.schema import PIXEL_KEYS

ArrayLike = np.ndarray | Tensor

#: Elements of the sorted order processed per step of the sweep; bounds the temporaries (~60 B per element).
DEFAULT_CHUNK = 1 << 22

#: The FPR integration limit of the MVTec AUPRO.
FPR_LIMIT = 0.3


# 8-connectivity inside each image, no connection between images of the stack.
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8[1] = True


# --------------------------------------------------------------------------------------------- input handling
def _to_tensor(x: ArrayLike, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def _scores(x: ArrayLike, name: str) -> Tensor:
    """Flattened scores; float64 and integer inputs become float64, other floats float32 (exact widening)."""
    t = _to_tensor(x, name).reshape(-1)
    if t.dtype == torch.bool:
        raise TypeError(f"{name} must be numeric scores, got a bool array")
    t = t.double() if (t.dtype == torch.float64 or not t.is_floating_point()) else t.float()
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values; metrics need finite raw scores")
    return t


def _binary(x: ArrayLike, name: str, device: torch.device) -> Tensor:
    """Flattened ground truth as bool, checking that it only holds 0 and 1."""
    t = _to_tensor(x, name).reshape(-1).to(device)
    if t.dtype != torch.bool:
        if t.numel() and not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name} must hold only 0 and 1 (or bool)")
        t = t != 0
    return t


def _check_len(scores: Tensor, labels: Tensor, what: str) -> None:
    if scores.numel() != labels.numel():
        raise ValueError(f"{what}: scores have {scores.numel()} elements but labels have {labels.numel()}")


def _maps_and_masks(maps: ArrayLike, masks: ArrayLike) -> tuple[Tensor, Tensor]:
    m = _to_tensor(maps, "maps")
    g = _to_tensor(masks, "masks")
    if g.ndim == 4 and g.shape[1] == 1:
        g = g[:, 0]
    if m.ndim != 3:
        raise ValueError(f"maps must be [N, H, W], got shape {tuple(m.shape)}")
    if tuple(g.shape) != tuple(m.shape):
        raise ValueError(f"masks must have the shape of maps {tuple(m.shape)}, got {tuple(g.shape)}")
    return m, g


# --------------------------------------------------------------------------------------------- regions
def connected_components(masks: ArrayLike) -> tuple[np.ndarray, int]:
    """Labels the ground-truth regions of every image with 8-connectivity.

    Regions never span two images: the stack is labelled in one scipy call with a structure that connects only
    within a plane. This runs on the CPU on the binary masks; it is linear in the pixels and small next to the sort.

    Args:
        masks: [N, H, W] (or [N, 1, H, W]) with values in {0, 1}.

    Returns:
        int32 labels [N, H, W] (0 = normal, 1..R = regions, numbered across the stack) and R.
    """
    t = _to_tensor(masks, "masks")
    if t.ndim == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {tuple(t.shape)}")
    binary = _binary(t, "masks", t.device).reshape(t.shape).cpu().numpy()
    labels, n = scipy.ndimage.label(binary, structure=_STRUCTURE_8)
    return labels.astype(np.int32, copy=False), int(n)


def _region_weights(region_ids: Tensor, n_regions: int, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """float64 weight per region id so that summing weights over pixels gives the PRO (0 for id 0)."""
    flat = region_ids.reshape(-1)
    sizes = torch.zeros(n_regions + 1, dtype=torch.float64, device=flat.device)
    for a in range(0, flat.numel(), chunk_size):  # chunked: bincount widens its input to int64
        sizes += torch.bincount(flat[a : a + chunk_size], minlength=n_regions + 1)
    weights = torch.zeros_like(sizes)
    if n_regions:
        weights[1:] = 1.0 / (sizes[1:] * n_regions)
    return weights


# --------------------------------------------------------------------------------------------- the sweep
@dataclass
class CurveSums:
    """Integrals of one sweep over the sorted scores; ``None`` entries are undefined or not requested."""

    n_pos: int
    n_neg: int
    auroc: float | None
    ap: float | None
    f1max: float | None
    aupro: float | None = None
    aupro_legacy: float | None = None


class _Accumulator:
    """Accumulates the curve integrals over tie-group end points, fed in descending-threshold order.

    Each point carries cumulative true positives, false positives, the item count (TP + FP) and optionally the
    PRO mass. The previous point is carried across chunks, starting at the (0, 0) anchor.
    """

    def __init__(self, n_pos: int, n_neg: int, fpr_limit: float, device: torch.device) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.n_pos, self.n_neg, self.fpr_limit = n_pos, n_neg, fpr_limit
        self.prev_tp = self.prev_fp = self.prev_pro = zero
        self.roc = self.ap = self.pro_area = self.f1 = zero
        self.prev_fpr = 0.0  # host copy of the last point's FPR, to know when PRO no longer matters

    def add(self, tp: Tensor, fp: Tensor, count: Tensor, pro: Tensor | None) -> None:
        if tp.numel() == 0:
            return
        tp_prev = torch.cat([self.prev_tp[None], tp[:-1]])
        fp_prev = torch.cat([self.prev_fp[None], fp[:-1]])
        # Integer-valued float64 products: exact below 2**53, i.e. for any realistic pixel count.
        self.roc = self.roc + ((fp - fp_prev) * (tp + tp_prev)).sum()
        self.ap = self.ap + ((tp - tp_prev) * tp / count).sum()
        # 2PR/(P+R) simplifies to 2TP/(P_total + TP + FP); it is 0 (not NaN) where TP = 0.
        self.f1 = torch.maximum(self.f1, (tp / (count + self.n_pos)).max() * 2.0)
        if pro is not None:
            self._add_pro(fp, fp_prev, pro)
            self.prev_pro = pro[-1]
        self.prev_tp, self.prev_fp = tp[-1], fp[-1]
        self.prev_fpr = float(self.prev_fp) / self.n_neg

    def _add_pro(self, fp: Tensor, fp_prev: Tensor, pro: Tensor) -> None:
        lim = self.fpr_limit
        x, x0 = fp / self.n_neg, fp_prev / self.n_neg
        y0 = torch.cat([self.prev_pro[None], pro[:-1]])
        full = x <= lim
        self.pro_area = self.pro_area + torch.where(full, (x - x0) * (pro + y0), 0.0).sum() / 2
        # The one segment that crosses the limit contributes a partial trapezoid up to PRO interpolated at lim.
        cross = torch.nonzero((x0 < lim) & (x > lim)).squeeze(1)
        if cross.numel():
            xa, xb, ya, yb = x0[cross], x[cross], y0[cross], pro[cross]
            y_lim = ya + (yb - ya) * (lim - xa) / (xb - xa)
            self.pro_area = self.pro_area + ((lim - xa) * (ya + y_lim)).sum() / 2


class _LegacyGrid:
    """Cumulative FP count and PRO mass at fixed thresholds, with strict ``value > threshold``.

    Thresholds never resolved keep an infinite FP count: the sweep stops feeding the grid once the FPR passed the
    limit, and such thresholds are dropped by the FPR filter anyway.
    """

    def __init__(self, thresholds: Tensor) -> None:
        self.neg_thresholds = -thresholds
        self.fp = torch.full_like(thresholds, float("inf"))
        self.pro = torch.zeros_like(thresholds)
        self.done = torch.zeros(thresholds.shape, dtype=torch.bool, device=thresholds.device)

    def update(
        self, values: Tensor, fp: Tensor, pro: Tensor, carry_fp: Tensor, carry_pro: Tensor, last: bool
    ):
        # In descending order the items above a threshold form a prefix; count it within this chunk.
        n_above = torch.searchsorted(-values, self.neg_thresholds, side="left")
        ends_here = (n_above < values.numel()) | last
        new = ends_here & ~self.done
        pos = (n_above - 1).clamp(min=0)
        self.fp = torch.where(new, torch.where(n_above > 0, fp[pos], carry_fp), self.fp)
        self.pro = torch.where(new, torch.where(n_above > 0, pro[pos], carry_pro), self.pro)
        self.done |= new


def _legacy_thresholds(values: Tensor, n_steps: int) -> Tensor | None:
    """The reference's ``np.arange(min, max, (max - min) / n_steps)`` grid in float64, or None if empty."""
    lo, hi = float(values.min()), float(values.max())
    step = (hi - lo) / n_steps
    if step <= 0:
        return None
    return torch.from_numpy(np.arange(lo, hi, step, dtype=np.float64)).to(values.device)


def _legacy_area(grid: _LegacyGrid, n_neg: int, fpr_limit: float) -> float | None:
    fpr = grid.fp / n_neg
    keep = fpr < fpr_limit
    if int(keep.sum()) < 2:
        return None  # the reference's auc raises below two points
    f, p = fpr[keep], grid.pro[keep]
    span = f.max() - f.min()
    if float(span) == 0.0:
        return None  # the reference divides by zero and returns NaN
    rescaled = (f - f.min()) / span
    # Kept points run from high to low FPR; integrate in increasing FPR, as sklearn.metrics.auc does.
    return float(torch.trapezoid(p.flip(0), rescaled.flip(0)))


class _SortedPairs:
    """(score, target) pairs in descending score order, read chunk by chunk.

    float32 scores are packed with their target into one int64 key, an order-preserving integer image of the
    float in the high half and the target in the low half, and sorted as integers. Compared with a float sort
    plus a gather of the targets through the order, this avoids the random-access gather and lets torch use its
    integer radix sort; tied scores stay adjacent, which is all the sweep needs. float64 scores (which do not fit
    beside a target in 64 bits) use a float sort and a gather.
    """

    def __init__(self, scores: Tensor, targets: Tensor, chunk_size: int) -> None:
        self.packed = scores.dtype == torch.float32
        if self.packed:
            keys = torch.empty(scores.numel(), dtype=torch.int64, device=scores.device)
            for a in range(0, scores.numel(), chunk_size):
                keys[a : a + chunk_size] = _pack(scores[a : a + chunk_size], targets[a : a + chunk_size])
            self.keys = torch.sort(keys).values
        else:
            self.values, self.order = torch.sort(scores, descending=True)
            self.targets = targets

    def ties(self, a: int, b: int) -> Tensor:
        """Something equal exactly where the scores at positions [a, b) are equal."""
        return self.keys[a:b] >> 32 if self.packed else self.values[a:b]

    def targets_at(self, a: int, b: int) -> Tensor:
        return self.keys[a:b] & 0xFFFFFFFF if self.packed else self.targets[self.order[a:b]]

    def values_at(self, a: int, b: int) -> Tensor:
        """float64 scores at positions [a, b)."""
        if not self.packed:
            return self.values[a:b].double()
        order_key = torch.bitwise_not((self.keys[a:b] >> 32).int())
        bits = order_key ^ ((order_key >> 31) & 0x7FFFFFFF)
        return bits.view(torch.float32).double()


def _pack(scores: Tensor, targets: Tensor) -> Tensor:
    """int64 keys whose ascending order is the descending order of float32 ``scores``; low 32 bits = target."""
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0, so the two compare equal
    # Flipping the magnitude bits of negative floats makes the signed integer order match the float order;
    # the bitwise complement then reverses it (and, unlike negation, stays within int32).
    order_key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = torch.bitwise_not(order_key).long()
    key <<= 32
    key |= targets.long()
    return key


def sweep(
    scores: Tensor,
    targets: Tensor,
    region_weights: Tensor | None = None,
    legacy_steps: int | None = None,
    fpr_limit: float = FPR_LIMIT,
    chunk_size: int = DEFAULT_CHUNK,
) -> CurveSums:
    """One descending sort of ``scores`` and one chunked pass computing every requested curve integral.

    Args:
        scores: flat float scores (pixels or images), on the device to compute on.
        targets: flat ground truth, same length: bool labels, or int region ids (0 = normal) when
            ``region_weights`` is given (then AUPRO is computed too).
        region_weights: float64 [R + 1], weight of one pixel of each region id (see ``_region_weights``).
        legacy_steps: if set (with region weights), also the legacy AUPRO on its ``arange`` grid of that many steps.
        fpr_limit: AUPRO integration limit.
        chunk_size: elements of the sorted order handled per step (memory bound).
    """
    device = scores.device
    labels = targets > 0 if region_weights is not None else targets
    n_pos = int(labels.sum())
    n = scores.numel()
    n_neg = n - n_pos
    if n_pos == 0:
        return CurveSums(n_pos, n_neg, None, None, None)
    grid = None
    if region_weights is not None and legacy_steps and n_neg > 0:
        thresholds = _legacy_thresholds(scores, legacy_steps)
        grid = _LegacyGrid(thresholds) if thresholds is not None else None
    del labels

    pairs = _SortedPairs(scores, targets, chunk_size)
    acc = _Accumulator(n_pos, max(n_neg, 1), fpr_limit, device)
    carry_tp = carry_pro = torch.zeros((), dtype=torch.float64, device=device)
    for a in range(0, n, chunk_size):
        b = min(a + chunk_size, n)
        target = pairs.targets_at(a, b)
        count = torch.arange(a + 1, b + 1, device=device, dtype=torch.float64)
        tp = torch.cumsum(target > 0, 0, dtype=torch.float64) + carry_tp
        fp = count - tp
        # A tie group ends where the next sorted score differs (or at the very end).
        tie = pairs.ties(a, min(b + 1, n))
        end = torch.ones(b - a, dtype=torch.bool, device=device)
        end[: tie.numel() - 1] = tie[:-1] != tie[1:]
        ends = torch.nonzero(end).squeeze(1)
        pro_ends = None
        # PRO only matters up to the FPR limit (both AUPROs); past it, skip its gather and sums.
        if region_weights is not None and acc.prev_fpr < fpr_limit:
            pro = torch.cumsum(region_weights[target.long()], 0) + carry_pro
            if grid is not None:
                grid.update(pairs.values_at(a, b), fp, pro, count[0] - 1 - carry_tp, carry_pro, last=b == n)
            pro_ends = pro[ends]
            carry_pro = pro[-1]
        acc.add(tp[ends], fp[ends], count[ends], pro_ends)
        carry_tp = tp[-1]
    del pairs

    has_neg = n_neg > 0
    result = CurveSums(
        n_pos=n_pos,
        n_neg=n_neg,
        auroc=float(acc.roc) / (2.0 * n_pos * n_neg) if has_neg else None,
        ap=float(acc.ap) / n_pos,
        f1max=float(acc.f1),
    )
    if region_weights is not None and has_neg:
        result.aupro = float(acc.pro_area) / fpr_limit
        result.aupro_legacy = _legacy_area(grid, n_neg, fpr_limit) if grid is not None else None
    return result


# --------------------------------------------------------------------------------------------- public metrics
def binary_metrics(scores: ArrayLike, labels: ArrayLike, *, chunk_size: int = DEFAULT_CHUNK) -> dict:
    """AUROC, AP and F1-max of ``scores`` against binary ``labels`` from one sort.

    Inputs of any shape are flattened (pass maps and masks for the pixel-level values).

    Returns:
        ``{"auroc", "ap", "f1max"}``, each a float or ``None`` where undefined.
    """
    s = _scores(scores, "scores")
    y = _binary(labels, "labels", s.device)
    _check_len(s, y, "binary_metrics")
    r = sweep(s, y, chunk_size=chunk_size)
    return {"auroc": r.auroc, "ap": r.ap, "f1max": r.f1max}


def auroc(scores: ArrayLike, labels: ArrayLike) -> float | None:
    """Exact ROC AUC (ties count one half, as ``sklearn.metrics.roc_auc_score``); None without both classes."""
    return binary_metrics(scores, labels)["auroc"]


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float | None:
    """Step-wise average precision (``sklearn.metrics.average_precision_score``); None without positives."""
    return binary_metrics(scores, labels)["ap"]


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float | None:
    """Maximum F1 over the points of ``sklearn.metrics.precision_recall_curve``; None without positives."""
    return binary_metrics(scores, labels)["f1max"]


def pixel_metrics(
    maps: ArrayLike,
    masks: ArrayLike,
    legacy_aupro: bool = True,
    fpr_limit: float = FPR_LIMIT,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict:
    """All pixel metrics of one category from one sort of the pooled map pixels.

    Args:
        maps: [N, H, W] raw anomaly maps (numpy or torch; computed on the tensor's device).
        masks: [N, H, W] or [N, 1, H, W] ground truth in {0, 1}.
        legacy_aupro: also compute ``pixel_aupro_legacy`` (else it is ``None``).
        fpr_limit: AUPRO integration limit.
        chunk_size: elements per sweep step.

    Returns:
        ``pixel_auroc, pixel_ap, pixel_f1max, pixel_aupro, pixel_aupro_legacy``.
    """
    m, g = _maps_and_masks(maps, masks)
    values = _scores(m, "maps")
    region_ids, n_regions = connected_components(g)
    rid = torch.from_numpy(region_ids).to(values.device).reshape(-1)
    weights = _region_weights(rid, n_regions)
    r = sweep(values, rid, weights, 200 if legacy_aupro else None, fpr_limit, chunk_size)
    return {
        "pixel_auroc": r.auroc,
        "pixel_ap": r.ap,
        "pixel_f1max": r.f1max,
        "pixel_aupro": r.aupro,
        "pixel_aupro_legacy": r.aupro_legacy,
    }


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = FPR_LIMIT) -> float | None:
    """Official MVTec AUPRO: exact over all distinct thresholds, area up to ``fpr_limit`` divided by it.

    Regions are 8-connected, per image; every region weighs the same. None without a region or a normal pixel.
    """
    return pixel_metrics(maps, masks, legacy_aupro=False, fpr_limit=fpr_limit)["pixel_aupro"]


def aupro_legacy(
    maps: ArrayLike, masks: ArrayLike, n_steps: int = 200, fpr_limit: float = FPR_LIMIT
) -> float | None:
    """AUPRO as AnomalyCLIP's ``cal_pro_score`` computes it, for parity with published tables.

    Thresholds ``np.arange(min, max, (max - min) / n_steps)`` in float64, a pixel is anomalous when strictly above
    the threshold, points with FPR < ``fpr_limit`` are kept, their FPRs min-max rescaled to [0, 1], and the
    trapezoidal area is returned (not divided by the limit). None where the reference returns NaN or raises
    (constant map, no region, fewer than two kept points).
    """
    m, g = _maps_and_masks(maps, masks)
    values = _scores(m, "maps")
    region_ids, n_regions = connected_components(g)
    rid = torch.from_numpy(region_ids).to(values.device).reshape(-1)
    return sweep(values, rid, _region_weights(rid, n_regions), n_steps, fpr_limit).aupro_legacy


def evaluate(
    maps: ArrayLike,
    masks: ArrayLike | None,
    scores: ArrayLike,
    labels: ArrayLike,
    legacy_aupro: bool = True,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, float | None]:
    """Every metric of one category (``specs/protocol.md`` §3).

    Args:
        maps: [N, H, W] float anomaly maps, raw.
        masks: [N, H, W] ground truth in {0, 1}, or ``None`` for image-only sets (pixel keys are then ``None``).
        scores: [N] raw image scores.
        labels: [N] image labels in {0, 1}.
        legacy_aupro: compute ``pixel_aupro_legacy`` (else ``None``).
        chunk_size: elements per sweep step (memory bound of the temporaries).

    Returns:
        A dict with the keys ``METRIC_KEYS``; values are Python floats or ``None`` where undefined.
    """
    s = _scores(scores, "scores")
    y = _binary(labels, "labels", s.device)
    _check_len(s, y, "evaluate")
    n_maps = _to_tensor(maps, "maps").shape[0]
    if n_maps != s.numel():
        raise ValueError(f"evaluate: maps hold {n_maps} images but scores have {s.numel()}")
    img = sweep(s, y, chunk_size=chunk_size)
    out: dict[str, float | None] = {"image_auroc": img.auroc, "image_ap": img.ap, "image_f1max": img.f1max}
    if masks is None:
        out.update(dict.fromkeys(PIXEL_KEYS))
    else:
        out.update(pixel_metrics(maps, masks, legacy_aupro, chunk_size=chunk_size))
    return out
