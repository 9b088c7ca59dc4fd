"""What the test-time callbacks share: reading ``test_step`` outputs and declared extras, and DDP gathering.

The Evaluator (metrics) and the Gallery (pictures) each collect what they need from the same batches; these helpers
keep the reading and checking of a batch's outputs in one place.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from zsad.types import AnomalyOutput, ExtraSpec


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def first_unique(index: Tensor) -> Tensor | None:
    """Positions keeping the first occurrence of each index, or None when nothing repeats."""
    sorted_index, perm = torch.sort(index, stable=True)
    keep = torch.ones_like(sorted_index, dtype=torch.bool)
    keep[1:] = sorted_index[1:] != sorted_index[:-1]
    return None if bool(keep.all()) else perm[keep]


def unpack_outputs(outputs: Any) -> tuple[Tensor, Tensor, Mapping[str, Tensor]]:
    """(maps [B,H,W], scores [B], extras) of a ``test_step`` result (an ``AnomalyOutput`` or the dict form)."""
    if isinstance(outputs, AnomalyOutput):
        return outputs.anomaly_map, outputs.image_score, outputs.extras
    if isinstance(outputs, Mapping) and "maps" in outputs and "scores" in outputs:
        return outputs["maps"], outputs["scores"], outputs.get("extras") or {}
    raise TypeError(
        "Evaluator: test_step must return {'maps': Tensor [B,H,W], 'scores': Tensor [B], 'extras': dict}, "
        f"got {type(outputs).__name__}"
    )


def declared_extras(pl_module: Any) -> dict[str, ExtraSpec]:
    """The module's ``extra_specs()`` (ZSADModule forwards its method's), or none."""
    specs = pl_module.extra_specs() if callable(getattr(pl_module, "extra_specs", None)) else {}
    for name, spec in specs.items():
        if not isinstance(spec, ExtraSpec):
            raise TypeError(
                f"Evaluator: extra_specs()[{name!r}] must be a zsad.types.ExtraSpec, got {spec!r}"
            )
    return dict(specs)


def spec_json(specs: Mapping[str, ExtraSpec]) -> dict[str, dict[str, Any]]:
    """Extra declarations as JSON-able dicts (``metrics.json`` extras and the gallery's ``extras_spec``)."""
    return {
        name: {"kind": s.kind, "rows": list(s.rows), "cols": list(s.cols), "row_name": s.row_name,
               "col_name": s.col_name}
        for name, s in specs.items()
    }  # fmt: skip


def batch_index(batch: Any, n_seen: int, device: torch.device) -> Tensor:
    """The batch's dataset indices (``batch.index``); in one process, arrival order when the batch has none."""
    b = len(batch)
    index = batch.index
    if index.numel() != b:
        if world_size() > 1:
            raise ValueError("Evaluator: Batch.index must give every sample's dataset index under DDP")
        index = torch.arange(n_seen, n_seen + b)  # one process: arrival order is the identity
    return index.to(device)


def add_batch_table(acc: list | None, value: Tensor, b: int) -> list:
    """Running ``[Σ b·table (float64), Σ b]`` of a ``batch_table`` extra (a batch's table stands for its b images)."""
    weighted = value.detach().double() * b
    return [weighted, b] if acc is None else [acc[0] + weighted, acc[1] + b]


def gather_tables(local: Mapping[str, list]) -> dict[str, Any]:
    """Each running batch table summed over ranks and divided by its image count (a float64 numpy array)."""
    mine = {n: (acc.cpu().numpy(), count) for n, (acc, count) in local.items()}
    out: dict[str, Any] = {}
    for part in all_gather_objects(mine):
        for name, (acc, count) in part.items():
            total, n = out.get(name, (0.0, 0))
            out[name] = (total + acc, n + count)
    return {name: total / n for name, (total, n) in out.items()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor()})" if platform.processor() else "cpu"
    world = world_size()
    return name + (f" x{world}" if world > 1 else "")


class CategoryState(Metric):
    """The per-sample tensors of one category on this rank, as concatenated torchmetrics states.

    ``update(maps=…, scores=…, labels=…, index=…, …)`` appends a batch's rows to each named state; ``compute()``
    lets torchmetrics gather every rank's rows (``dist_reduce_fx="cat"``, rank order, uneven counts allowed) and
    returns them with repeated sample indices removed (a DDP sampler pads the ranks' shares with repeats), so every
    rank gets the same de-duplicated rows. The metrics themselves stay zsad's exact functional ones.

    Args:
        names: the states (each a [N, ...] tensor per batch); ``index`` is required.
    """

    full_state_update = False

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(compute_with_cache=False)
        if "index" not in names:
            raise ValueError("CategoryState: the sample index is required to remove repeated samples")
        self._names = list(names)
        for name in self._names:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, **rows: Tensor) -> None:  # type: ignore[override]
        for name, value in rows.items():
            getattr(self, name).append(value)

    def compute(self) -> dict[str, Tensor]:
        """Every rank's rows (states without rows are left out), the first occurrence of each index kept."""
        out = {}
        for name in self._names:
            value = getattr(self, name)
            if isinstance(value, list):  # one process: still the list of batch rows
                value = torch.cat(value) if value else None
            if value is not None and value.numel() > 0:
                out[name] = value
        keep = first_unique(out["index"])
        return out if keep is None else {k: t[keep] for k, t in out.items()}
