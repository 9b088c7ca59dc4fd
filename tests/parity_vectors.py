"""Reading and re-creating the parity vectors of ``../shared/testvectors/parity`` (or ``$ZSAD_PARITY_VECTORS``).

Each vectors folder holds prose (README), ``recipe.json`` (seed, format, file name and config key of each weight
file, the class name fed to the prompts), ``keys.txt`` (key, dtype, shape, rule and SHA-256 prefix of every tensor)
and the official inputs/outputs. Everything a test needs is read from those files, never repeated in the test.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "testvectors" / "parity"
ENV = "ZSAD_PARITY_VECTORS"

_DTYPES = {
    "float16": torch.float16,
    "float32": torch.float32,
    "int64": torch.int64,
    "bfloat16": torch.bfloat16,
}


def vectors_root() -> Path:
    """The parity vectors folder: ``$ZSAD_PARITY_VECTORS`` if set, else ``../shared/testvectors/parity``.

    A missing folder is an error, never a skip: these tests must not pass by not running.
    """
    root = Path(os.environ.get(ENV) or DEFAULT_ROOT).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"parity vectors folder not found: {root} (set ${ENV} to a folder holding anomalyclip/ and ava_dino/)"
        )
    return root


def method_folder(name: str) -> Path:
    folder = vectors_root() / name
    for f in ("recipe.json", "keys.txt", "inputs.pt", "expected.pt"):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"parity vectors: {folder / f} is missing")
    return folder


def recipe(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "recipe.json").read_text())


@dataclass(frozen=True)
class KeyRow:
    """One line of ``keys.txt``."""

    file: str
    index: int
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    rule: str
    sha256_16: str


def read_keys(folder: Path, file: str) -> list[KeyRow]:
    """The rows of ``keys.txt`` that belong to weight file ``file`` (``clip``, ``dinov3``, ``trainable`` …)."""
    rows = []
    for line in (folder / "keys.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        f, idx, key, dtype, shape, rule, sha = line.split("\t")
        if f != file:
            continue
        dims = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
        rows.append(KeyRow(f, int(idx), key, _DTYPES[dtype], dims, rule, sha))
    if not rows:
        raise ValueError(f"{folder / 'keys.txt'} lists no keys of file {file!r}")
    # The recipe counts keys in Python's sorted order; keys.txt must agree with it.
    keys = [r.key for r in rows]
    if keys != sorted(keys) or [r.index for r in rows] != list(range(len(rows))):
        raise ValueError(f"{folder / 'keys.txt'}: the {file!r} rows are not in sorted key order 0..n-1")
    return rows


def sha256_16(t: Tensor) -> str:
    """First 16 hex digits of the SHA-256 of the tensor's raw bytes (C order, little-endian, stored dtype)."""
    t = t.detach().cpu().contiguous()
    data = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def _value(row: KeyRow, seed: int) -> Tensor:
    rule, shape = row.rule, row.shape
    if rule.startswith("int:"):
        return torch.tensor(int(rule[4:]), dtype=row.dtype)
    if rule == "ones":
        return torch.ones(shape).to(row.dtype)
    if rule == "zeros":
        return torch.zeros(shape).to(row.dtype)
    if rule.startswith("const:"):
        return torch.full(shape, float(rule[6:]), dtype=torch.float32).to(row.dtype)
    if rule == "randn":
        g = torch.Generator().manual_seed(seed + row.index)
        return (torch.randn(shape, generator=g, dtype=torch.float32) * 0.02).to(row.dtype)
    if rule == "built:periods":  # Meta DINOv3 RoPE periods: base ** (2 i / (2 n)), float32
        n = shape[0]
        return (100.0 ** (2 * torch.arange(n, dtype=torch.float32) / (2 * n))).to(row.dtype)
    if rule == "built:bias_mask":  # Meta LinearKMaskedBias: q and v biases on, k bias off
        third = shape[0] // 3
        mask = torch.ones(shape, dtype=torch.float32)
        mask[third : 2 * third] = 0
        return mask.to(row.dtype)
    raise ValueError(f"keys.txt: unknown rule {rule!r} for {row.key}")


def recreate(folder: Path, file: str, seed: int | None = None) -> dict[str, Tensor]:
    """Re-create weight file ``file`` from its recipe, checking every key's SHA-256 prefix against ``keys.txt``."""
    seed = int(recipe(folder)["files"][file]["seed"]) if seed is None else seed
    out: dict[str, Tensor] = {}
    bad = []
    for row in read_keys(folder, file):
        t = _value(row, seed)
        if tuple(t.shape) != row.shape or sha256_16(t) != row.sha256_16:
            bad.append(row.key)
        out[row.key] = t
    if bad:
        raise AssertionError(f"{file}: {len(bad)} re-created keys differ from keys.txt, e.g. {bad[:5]}")
    return out


def write_weights(folder: Path, file: str, out_dir: Path) -> Path:
    """Re-create ``file`` and save it with ``torch.save`` under the recipe's ``save_as`` name in ``out_dir``."""
    spec = recipe(folder)["files"][file]
    path = out_dir / spec["save_as"]
    if not path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(recreate(folder, file), tmp)
        tmp.rename(path)
    return path


def load_pt(path: Path) -> Any:  # noqa: ANN401 - dicts of tensors, lists of str, ints
    return torch.load(path, map_location="cpu", weights_only=False)
