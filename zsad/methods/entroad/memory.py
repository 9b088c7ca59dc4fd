"""EntroAD's retrieval memory: built once from the auxiliary (training) set, cached on disk, carried in checkpoints.

Spec ``entroad.md`` § Stage 1 (as MRAD): image keys are the normalised global embeddings with one-hot
{normal, anomalous} values; patch keys are, per image, the mean of the neighbour-averaged tap-24 ``ln_post`` tokens
inside the ground-truth mask (value anomalous) and outside it (value normal), normalised.

**The memory only ever comes from the training set.** ``Memory`` records, for every source image, a 63-bit hash of its
path, its file size and a 63-bit digest of its file's bytes; the method refuses to evaluate an image whose path is
among them or whose file has the same bytes as a source (a copy of a training image under another path). Only files
whose size matches a source's are read and hashed, so the check costs one ``stat`` per evaluated image.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_modules.types import Batch, Sample
from zsad.methods.entroad.routing import neighbour_average

CACHE_VERSION = 3  # 3: file sizes and content digests of the sources
_BUFFERS = (
    "image_keys",
    "image_values",
    "patch_keys",
    "patch_values",
    "source_hash",
    "source_size",
    "source_content",
)
_CONTENT_BUFFERS = ("source_size", "source_content")


class MemoryLeak(RuntimeError):
    """A sample being evaluated is one the memory was built from."""


def path_hash(path: str | Path) -> int:
    """Stable signed 63-bit hash of a path string (fits an int64 buffer; Python's ``hash`` is salted)."""
    return int.from_bytes(hashlib.sha1(str(path).encode()).digest()[:8], "big") >> 1


def file_size(path: str | Path) -> int:
    """Size in bytes of the file at ``path``; -1 when it cannot be read (never equal to a source's size)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def file_digest(path: str | Path) -> int:
    """Signed 63-bit BLAKE2b digest of the file's bytes; -1 when it cannot be read."""
    h = hashlib.blake2b(digest_size=8)
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return -1
    return int.from_bytes(h.digest(), "big") >> 1


@dataclass
class MemoryTensors:
    """The memory's content: keys are L2-normalised, values one-hot {normal, anomalous}."""

    image_keys: Tensor  # [Mi, D]
    image_values: Tensor  # [Mi, 2]
    patch_keys: Tensor  # [Mp, W]
    patch_values: Tensor  # [Mp, 2]
    source_hash: Tensor  # [Mi] int64, path_hash of each source image
    # File size and file_digest of each source image ([Mi] int64; empty: no content check, e.g. a random memory).
    source_size: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    source_content: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


class Memory(nn.Module):
    """Persistent buffers holding the memory, so a checkpoint carries it to a test-only run.

    The buffers start empty; loading a state dict resizes them to the stored shapes.
    """

    def __init__(self, image_dim: int, patch_dim: int) -> None:
        super().__init__()
        self.register_buffer("image_keys", torch.zeros(0, image_dim))
        self.register_buffer("image_values", torch.zeros(0, 2))
        self.register_buffer("patch_keys", torch.zeros(0, patch_dim))
        self.register_buffer("patch_values", torch.zeros(0, 2))
        self.register_buffer("source_hash", torch.zeros(0, dtype=torch.long))
        self.register_buffer("source_size", torch.zeros(0, dtype=torch.long))
        self.register_buffer("source_content", torch.zeros(0, dtype=torch.long))
        self._sources: tuple[set[int], set[int], set[int]] | None = None

    @property
    def built(self) -> bool:
        return self.image_keys.shape[0] > 0 and self.patch_keys.shape[0] > 0

    def set(self, mem: MemoryTensors) -> None:
        """Replace the content (kept on the buffers' device and dtype)."""
        for name in _BUFFERS:
            old = getattr(self, name)
            setattr(self, name, getattr(mem, name).to(device=old.device, dtype=old.dtype))
        self._sources = None

    def tensors(self) -> MemoryTensors:
        return MemoryTensors(*(getattr(self, n).detach().cpu() for n in _BUFFERS))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # The memory's size depends on the auxiliary set: adopt the stored shapes before the default copy.
        for name in _CONTENT_BUFFERS:
            if prefix + "source_hash" in state_dict and prefix + name not in state_dict:
                # A checkpoint from before content digests: only the path check guards it.
                state_dict[prefix + name] = torch.zeros(0, dtype=torch.long)
        for name in _BUFFERS:
            key = prefix + name
            if key in state_dict:
                old = getattr(self, name)
                setattr(self, name, torch.empty_like(state_dict[key], device=old.device, dtype=old.dtype))
        self._sources = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_disjoint(self, paths: Iterable[str]) -> None:
        """Raise ``MemoryLeak`` if any of ``paths`` is a source image of the memory or a file with a source's bytes.

        No device sync (the source sets are read once). A file is hashed only when its size equals a source's.
        """
        if self._sources is None:
            self._sources = tuple(
                set(getattr(self, n).tolist()) for n in ("source_hash", "source_size", "source_content")
            )
        by_path, sizes, contents = self._sources

        def same_bytes(p: str) -> bool:
            size = file_size(p)
            return size >= 0 and size in sizes and file_digest(p) in contents

        leaked = [p for p in paths if path_hash(p) in by_path or same_bytes(p)]
        if leaked:
            raise MemoryLeak(
                f"EntroAD memory was built from the auxiliary training set, which contains the evaluated image(s) "
                f"{leaked[:3]} (same path or same file content): a target set must not overlap data.train"
            )


def cache_key(samples: list[Sample], identity: dict[str, Any], settings: dict[str, Any]) -> str:
    """Hex digest over the auxiliary samples (dataset, sorted paths, labels, masks), backbone identity and settings."""
    rows = sorted((s.dataset, str(s.image_path), str(s.mask_path or ""), int(s.label)) for s in samples)
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "datasets": sorted({s.dataset for s in samples}),
            "samples": rows,
            "identity": identity,
            "settings": settings,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


RegionRule = Literal["pure", "coverage"]
REGION_RULES = get_args(RegionRule)
_PURE_EPS = 1e-4


def patch_regions(
    masks: Tensor, grid: tuple[int, int], rule: str = "pure", threshold: float = 0.5, coverage: float = 0.5
) -> Tensor:
    """Boolean {normal, anomalous} patch regions [B, 2, N] of pixel masks [B, 1, H, W] (binarised at ``threshold``).

    * ``pure`` (MRAD [C]): the binary mask resized bilinearly (no antialiasing) to the patch grid is 1 (anomalous)
      or 0 (normal). Shrinking by the patch size, bilinear reads only the pixels next to each patch centre (at
      518 → 37 the 2×2 centre pixels of each 14×14 patch), so a patch takes the label of its centre; only patches
      whose centre pixels straddle the defect edge are left out, and a patch mostly covered by the defect counts as
      normal when its centre is not.
    * ``coverage``: the share of defect pixels inside each patch (area average); anomalous where it reaches
      ``coverage``, normal where it is 0. Every patch the defect touches with less than ``coverage`` of its area
      belongs to neither region, so the normal key never averages defect pixels.
    """
    if rule not in REGION_RULES:
        raise ValueError(
            f"method.memory_regions: unknown rule {rule!r}; expected one of {', '.join(REGION_RULES)}"
        )
    binary = (masks.float() > threshold).float()
    if rule == "pure":
        m = F.interpolate(binary, size=grid, mode="bilinear", align_corners=False).flatten(1)
        return torch.stack([m < _PURE_EPS, m > 1.0 - _PURE_EPS], 1)
    share = F.adaptive_avg_pool2d(binary, grid).flatten(1)
    return torch.stack([share <= 0.0, share >= coverage], 1)


def mask_pooled_keys(
    tokens: Tensor,
    masks: Tensor | None,
    grid: tuple[int, int],
    threshold: float = 0.5,
    rule: str = "pure",
    coverage: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Per image, the normalised mean token inside the mask (anomalous) and outside it (normal).

    Args:
        tokens: [B, N, W] neighbour-averaged tokens.
        masks: [B, 1, H, W] ground truth (bool/float). ``None`` (image-only set) gives no patch keys.
        grid: (gh, gw).
        threshold: pixel binarisation threshold.
        rule: which patches count as inside / outside (:func:`patch_regions`).
        coverage: defect share that makes a patch anomalous under the ``coverage`` rule.

    Returns:
        keys [K, W] and one-hot values [K, 2] for every non-empty region (batched, no per-image loop; the
        boolean selection syncs once per memory batch, which is built once, offline).
    """
    if masks is None:
        return tokens.new_zeros(0, tokens.shape[-1]), tokens.new_zeros(0, 2)
    regions = patch_regions(masks, grid, rule, threshold, coverage).to(
        tokens.dtype
    )  # [B, 2, N]: {normal, anomalous}
    counts = regions.sum(-1)  # [B, 2]
    means = (regions @ tokens) / counts.clamp_min(1).unsqueeze(-1)  # [B, 2, W]
    keep = counts > 0
    keys = F.normalize(means[keep].float(), dim=-1)
    values = F.one_hot(torch.nonzero(keep)[:, 1], 2).float()
    return keys, values


Encoder = Callable[[Tensor], tuple[Tensor, Tensor, tuple[int, int]]]


@torch.no_grad()
def collect_memory(
    batches: Iterable[Batch],
    encode: Encoder,
    kernels: tuple[int, ...],
    threshold: float,
    device: torch.device,
    rule: str = "pure",
    coverage: float = 0.5,
) -> MemoryTensors:
    """One no-grad pass over the auxiliary batches.

    Args:
        batches: the auxiliary set as ``Batch`` es (image normalised at the method's input size, mask).
        encode: images → (global embedding [B, D], tap-24 pre-projection tokens [B, N, W], grid).
        kernels: neighbour-averaging kernels.
        threshold: pixel mask threshold (:func:`mask_pooled_keys`).
        device: where the encoder runs.
        rule: patch region rule (:func:`patch_regions`).
        coverage: defect share of the ``coverage`` rule.
    """
    img_k, img_v, pat_k, pat_v, hashes, sizes, contents = [], [], [], [], [], [], []
    for batch in batches:
        glob, tokens, grid = encode(batch.image.to(device, non_blocking=True))
        img_k.append(F.normalize(glob.float(), dim=-1))
        img_v.append(F.one_hot(batch.label.to(device).long(), 2).float())
        mask = None if batch.mask is None else batch.mask.to(device)
        k, v = mask_pooled_keys(
            neighbour_average(tokens.float(), grid, kernels), mask, grid, threshold, rule, coverage
        )
        pat_k.append(k)
        pat_v.append(v)
        hashes.extend(path_hash(p) for p in batch.path)
        # Read once more for the digests: built once, offline; guards against copies under other paths.
        sizes.extend(file_size(p) for p in batch.path)
        contents.extend(file_digest(p) for p in batch.path)
    if not img_k:
        raise ValueError(
            "EntroAD memory: the auxiliary set (data.train) is empty; the memory needs its samples"
        )
    mem = MemoryTensors(
        torch.cat(img_k).cpu(),
        torch.cat(img_v).cpu(),
        torch.cat(pat_k).cpu(),
        torch.cat(pat_v).cpu(),
        torch.tensor(hashes, dtype=torch.long),
        torch.tensor(sizes, dtype=torch.long),
        torch.tensor(contents, dtype=torch.long),
    )
    if mem.patch_keys.shape[0] == 0:
        raise ValueError(
            "EntroAD memory: the auxiliary set has no masks, so no patch keys; train on a set with masks"
        )
    return mem


def load_cached(path: Path, key: str) -> MemoryTensors | None:
    """The cached memory at ``path`` if it exists and was built for ``key``; else ``None``."""
    if not path.is_file():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("key") != key:
        return None
    return MemoryTensors(*(blob[n] for n in _BUFFERS))


def save_cached(path: Path, key: str, mem: MemoryTensors) -> None:
    """Write atomically (a concurrent reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"key": key, **{n: getattr(mem, n) for n in _BUFFERS}}, tmp)
    tmp.replace(path)
