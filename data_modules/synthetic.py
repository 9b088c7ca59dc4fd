"""The embedded synthetic benchmark: procedural textures and objects with pixel-exact defects.

Two disjoint domains are written under one output folder, each in MVTec layout, so that a method can train on one
and be tested on the other (a miniature cross-dataset protocol that runs on a laptop CPU)::

    OUT/manifest.json                                    options + counts (regenerated when the options change)
    OUT/textures/<cat>/train/good/NNN.png                carpet, wood, brushed_metal, tile, leather
    OUT/textures/<cat>/test/{good,<defect>}/NNN.png
    OUT/textures/<cat>/ground_truth/<defect>/NNN_mask.png
    OUT/objects/...                                      bottle, pill, metal_nut, screw, pcb

Readers: ``synthetic_textures`` and ``synthetic_objects`` (root = ``OUT`` or the domain folder); ``DOMAINS`` maps
reader name → domain folder.

Every item is drawn from its own ``numpy.random.Generator`` seeded by ``(seed, domain, category, split, index)``,
so an image does not depend on how many others are generated. An anomalous image is its defect-free rendering
with a defect painted over a region, and its mask is *exactly* the set of pixels whose 8-bit value changed: pixels
outside the mask equal the clean rendering, every pixel inside differs from it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from data_modules.errors import DataError

GENERATOR_VERSION = 1
DOMAIN_DIRS = ("textures", "objects")
# reader name → domain folder under the output folder
DOMAINS = {"synthetic_textures": "textures", "synthetic_objects": "objects"}

Array = np.ndarray
Rng = np.random.Generator


@dataclass(frozen=True)
class SynthOptions:
    """Generator options (all part of the manifest: changing one regenerates the data)."""

    seed: int = 0
    size: int = 128
    n_test: int = 12
    n_train: int = 4
    anomaly_fraction: float = 0.5


# --------------------------------------------------------------------------------------------------- primitives


def _grid(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates ``(y, x)`` in ``[0, 1)``, float32."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c, indexing="ij")


def _noise(rng: Rng, size: int, cells: tuple[float, float] | float, order: int = 3) -> Array:
    """Smooth value noise in ``[0, 1]`` with ``cells`` lattice cells per side (``(cy, cx)`` for anisotropy)."""
    cy, cx = (cells, cells) if np.isscalar(cells) else cells
    lattice = rng.random((int(np.ceil(cy)) + 1, int(np.ceil(cx)) + 1)).astype(np.float32)
    y, x = _grid(size)
    ofs = rng.random(2)
    out = ndi.map_coordinates(lattice, [y * cy + ofs[0], x * cx + ofs[1]], order=order, mode="grid-wrap")
    lo, hi = out.min(), out.max()
    return (out - lo) / max(hi - lo, 1e-6)


def _fractal(rng: Rng, size: int, cells: float, octaves: int = 4, gain: float = 0.5) -> Array:
    total, amp, norm = np.zeros((size, size), np.float32), 1.0, 0.0
    for o in range(octaves):
        total += amp * _noise(rng, size, cells * 2**o)
        norm += amp
        amp *= gain
    return total / norm


def _lerp(a: Array, b: Array, t: Array) -> Array:
    """Blend colours ``a`` → ``b`` (each ``[3]``) by the map ``t`` ``[H, W]``."""
    return a[None, None] + (b - a)[None, None] * t[..., None]


def _jitter_colour(rng: Rng, rgb: tuple[float, float, float], amount: float = 0.04) -> Array:
    """Vary a colour mostly in brightness: normal items of one category must keep one hue, as real ones do."""
    shift = rng.normal(0, amount) + rng.normal(0, amount / 5, 3)
    return np.clip(np.asarray(rgb, np.float32) * (1 + shift.astype(np.float32)), 0, 1)


def _rotated(y: Array, x: Array, cy: float, cx: float, angle: float) -> tuple[Array, Array]:
    """Coordinates relative to ``(cy, cx)`` in a frame rotated by ``angle`` (radians)."""
    dy, dx = y - cy, x - cx
    c, s = np.cos(angle), np.sin(angle)
    return c * dy - s * dx, s * dy + c * dx


def _blob(rng: Rng, size: int, cy: float, cx: float, radius: float, wobble: float = 0.35) -> Array:
    """Irregular filled blob: a circle whose radius varies smoothly with the angle."""
    y, x = _grid(size)
    ang = np.arctan2(y - cy, x - cx)
    harmonics = rng.normal(0, wobble / 2, (4, 2))
    k = np.arange(2, 6, dtype=np.float32)[:, None, None]
    r = radius * (
        1
        + (harmonics[:, 0, None, None] * np.cos(k * ang) + harmonics[:, 1, None, None] * np.sin(k * ang)).sum(
            0
        )
    )
    return np.hypot(y - cy, x - cx) < np.maximum(r, radius * 0.3)


def _polyline_mask(size: int, pts: Array, width: int) -> Array:
    """Rasterise a polyline given as ``[N, 2]`` points in ``[0, 1]`` (densely resampled) with a pixel width."""
    seg = np.diff(pts, axis=0)
    n = np.maximum((np.hypot(seg[:, 0], seg[:, 1]) * size * 3).astype(int), 2)
    dense = np.concatenate(
        [p0 + np.linspace(0, 1, k, endpoint=False)[:, None] * d for p0, d, k in zip(pts[:-1], seg, n)]
    )
    ij = np.clip((dense * size).astype(int), 0, size - 1)
    mask = np.zeros((size, size), bool)
    mask[ij[:, 0], ij[:, 1]] = True
    if width > 1:
        mask = ndi.binary_dilation(mask, structure=np.ones((width, width), bool))
    return mask


# ------------------------------------------------------------------------------------------------------ textures
# Each texture renderer returns float32 [S, S, 3] in [0, 1].


def _carpet(rng: Rng, s: int) -> Array:
    y, x = _grid(s)
    f = rng.uniform(14, 18)
    u, v = x * f + rng.random(), y * f + rng.random()
    over = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)  # which thread is on top in this cell
    thread_h = np.cos(np.pi * (v % 1 - 0.5)) ** 0.6
    thread_v = np.cos(np.pi * (u % 1 - 0.5)) ** 0.6
    weave = over * thread_h + (1 - over) * thread_v
    fibre = _noise(rng, s, (s / 3, s / 8))
    lum = 0.55 * weave + 0.25 * fibre + 0.2 * _noise(rng, s, 3)
    base = _jitter_colour(rng, (0.45, 0.38, 0.33))
    return np.clip(_lerp(base * 0.55, np.minimum(base * 1.5, 1), lum), 0, 1)


def _wood(rng: Rng, s: int) -> Array:
    y, x = _grid(s)
    turb = _fractal(rng, s, 2, octaves=3)
    phase = (x * rng.uniform(5, 8) + 2.5 * turb + 0.3 * np.sin(y * 3 + rng.random() * 6)) % 1
    rings = phase**3  # sharp late-wood bands
    streak = _noise(rng, s, (3, s / 4))
    lum = 0.7 * rings + 0.3 * streak
    light, dark = _jitter_colour(rng, (0.82, 0.62, 0.40)), _jitter_colour(rng, (0.50, 0.30, 0.15))
    return np.clip(_lerp(light, dark, lum), 0, 1)


def _brushed_metal(rng: Rng, s: int) -> Array:
    y, x = _grid(s)
    grain = ndi.gaussian_filter1d(
        rng.normal(0, 1, (s, s)).astype(np.float32), sigma=s / 5, axis=1, mode="wrap"
    )
    grain = (grain - grain.mean()) / (grain.std() + 1e-6)
    light = 0.55 + 0.15 * np.cos((y - rng.random()) * 2.5) + 0.05 * np.sin(x * 2)
    lum = np.clip(light + 0.06 * grain, 0, 1)
    tint = _jitter_colour(rng, (0.93, 0.95, 1.0), 0.02)
    return np.clip(lum[..., None] * tint[None, None], 0, 1)


def _tile(rng: Rng, s: int) -> Array:
    y, x = _grid(s)
    n = rng.integers(3, 5)
    u, v = x * n + rng.random(), y * n + rng.random()
    tile_id = (np.floor(u) * 7 + np.floor(v) * 13).astype(int) % 11
    per_tile = rng.normal(0, 0.04, 11).astype(np.float32)[tile_id]
    grout = (np.minimum(u % 1, 1 - u % 1) < 0.035) | (np.minimum(v % 1, 1 - v % 1) < 0.035)
    speckle = (rng.random((s, s)) < 0.06) * rng.uniform(-0.25, 0.1, (s, s))
    lum = 0.72 + per_tile + 0.08 * _noise(rng, s, 6) + speckle
    base = _jitter_colour(rng, (0.78, 0.80, 0.82), 0.03)
    img = lum[..., None] * base[None, None]
    img[grout] = _jitter_colour(rng, (0.35, 0.35, 0.37), 0.02)
    return np.clip(img, 0, 1)


def _leather(rng: Rng, s: int) -> Array:
    cells = _fractal(rng, s, 10, octaves=2)
    creases = (
        1 - np.abs(2 * _fractal(rng, s, 4, octaves=3) - 1) ** 0.35
    )  # thin ridges where the noise crosses 1/2
    pores = ndi.gaussian_filter(rng.random((s, s)).astype(np.float32), 0.7)
    lum = 0.5 + 0.25 * (cells - 0.5) - 0.35 * creases + 0.25 * (pores - pores.mean())
    base = _jitter_colour(rng, (0.55, 0.30, 0.20))
    return np.clip(lum[..., None] * base[None, None] * 1.5, 0, 1)


# ------------------------------------------------------------------------------------------------------- objects
# Each object renderer returns (image, object mask, background), image and background float32 [S, S, 3].


def _plain_background(rng: Rng, s: int, rgb: tuple[float, float, float]) -> Array:
    base = _jitter_colour(rng, rgb, 0.02)
    lum = 1 + 0.06 * (_noise(rng, s, 2) - 0.5) + 0.02 * rng.normal(0, 1, (s, s))
    return np.clip(lum[..., None] * base[None, None], 0, 1).astype(np.float32)


def _bottle(rng: Rng, s: int) -> tuple[Array, Array, Array]:
    y, x = _grid(s)
    bg = _plain_background(rng, s, (0.12, 0.12, 0.12))
    cy, cx = 0.5 + rng.normal(0, 0.015, 2)
    r = np.hypot(y - cy, x - cx)
    big = rng.uniform(0.40, 0.44)
    fg = r < big
    glass = _jitter_colour(rng, (0.45, 0.30, 0.12))
    rim = np.exp(-(((r - big * 0.92) / 0.025) ** 2))  # the bright lip of the bottom
    shade = 0.35 + 0.5 * (r / big) ** 2 + 0.7 * rim
    inner = np.exp(-(((r - big * 0.45) / 0.03) ** 2)) * 0.5
    lum = shade + inner + 0.05 * _noise(rng, s, 8)
    img = np.where(fg[..., None], np.clip(lum[..., None] * glass[None, None] * 1.4, 0, 1), bg)
    hole = r < big * 0.25
    img[hole] = img[hole] * 0.35
    return img, fg, bg


def _pill(rng: Rng, s: int) -> tuple[Array, Array, Array]:
    y, x = _grid(s)
    bg = _plain_background(rng, s, (0.08, 0.08, 0.09))
    cy, cx = 0.5 + rng.normal(0, 0.015, 2)
    a, b = rng.uniform(0.40, 0.44), rng.uniform(0.18, 0.21)
    v, u = _rotated(y, x, cy, cx, rng.normal(0, 0.05))
    d = (u / a) ** 2 + (v / b) ** 2
    fg = d < 1
    body = _jitter_colour(rng, (0.93, 0.90, 0.82), 0.02)
    dome = np.sqrt(np.clip(1 - d, 0, 1))
    lum = 0.55 + 0.45 * dome - 0.15 * (v / b)
    img = np.where(fg[..., None], np.clip(lum[..., None] * body[None, None], 0, 1), bg)
    dots = fg & (rng.random((s, s)) < 0.012) & (d < 0.8)
    dots = ndi.binary_dilation(dots, iterations=1) & fg
    img[dots] = _jitter_colour(rng, (0.72, 0.22, 0.20), 0.03)
    groove = fg & (np.abs(u) < 0.006 + 1.0 / s) & (d < 0.7)  # the break line
    img[groove] *= 0.75
    return img, fg, bg


def _metal_nut(rng: Rng, s: int) -> tuple[Array, Array, Array]:
    y, x = _grid(s)
    bg = _plain_background(rng, s, (0.10, 0.10, 0.11))
    cy, cx = 0.5 + rng.normal(0, 0.015, 2)
    ang = np.arctan2(y - cy, x - cx)
    rot = rng.uniform(0, np.pi / 3)
    r = np.hypot(y - cy, x - cx)
    # Hexagon: the largest projection on the six face normals is the "hexagonal radius".
    normals = rot + np.arange(6) * np.pi / 3
    hexr = np.max(np.cos(ang[None] - normals[:, None, None]), axis=0) * r
    size_ = rng.uniform(0.36, 0.40)
    hole = r < size_ * 0.45
    fg = (hexr < size_ * 0.87) & ~hole
    metal = _jitter_colour(rng, (0.70, 0.72, 0.75), 0.02)
    facet = 0.6 + 0.25 * np.cos(3 * (ang - rot)) + 0.15 * (r / size_)
    thread = 0.1 * np.sin(r * s * 1.2) * (r < size_ * 0.55)
    lum = facet + thread + 0.06 * _noise(rng, s, 10)
    img = np.where(fg[..., None], np.clip(lum[..., None] * metal[None, None], 0, 1), bg)
    return img, fg, bg


def _screw(rng: Rng, s: int) -> tuple[Array, Array, Array]:
    y, x = _grid(s)
    bg = _plain_background(rng, s, (0.80, 0.80, 0.78))
    cy, cx = 0.5 + rng.normal(0, 0.03, 2)
    along, across = _rotated(y, x, cy, cx, rng.uniform(0, 2 * np.pi))
    half_len, half_w = rng.uniform(0.26, 0.30), 0.045
    shaft = (
        np.abs(across) < half_w * (1 - 0.6 * np.clip((along - half_len * 0.7) / (half_len * 0.3), 0, 1))
    ) & (np.abs(along) < half_len)
    head_c = -half_len - 0.06
    head = np.hypot(along - head_c, across) < 0.1
    fg = shaft | head
    steel = _jitter_colour(rng, (0.55, 0.56, 0.58), 0.02)
    threads = 0.75 + 0.25 * np.sin(along * s * 0.9 + across * 8)
    cyl = 0.6 + 0.4 * np.cos(np.clip(across / half_w, -1, 1) * np.pi / 2)
    lum = np.where(head, 0.8 - 0.3 * np.hypot(along - head_c, across) / 0.1, cyl * threads)
    slot = head & (np.abs(across) < 0.015) & (np.abs(along - head_c) < 0.075)
    lum = np.where(slot, 0.15, lum)
    img = np.where(fg[..., None], np.clip(lum[..., None] * steel[None, None] * 1.2, 0, 1), bg)
    # A soft drop shadow makes it read as an object on a table; it belongs to the background.
    shadow = ndi.gaussian_filter(fg.astype(np.float32), 2.5)
    bg = bg * (1 - 0.35 * np.roll(shadow, (2, 2), axis=(0, 1)))[..., None]
    img = np.where(fg[..., None], img, bg)
    return img, fg, bg


def _pcb(rng: Rng, s: int) -> tuple[Array, Array, Array]:
    y, x = _grid(s)
    bg = _plain_background(rng, s, (0.15, 0.15, 0.16))
    m = rng.uniform(0.06, 0.09)
    fg = (y > m) & (y < 1 - m) & (x > m * 0.8) & (x < 1 - m * 0.8)
    board = _jitter_colour(rng, (0.10, 0.42, 0.20), 0.03)
    img = np.where(fg[..., None], (0.9 + 0.1 * _noise(rng, s, 4))[..., None] * board[None, None], bg)
    copper = _jitter_colour(rng, (0.80, 0.62, 0.30), 0.03)
    for _ in range(rng.integers(5, 8)):  # traces: straight runs with one 90° bend
        p = rng.uniform(0.15, 0.85, 2)
        q = np.array([p[0], rng.uniform(0.15, 0.85)])
        r = np.array([rng.uniform(0.15, 0.85), q[1]])
        line = _polyline_mask(s, np.stack([p, q, r]), 2) & fg
        img[line] = copper
        pad = (np.hypot(y - r[0], x - r[1]) < 0.03) & fg
        img[pad] = copper * 1.1
    chip_c = rng.uniform(0.35, 0.65, 2)
    chip = (np.abs(y - chip_c[0]) < 0.12) & (np.abs(x - chip_c[1]) < 0.16)
    pins = (
        (np.abs(y - chip_c[0]) < 0.15)
        & (np.abs(x - chip_c[1]) < 0.14)
        & ((x * s / 3).astype(int) % 2 == 0)
        & ~chip
    )
    img[pins] = (0.78, 0.78, 0.80)
    img[chip] = 0.08 + 0.03 * _noise(rng, s, 6)[chip][:, None]
    dot = np.hypot(y - chip_c[0] + 0.08, x - chip_c[1] + 0.11) < 0.015
    img[dot] = 0.3
    return np.clip(img, 0, 1), fg, bg


# ------------------------------------------------------------------------------------------------------- defects
# A defect returns (region, painted): ``painted`` is the whole image with the defect applied inside ``region``.

DefectFn = Callable[[Rng, Array, Array, Array], tuple[Array, Array]]


def _point_in(rng: Rng, allowed: Array, margin: float = 0.15) -> tuple[float, float]:
    """A random point of ``allowed`` away from the border, in ``[0, 1]`` coordinates."""
    s = allowed.shape[0]
    inner = ndi.binary_erosion(allowed, iterations=max(1, int(margin * s / 2)))
    ys, xs = np.nonzero(inner if inner.any() else allowed)
    k = rng.integers(len(ys))
    return (ys[k] + 0.5) / s, (xs[k] + 0.5) / s


def _contrast(img: Array, strength: float) -> Array:
    """Push each pixel away from its luminance side: dark pixels brighter, bright pixels darker."""
    lum = img.mean(axis=2, keepdims=True)
    return np.where(lum < 0.55, img + (1 - img) * strength, img * (1 - strength))


def _scratch(rng: Rng, img: Array, allowed: Array, bg: Array) -> tuple[Array, Array]:
    s = img.shape[0]
    p0 = np.array(_point_in(rng, allowed))
    ang = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.25, 0.45)
    d = np.array([np.sin(ang), np.cos(ang)])
    n = np.array([-d[1], d[0]])
    t = np.linspace(0, 1, 12)[:, None]
    pts = p0 + t * length * d + (t * (1 - t)) * rng.normal(0, 0.15) * n
    region = _polyline_mask(s, np.clip(pts, 0, 0.999), 1 + int(s >= 96)) & allowed
    return region, _contrast(img, 0.75)


def _crack(rng: Rng, img: Array, allowed: Array, bg: Array) -> tuple[Array, Array]:
    s = img.shape[0]
    p = np.array(_point_in(rng, allowed))
    ang = rng.uniform(0, 2 * np.pi)
    steps = np.cumsum(rng.normal(0, 0.5, 9)) + ang
    seg = rng.uniform(0.02, 0.05, 9)[:, None] * np.stack([np.sin(steps), np.cos(steps)], 1)
    pts = np.concatenate([p[None], p + np.cumsum(seg, 0)])
    branch_from = pts[rng.integers(2, 6)]
    b_steps = steps[0] + rng.choice([-1, 1]) * 1.0 + np.cumsum(rng.normal(0, 0.4, 4))
    branch = branch_from + np.cumsum(
        rng.uniform(0.02, 0.04, 4)[:, None] * np.stack([np.sin(b_steps), np.cos(b_steps)], 1), 0
    )
    region = _polyline_mask(s, np.clip(pts, 0, 0.999), 2) | _polyline_mask(
        s, np.clip(np.concatenate([branch_from[None], branch]), 0, 0.999), 1 + int(s >= 96)
    )
    return region & allowed, img * 0.18


def _hole(rng: Rng, img: Array, allowed: Array, bg: Array) -> tuple[Array, Array]:
    s = img.shape[0]
    cy, cx = _point_in(rng, allowed, 0.25)
    radius = rng.uniform(0.045, 0.08)
    region = _blob(rng, s, cy, cx, radius, 0.3) & allowed
    y, x = _grid(s)
    depth = np.clip(np.hypot(y - cy, x - cx) / radius, 0, 1)
    inside = 0.05 + 0.25 * depth[..., None] ** 3 * img  # dark pit with a lighter, frayed edge
    return region, inside


def _stain(rng: Rng, img: Array, allowed: Array, bg: Array) -> tuple[Array, Array]:
    s = img.shape[0]
    cy, cx = _point_in(rng, allowed, 0.2)
    region = _blob(rng, s, cy, cx, rng.uniform(0.06, 0.11), 0.45) & allowed
    colour = _jitter_colour(rng, (0.30, 0.20, 0.08), 0.05)
    alpha = 0.6 + 0.25 * _noise(rng, s, 10)[..., None]
    return region, img * (1 - alpha) + colour[None, None] * alpha


def _contamination(rng: Rng, img: Array, allowed: Array, bg: Array) -> tuple[Array, Array]:
    s = img.shape[0]
    cy, cx = _point_in(rng, allowed, 0.2)
    y, x = _grid(s)
    region = np.zeros((s, s), bool)
    for _ in range(rng.integers(3, 7)):  # a cluster of particles
        py, px = cy + rng.normal(0, 0.04), cx + rng.normal(0, 0.04)
        region |= np.hypot(y - py, x - px) < rng.uniform(1.2, 2.8) / s + 0.004
    fibre = np.array([cy, cx]) + np.cumsum(rng.normal(0, 0.025, (8, 2)), 0)  # and a hair-like fibre
    region |= _polyline_mask(s, np.clip(fibre, 0, 0.999), 1)
    colour = rng.choice(np.array([[0.05, 0.05, 0.05], [0.15, 0.25, 0.75], [0.85, 0.85, 0.80]], np.float32))
    return region & allowed, np.broadcast_to(colour, img.shape)


def _colour_change(rng: Rng, img: Array, allowed: Array, bg: Array) -> tuple[Array, Array]:
    s = img.shape[0]
    cy, cx = _point_in(rng, allowed, 0.2)
    region = _blob(rng, s, cy, cx, rng.uniform(0.08, 0.13), 0.4) & allowed
    tint = np.array([[0.9, 0.25, 0.2], [0.2, 0.35, 0.9], [0.25, 0.8, 0.3]], np.float32)[rng.integers(3)]
    lum = img.mean(axis=2, keepdims=True)
    return region, np.clip(0.25 * img + 0.75 * (0.35 + lum) * tint, 0, 1)


def _missing(rng: Rng, img: Array, allowed: Array, bg: Array) -> tuple[Array, Array]:
    """A chunk of the object is gone: a half-plane cut through the object, showing background."""
    s = img.shape[0]
    y, x = _grid(s)
    ys, xs = np.nonzero(allowed)
    cy, cx = (ys.mean() + 0.5) / s, (xs.mean() + 0.5) / s
    ang = rng.uniform(0, 2 * np.pi)
    proj = (y - cy) * np.sin(ang) + (x - cx) * np.cos(ang)
    inside = proj[allowed]
    cut = np.quantile(inside, 1 - rng.uniform(0.12, 0.22))
    wobble = 0.02 * (_noise(rng, s, 5) - 0.5)
    return allowed & (proj + wobble > cut), bg


DEFECTS: dict[str, DefectFn] = {
    "scratch": _scratch,
    "crack": _crack,
    "hole": _hole,
    "stain": _stain,
    "contamination": _contamination,
    "color": _colour_change,
    "missing": _missing,
}

TEXTURES: dict[str, tuple[Callable[[Rng, int], Array], tuple[str, ...]]] = {
    "carpet": (_carpet, ("hole", "stain", "contamination")),
    "wood": (_wood, ("scratch", "crack", "color")),
    "brushed_metal": (_brushed_metal, ("scratch", "stain", "hole")),
    "tile": (_tile, ("crack", "stain", "contamination")),
    "leather": (_leather, ("color", "hole", "scratch")),
}
OBJECTS: dict[str, tuple[Callable[[Rng, int], tuple[Array, Array, Array]], tuple[str, ...]]] = {
    "bottle": (_bottle, ("missing", "contamination", "crack")),
    "pill": (_pill, ("color", "crack", "contamination")),
    "metal_nut": (_metal_nut, ("scratch", "color", "missing")),
    "screw": (_screw, ("scratch", "missing", "contamination")),
    "pcb": (_pcb, ("scratch", "stain", "missing")),
}


def categories(domain: str) -> dict[str, tuple[str, ...]]:
    """Category → defect types of a domain."""
    table = {"textures": TEXTURES, "objects": OBJECTS}.get(domain)
    if table is None:
        raise ValueError(f"unknown synthetic domain {domain!r}; expected one of {DOMAIN_DIRS}")
    return {c: d for c, (_, d) in table.items()}


# ----------------------------------------------------------------------------------------------------- rendering


def _quantise(img: Array) -> Array:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def _rngs(seed: int, domain: str, category: str, split: str, index: int) -> tuple[Rng, Rng]:
    """Independent generators for the clean rendering and the defect of one item."""
    key = [
        seed,
        DOMAIN_DIRS.index(domain),
        list(categories(domain)).index(category),
        ("train", "test").index(split),
        index,
    ]
    clean, defect = np.random.SeedSequence(key).spawn(2)
    return np.random.default_rng(clean), np.random.default_rng(defect)


def render_clean(
    domain: str, category: str, split: str, index: int, seed: int, size: int
) -> tuple[Array, Array, Array]:
    """Defect-free rendering of one item: ``(image float [S,S,3], allowed-defect mask [S,S], background)``."""
    rng, _ = _rngs(seed, domain, category, split, index)
    if domain == "textures":
        img = TEXTURES[category][0](rng, size).astype(np.float32)
        return img, np.ones((size, size), bool), img
    img, fg, bg = OBJECTS[category][0](rng, size)
    return img.astype(np.float32), fg, bg.astype(np.float32)


def render_item(
    domain: str, category: str, split: str, index: int, seed: int, size: int, defect: str | None
) -> tuple[Array, Array, Array]:
    """One item as written to disk: ``(image uint8 [S,S,3], mask bool [S,S], clean uint8 [S,S,3])``.

    The mask is exactly the set of pixels whose value differs from the clean rendering: inside the defect region
    a pixel that the defect happened to leave unchanged is nudged by 12 levels, so the property is exact.
    """
    clean, allowed, bg = render_clean(domain, category, split, index, seed, size)
    q_clean = _quantise(clean)
    if defect is None:
        return q_clean, np.zeros((size, size), bool), q_clean
    _, rng = _rngs(seed, domain, category, split, index)
    region, painted = DEFECTS[defect](rng, clean, allowed, bg)
    for _ in range(8):  # a defect clipped to almost nothing by the object's outline is redrawn
        if region.sum() >= max(6, size * size // 2000):
            break
        region, painted = DEFECTS[defect](rng, clean, allowed, bg)
    out = q_clean.copy()
    out[region] = _quantise(painted)[region]
    same = region & (out == q_clean).all(axis=2)
    out[same, 0] = np.where(q_clean[same, 0] < 128, q_clean[same, 0] + 12, q_clean[same, 0] - 12)
    return out, region, q_clean


def _plan(opts: SynthOptions, defects: tuple[str, ...]) -> list[str | None]:
    """Test items of a category: normal first, then anomalies dealt round-robin over the defect types."""
    n_anom = int(round(opts.n_test * opts.anomaly_fraction))
    if opts.n_test > 0 and 0 < opts.anomaly_fraction < 1:
        n_anom = min(max(n_anom, 1), opts.n_test - 1)  # keep both classes so image AUROC is defined
    return [None] * (opts.n_test - n_anom) + [defects[i % len(defects)] for i in range(n_anom)]


def _save(arr: Array, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, optimize=False)


def _write_domain(
    domain: str, out: Path, opts: SynthOptions, progress: object | None = None
) -> dict[str, int]:
    counts = {"train": 0, "test": 0, "anomalous": 0}
    for cat, defects in categories(domain).items():
        for i in range(opts.n_train):
            img, _, _ = render_item(domain, cat, "train", i, opts.seed, opts.size, None)
            _save(img, out / cat / "train" / "good" / f"{i:03d}.png")
            counts["train"] += 1
        per_folder: dict[str, int] = {}
        for i, defect in enumerate(_plan(opts, defects)):
            img, mask, _ = render_item(domain, cat, "test", i, opts.seed, opts.size, defect)
            folder = defect or "good"
            k = per_folder.get(folder, 0)
            per_folder[folder] = k + 1
            _save(img, out / cat / "test" / folder / f"{k:03d}.png")
            if defect is not None:
                _save(
                    (mask * 255).astype(np.uint8), out / cat / "ground_truth" / folder / f"{k:03d}_mask.png"
                )
                counts["anomalous"] += 1
            counts["test"] += 1
        if progress is not None:
            progress.update(1)
    return counts


# -------------------------------------------------------------------------------------------------- entry points

MANIFEST = "manifest.json"


def generate_synthetic(
    out_dir: str | Path, opts: SynthOptions | None = None, show_progress: bool = True
) -> Path:
    """Write the benchmark to ``out_dir`` (replacing the domain folders of an earlier generation) and its manifest."""
    from tqdm.auto import tqdm

    opts = opts or SynthOptions()
    if opts.size < 16 or opts.n_test < 0 or opts.n_train < 0 or not 0 <= opts.anomaly_fraction <= 1:
        raise ValueError(f"bad synthetic options {opts}: size ≥ 16, counts ≥ 0, anomaly_fraction in [0, 1]")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an interrupted generation must not look complete
    counts = {}
    total = sum(len(categories(d)) for d in DOMAIN_DIRS)
    with tqdm(total=total, desc="synthetic data", unit="category", disable=not show_progress) as bar:
        for domain in DOMAIN_DIRS:
            tmp = out / f".{domain}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            counts[domain] = _write_domain(domain, tmp, opts, bar)
            shutil.rmtree(out / domain, ignore_errors=True)
            tmp.rename(out / domain)
    manifest = {
        "generator": "zsad.synthetic",
        "version": GENERATOR_VERSION,
        "options": asdict(opts),
        "counts": counts,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def ensure_synthetic(out_dir: str | Path, seed: int = 0, show_progress: bool = True, **opts: object) -> Path:
    """Generate the benchmark into ``out_dir`` unless an identical generation (same options) is already there.

    Args:
        out_dir: output folder (``OUT`` above).
        seed: generator seed.
        show_progress: show a progress bar while generating.
        **opts: other ``SynthOptions`` fields (``size``, ``n_test``, ``n_train``, ``anomaly_fraction``).

    Raises:
        DataError: ``out_dir`` holds domain folders that this generator did not write (no manifest): nothing is
            overwritten.
    """
    wanted = SynthOptions(seed=seed, **opts)  # type: ignore[arg-type]
    out = Path(out_dir)
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            found = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            found = {}
        if found.get("version") == GENERATOR_VERSION and found.get("options") == asdict(wanted):
            if all((out / d).is_dir() for d in DOMAIN_DIRS):
                return out
    elif any((out / d).exists() for d in DOMAIN_DIRS):
        raise DataError(
            f"{out} holds {'/'.join(DOMAIN_DIRS)} folders without {MANIFEST}: not written by the synthetic generator; "
            "remove them or choose another output folder"
        )
    return generate_synthetic(out, wanted, show_progress)


def contact_sheet(out_dir: str | Path, png_path: str | Path, per_category: int = 6, scale: int = 1) -> Path:
    """Save a grid PNG: one row per category (textures then objects), normal and anomalous test images, masks
    outlined in red. Useful to eyeball the data."""
    out = Path(out_dir)
    rows = []
    for domain in DOMAIN_DIRS:
        for cat in categories(domain):
            test = out / domain / cat / "test"
            normal = sorted((test / "good").glob("*.png"))[:2]
            anomal = sorted(p for p in test.glob("*/*.png") if p.parent.name != "good")
            tiles = [_outlined(p, None) for p in normal]
            tiles += [
                _outlined(p, out / domain / cat / "ground_truth" / p.parent.name / f"{p.stem}_mask.png")
                for p in anomal
            ]
            tiles = tiles[:per_category]
            if not tiles:
                continue
            h, w = tiles[0].shape[:2]
            tiles += [np.full((h, w, 3), 255, np.uint8)] * (per_category - len(tiles))
            rows.append(
                np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], 1)
            )
    if not rows:
        raise DataError(f"no synthetic test images under {out}; run ensure_synthetic first")
    sheet = np.concatenate(rows, 0)
    if scale > 1:
        sheet = sheet.repeat(scale, 0).repeat(scale, 1)
    png_path = Path(png_path)
    _save(sheet, png_path)
    return png_path


def _outlined(image: Path, mask: Path | None) -> Array:
    img = np.array(Image.open(image).convert("RGB"))
    if mask is not None:
        m = np.asarray(Image.open(mask)) > 0
        ring = ndi.binary_dilation(m, iterations=2) & ~ndi.binary_dilation(
            m
        )  # outside, so the defect stays visible
        img[ring] = (255, 0, 0)
    return img
