"""Aggregation of results: the one mean (undefined values left out), mean ± std over seeds, rows grouped by protocol.

Pure Python (no torch, nothing else of zsad).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zsad.results.schema import METRIC_KEYS, Run

NULL = "–"  # how an undefined value is displayed


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the defined values (``None`` is left out); ``None`` when none is defined.

    ``math.fsum`` keeps the result independent of the order of the values.
    """
    defined = [float(v) for v in values if v is not None]
    return math.fsum(defined) / len(defined) if defined else None


def category_means(categories: Mapping[str, Mapping[str, float | None]]) -> tuple[dict, dict]:
    """Unweighted mean of each metric over the categories where it is defined.

    Returns:
        ``(mean, n_categories_in_mean)``: per key the mean (``None`` if no category defines it) and how many
        categories entered it.
    """
    means = {key: mean(c.get(key) for c in categories.values()) for key in METRIC_KEYS}
    count = {key: sum(1 for c in categories.values() if c.get(key) is not None) for key in METRIC_KEYS}
    return means, count


def dataset_means(results: Mapping[str, Any], prefix: str = "test/mean/") -> dict[str, float]:
    """Mean over datasets of each metric's dataset mean (datasets where it is undefined are left out).

    Logged as ``test/mean/<metric>``: the single number a sweep optimises (on the validation protocol only).
    """
    out: dict[str, float] = {}
    for key in METRIC_KEYS:
        m = mean(d["mean"].get(key) for d in results["datasets"].values())
        if m is not None:
            out[f"{prefix}{key}"] = m
    return out


def _elementwise_mean(values: list[Any]) -> Any:
    """Mean of equal-shaped floats or nested lists of floats."""
    if isinstance(values[0], list):
        return [_elementwise_mean([v[i] for v in values]) for i in range(len(values[0]))]
    return math.fsum(values) / len(values)


def extras_means(extras: Mapping[str, dict[str, Any]]) -> None:
    """Adds ``mean`` (unweighted over categories, of each category's ``all`` value) to every extra entry."""
    for entry in extras.values():
        entry["mean"] = _elementwise_mean([c["all"] for c in entry["categories"].values()])


# ---------------------------------------------------------------------------------------------------------------
# over seeds


@dataclass
class Stat:
    """Mean ± sample std of one value over seeds; ``n`` = seeds where it is defined, ``of`` = seeds in all."""

    mean: float | None
    std: float | None
    n: int
    of: int

    def text(self) -> str:
        """Percent with one decimal, ``mean ± std`` when there is a std, ``–`` when undefined."""
        if self.mean is None:
            return NULL
        s = f"{100 * self.mean:.1f}"
        if self.std is not None:
            s += f" ± {100 * self.std:.1f}"
        return s

    def key(self) -> float | None:
        """The value compared for bold: the mean at the displayed precision."""
        return None if self.mean is None else round(100 * self.mean, 1)


def stat(values: Sequence[float | None]) -> Stat:
    """Mean and sample standard deviation of the defined values (std only with two or more of them)."""
    defined = [float(v) for v in values if v is not None]
    m = mean(defined)
    if m is None:
        return Stat(None, None, 0, len(values))
    std = None
    if len(values) > 1 and len(defined) > 1:
        std = math.sqrt(math.fsum((v - m) ** 2 for v in defined) / (len(defined) - 1))
    return Stat(m, std, len(defined), len(values))


@dataclass
class Group:
    """All seeds of one leaderboard row (label) under one protocol."""

    protocol: str
    label: str
    runs: list[Run] = field(default_factory=list)

    def metric(self, dataset: str, key: str, category: str = "mean") -> Stat:
        """The value over seeds of one metric of one category (or of the dataset mean)."""
        vals = []
        for r in self.runs:
            ds = r.datasets.get(dataset)
            if ds is None:
                continue
            node = ds["mean"] if category == "mean" else ds["categories"].get(category)
            vals.append(None if node is None else node.get(key))
        return stat(vals)

    def partial_mean(self, dataset: str, key: str) -> tuple[int, int] | None:
        """(categories in the mean, categories) when some run's mean left out categories, else None."""
        worst = None
        for r in self.runs:
            ds = r.datasets.get(dataset)
            if ds is None or ds["mean"].get(key) is None:
                continue
            total = len(ds["categories"])
            counts = ds.get("n_categories_in_mean") or {}
            n = counts.get(key)
            if n is None:
                n = sum(1 for c in ds["categories"].values() if c.get(key) is not None)
            if n < total and (worst is None or n < worst[0]):
                worst = (int(n), total)
        return worst

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.runs})

    @property
    def protocols(self) -> list[str]:
        return list(dict.fromkeys(r.protocol for r in self.runs))

    def timing(self, key: str) -> Stat:
        """Over seeds; ``train_s`` adds up the trainings of one seed (a merged protocol trains twice)."""
        if key != "train_s":
            return stat([None if r.timing.get(key) is None else float(r.timing[key]) for r in self.runs])
        per_seed = []
        for s in self.seeds:
            vals = [r.timing.get(key) for r in self.runs if r.seed == s]
            per_seed.append(None if any(v is None for v in vals) else float(sum(vals)))
        return stat(per_seed)

    def devices(self) -> str:
        return ", ".join(dict.fromkeys(str(r.timing.get("device", "?")) for r in self.runs))


def protocol_family(protocol: str) -> str:
    """``A_mvtec`` → ``A``: the halves of a protocol (spec §1: MVTec → others, VisA → MVTec) share one table."""
    return protocol.split("_")[0]


def _halves_disjoint(runs: Sequence[Run]) -> bool:
    """Merging a family is safe when no (row, seed) gets the same dataset from two of its protocols."""
    seen: set[tuple[str, int, str]] = set()
    for r in runs:
        for d in r.datasets:
            if (r.label, r.seed, d) in seen:
                return False
            seen.add((r.label, r.seed, d))
    return True


def group_runs(runs: Sequence[Run]) -> dict[str, list[Group]]:
    """Table key → row groups, in the order the runs came (the grid's order).

    The key is the protocol family (``A`` for ``A`` and ``A_mvtec``) when the family's protocols test on
    different datasets, else the protocol itself.
    """
    seen: dict[tuple[str, str, int], Path] = {}
    families: dict[str, list[Run]] = {}
    for r in runs:
        k = (r.protocol, r.label, r.seed)
        if k in seen:
            raise ValueError(
                f"two results for {r.label} / protocol {r.protocol} / seed {r.seed}: {seen[k]} and {r.path}"
            )
        seen[k] = r.path
        families.setdefault(protocol_family(r.protocol), []).append(r)
    out: dict[str, dict[str, Group]] = {}
    for fam, members in families.items():
        merge = _halves_disjoint(members)
        for r in members:
            key = fam if merge else r.protocol
            out.setdefault(key, {}).setdefault(r.label, Group(key, r.label)).runs.append(r)
    for groups in out.values():
        for g in groups.values():
            g.runs.sort(key=lambda r: (r.seed, r.protocol))
    return {p: list(g.values()) for p, g in out.items()}


def ordered_union(items: Iterable[Iterable[str]]) -> list[str]:
    """The distinct items of several iterables, in first-seen order."""
    return list(dict.fromkeys(x for it in items for x in it))


def datasets_of(groups: Sequence[Group]) -> list[str]:
    return ordered_union(r.datasets.keys() for g in groups for r in g.runs)


def categories_of(groups: Sequence[Group], dataset: str) -> list[str]:
    return ordered_union(
        r.datasets[dataset]["categories"].keys() for g in groups for r in g.runs if dataset in r.datasets
    )
