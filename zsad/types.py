"""Core types shared by every method: what a method returns and how its extras read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

#: What an extra's dimensions mean. ``B`` is the batch; every other dimension is the method's.
EXTRA_KINDS = {
    "image_map": "[B, h, w] a map per image (a gallery column)",
    "image_scalar": "[B] a value per image (written under the map; category mean in metrics.json)",
    "image_table": "[B, R, C] a small table per image (a gallery heat map)",
    "image_array": "[B, ...] any other per-image tensor (kept in the gallery file, not drawn)",
    "batch_table": "[R, C] one table per batch (category mean weighted by batch size in metrics.json and the gallery)",
}


@dataclass(frozen=True)
class ExtraSpec:
    """The declared meaning of one extra of :class:`AnomalyOutput`, so that nothing downstream reads a shape.

    A ``[6, 4]`` tensor is a per-batch table of 6 MoE layers × 4 experts or the per-image values of a batch of 6
    images only by declaration: the Evaluator keeps, aggregates and plots each extra by its ``kind``.

    Attributes:
        kind: one of :data:`EXTRA_KINDS`.
        rows: labels of R (tables), e.g. the MoE blocks; empty = not checked.
        cols: labels of C (tables), e.g. the expert names; empty = not checked.
        row_name: what a row is (``block``, ``tap``).
        col_name: what a column is (``expert``, ``adapter``).
    """

    kind: str
    rows: tuple[str, ...] = ()
    cols: tuple[str, ...] = ()
    row_name: str = ""
    col_name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in EXTRA_KINDS:
            raise ValueError(f"ExtraSpec: unknown kind {self.kind!r}; expected one of {sorted(EXTRA_KINDS)}")

    @property
    def per_image(self) -> bool:
        return self.kind.startswith("image_")

    def check(self, name: str, value: Tensor, batch_size: int) -> None:
        """Raises ``ValueError`` naming the extra when ``value`` does not have its declared shape."""
        shape = tuple(value.shape)
        table = (len(self.rows), len(self.cols))
        want = {
            "image_map": len(shape) == 3 and shape[0] == batch_size,
            "image_scalar": shape == (batch_size,),
            "image_table": len(shape) == 3 and shape[0] == batch_size and _fits(shape[1:], table),
            "image_array": len(shape) >= 1 and shape[0] == batch_size,
            "batch_table": len(shape) == 2 and _fits(shape, table),
        }[self.kind]
        if not want:
            raise ValueError(
                f"extra {name!r} is declared {self.kind} ({EXTRA_KINDS[self.kind]}"
                + (f", R={len(self.rows)}" if self.rows else "")
                + (f", C={len(self.cols)}" if self.cols else "")
                + f") but has shape {list(shape)} in a batch of {batch_size}"
            )


def _fits(shape: tuple[int, ...], labels: tuple[int, int]) -> bool:
    """A table's [R, C] against its label counts (0 = no labels given, not checked)."""
    return all(n == 0 or s == n for s, n in zip(shape, labels))


class AnomalyOutput(NamedTuple):
    """What a method's forward returns.

    Attributes:
        anomaly_map: float32 [B, H, W] at the evaluation resolution (the method's input size), already smoothed
            if the method smooths. Raw scores: never clamped or re-normalised for metrics.
        image_score: float32 [B].
        extras: tensors for logging and pictures, each declared by the method's ``extra_specs()`` (an
            :class:`ExtraSpec`: per image map / scalar / table / array, or per batch table), e.g.
            ``routing_weights`` [B, L, 2] (image_table), ``entropy_map`` [B, h, w] (image_map), ``gate`` [B]
            (image_scalar), ``expert_share`` [L, E] (batch_table). Detached; never used by the loss.
        loss_inputs: tensors the method's own ``loss`` needs (probability maps per layer, logits …). Methods
            fill it in training; it may be empty at test time.
    """

    anomaly_map: Tensor
    image_score: Tensor
    extras: dict[str, Tensor] = {}
    loss_inputs: dict[str, Tensor] = {}
