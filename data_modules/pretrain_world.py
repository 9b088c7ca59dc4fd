"""The pretraining world: procedural captioned images for the toy backbones, disjoint from the benchmark.

``zsad pretrain`` trains the toy CLIP and the toy DINOv3 on this world instead of the web: fourteen categories (seven
textures, seven objects) that share **no category, image or seed** with the embedded benchmark
(``data_modules/synthetic.py``: carpet, wood, brushed metal, tile, leather, bottle, pill, metal nut, screw, pcb).
Each item is a normal or a defective rendering with a pixel mask of its defect, and a caption composed from its
class name, a state (the normal / anomalous state words of ``zsad.prompts.ensemble`` and the defect's name) and its
attributes (colour, background, size)::

    "a photo of the damaged small red gear with a scratch on a white background."
    "a close-up photo of a flawless coarse blue marble."

What the toy backbones can learn here is what real CLIP learns from the web about defects: a vocabulary of damage
(scratch, crack, hole, stain, contamination, colour change, missing part, burn, dent) painted on many kinds of
surfaces and things, named in words. The defect painters draw with the benchmark's geometry primitives (blobs,
polylines, value noise) but with their own parameters, colours and two extra defect kinds, so the benchmark's exact
defect appearance is never shown.

Every item is drawn from its own ``numpy.random.Generator`` seeded by ``(WORLD_TAG, seed, category, index)``:
``WORLD_TAG`` keeps every seed sequence apart from the benchmark's ``(seed, domain, category, split, index)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

# The benchmark's drawing primitives (pure geometry and noise, no category or seed of its own).
from data_modules.synthetic import _blob, _fractal, _grid, _noise, _polyline_mask, _rotated

WORLD_VERSION = 1
# First entry of every seed sequence of the world: no benchmark seed sequence starts with it (theirs start with
# the benchmark seed, a small integer, and have five entries).
WORLD_TAG = 0x70726574  # "pret"

Array = np.ndarray
Rng = np.random.Generator

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.80, 0.16, 0.14),
    "orange": (0.92, 0.52, 0.12),
    "yellow": (0.92, 0.82, 0.20),
    "green": (0.22, 0.62, 0.25),
    "blue": (0.18, 0.32, 0.80),
    "purple": (0.52, 0.24, 0.66),
    "pink": (0.92, 0.55, 0.66),
    "brown": (0.50, 0.32, 0.18),
    "white": (0.90, 0.90, 0.88),
    "grey": (0.55, 0.56, 0.58),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.07, 0.07, 0.08),
    "white": (0.88, 0.88, 0.86),
    "grey": (0.45, 0.45, 0.46),
    "blue": (0.15, 0.22, 0.45),
    "green": (0.16, 0.36, 0.18),
    "beige": (0.80, 0.72, 0.56),
}
# size words: objects are small or large in the frame; textures have a fine or coarse pattern.
OBJECT_SIZES = {"small": (0.62, 0.75), "large": (0.88, 1.0)}
TEXTURE_SIZES = {"fine": (1.3, 1.7), "coarse": (0.65, 0.85)}


def _col(rng: Rng, name: str, table: dict[str, tuple[float, float, float]], amount: float = 0.05) -> Array:
    rgb = np.asarray(table[name], np.float32)
    return np.clip(rgb * (1 + rng.normal(0, amount, 3).astype(np.float32)), 0, 1)


def _shade(base: Array, lum: Array) -> Array:
    """Colour ``base`` [3] modulated by a luminance map [S, S] around 1."""
    return np.clip(lum[..., None] * base[None, None], 0, 1).astype(np.float32)


# ------------------------------------------------------------------------------------------------------ textures
# A texture renderer: (rng, size, colour [3], pattern scale) → float32 [S, S, 3] in [0, 1].


def _marble(rng: Rng, s: int, c: Array, k: float) -> Array:
    y, x = _grid(s)
    turb = _fractal(rng, s, 3 * k, octaves=4)
    ang = rng.uniform(0, np.pi)
    veins = np.abs(np.sin((x * np.cos(ang) + y * np.sin(ang)) * 9 * k + 7 * turb)) ** 0.25
    lum = 0.55 + 0.5 * veins + 0.1 * _noise(rng, s, 12 * k)
    return _shade(c, lum)


def _denim(rng: Rng, s: int, c: Array, k: float) -> Array:
    y, x = _grid(s)
    f = 22 * k
    twill = 0.5 + 0.5 * np.sin((x + y) * f * np.pi)
    warp = 0.5 + 0.5 * np.sin(x * f * 2.1 * np.pi + rng.random() * 6)
    slub = _noise(rng, s, (2, s / 6))  # irregular yarn thickness along the threads
    lum = 0.6 + 0.25 * twill + 0.1 * warp + 0.2 * (slub - 0.5)
    return _shade(c, lum)


def _concrete(rng: Rng, s: int, c: Array, k: float) -> Array:
    base = _fractal(rng, s, 4 * k, octaves=4)
    pits = ndi.binary_dilation(rng.random((s, s)) < 0.004 * k, iterations=1)
    lum = 0.75 + 0.4 * (base - 0.5) - 0.35 * pits + 0.05 * rng.normal(0, 1, (s, s))
    return _shade(c * 0.6 + 0.25, lum)


def _cork(rng: Rng, s: int, c: Array, k: float) -> Array:
    grains = ndi.gaussian_filter(rng.random((s, s)).astype(np.float32), 1.2 / k)
    grains = (grains - grains.mean()) / (grains.std() + 1e-6)
    lum = 0.85 + 0.2 * np.tanh(grains) + 0.08 * (_noise(rng, s, 5) - 0.5)
    return _shade(c, lum)


def _brick(rng: Rng, s: int, c: Array, k: float) -> Array:
    y, x = _grid(s)
    rows = 6 * k
    v = y * rows + rng.random()
    u = x * rows / 2 + 0.5 * (np.floor(v) % 2) + rng.random()
    brick_id = (np.floor(u) * 5 + np.floor(v) * 17).astype(int) % 13
    per = rng.normal(0, 0.08, 13).astype(np.float32)[brick_id]
    mortar = (np.minimum(v % 1, 1 - v % 1) < 0.06) | (np.minimum(u % 1, 1 - u % 1) < 0.03)
    lum = 0.85 + per + 0.12 * (_noise(rng, s, 10 * k) - 0.5)
    img = _shade(c, lum)
    img[mortar] = np.float32(0.78) + rng.normal(0, 0.02)
    return img


def _terrazzo(rng: Rng, s: int, c: Array, k: float) -> Array:
    img = _shade(c * 0.3 + 0.6, 0.95 + 0.05 * _noise(rng, s, 6))
    # Chips: islands where a fine value noise peaks, each island one palette colour.
    chips, n = ndi.label(_noise(rng, s, 14 * k) > 0.8)
    palette = np.asarray(list(COLOURS.values()), np.float32)
    colours = palette[rng.integers(len(palette), size=n + 1)] * rng.uniform(0.8, 1.0, (n + 1, 1))
    img = np.where(chips[..., None] > 0, colours[chips], img)
    return img.astype(np.float32)


def _mesh(rng: Rng, s: int, c: Array, k: float) -> Array:
    y, x = _grid(s)
    f = 9 * k
    a, b = (x + y) * f + rng.random(), (x - y) * f + rng.random()
    wire_a = np.exp(-((((a % 1) - 0.5) / 0.09) ** 2))
    wire_b = np.exp(-((((b % 1) - 0.5) / 0.09) ** 2))
    over = ((np.floor(a) + np.floor(b)) % 2).astype(np.float32)  # which wire is on top at a crossing
    wire = np.maximum(wire_a * (0.7 + 0.3 * over), wire_b * (1 - 0.3 * over))
    back = np.float32(0.12) + 0.05 * _noise(rng, s, 3)
    lum = back + wire * 0.9
    return np.clip(lum[..., None] * (0.4 + 0.6 * c[None, None]), 0, 1).astype(np.float32)


# ------------------------------------------------------------------------------------------------------- objects
# An object renderer: (rng, size, colour [3], background [S, S, 3], scale) → (image, object mask).


def _centre(rng: Rng) -> tuple[float, float]:
    return tuple(0.5 + rng.normal(0, 0.03, 2))  # type: ignore[return-value]


def _button(rng: Rng, s: int, c: Array, bg: Array, k: float) -> tuple[Array, Array]:
    y, x = _grid(s)
    cy, cx = _centre(rng)
    r = np.hypot(y - cy, x - cx)
    big = 0.42 * k
    fg = r < big
    rim = np.exp(-(((r - big * 0.85) / (0.05 * k)) ** 2))
    lum = 0.85 + 0.3 * rim - 0.25 * (r / big) ** 4
    img = np.where(fg[..., None], _shade(c, lum), bg)
    ang = rng.uniform(0, np.pi / 2)
    for i in range(4):
        hy, hx = cy + 0.12 * k * np.sin(ang + i * np.pi / 2), cx + 0.12 * k * np.cos(ang + i * np.pi / 2)
        hole = np.hypot(y - hy, x - hx) < 0.035 * k
        img[hole] = bg[hole]
        fg = fg & ~hole
    return img, fg


def _coin(rng: Rng, s: int, c: Array, bg: Array, k: float) -> tuple[Array, Array]:
    y, x = _grid(s)
    cy, cx = _centre(rng)
    r = np.hypot(y - cy, x - cx)
    big = 0.4 * k
    fg = r < big
    relief = ndi.gaussian_filter(_fractal(rng, s, 6, octaves=2), 1.0)
    rim = (r > big * 0.86).astype(np.float32)
    ridges = 0.08 * np.sin(np.arctan2(y - cy, x - cx) * 90) * rim  # the milled edge
    lum = 0.8 + 0.35 * (relief - 0.5) * (1 - rim) + 0.25 * rim + ridges + 0.15 * (x - cx) / big
    return np.where(fg[..., None], _shade(c * 0.7 + 0.25, lum), bg), fg


def _gear(rng: Rng, s: int, c: Array, bg: Array, k: float) -> tuple[Array, Array]:
    y, x = _grid(s)
    cy, cx = _centre(rng)
    r = np.hypot(y - cy, x - cx)
    ang = np.arctan2(y - cy, x - cx)
    teeth = rng.integers(8, 14)
    outer = 0.36 * k + 0.05 * k * (np.cos(teeth * ang + rng.random() * 6) > 0.1)
    hole = r < 0.1 * k
    fg = (r < outer) & ~hole
    spokes = (np.cos(4 * ang) > 0.6) & (r > 0.16 * k) & (r < 0.27 * k)  # lightening holes between the spokes
    fg &= ~spokes
    lum = 0.75 + 0.3 * np.cos(ang - 0.8) * (r / (0.4 * k)) + 0.05 * _noise(rng, s, 10)
    return np.where(fg[..., None], _shade(c * 0.8 + 0.15, lum), bg), fg


def _battery(rng: Rng, s: int, c: Array, bg: Array, k: float) -> tuple[Array, Array]:
    y, x = _grid(s)
    cy, cx = _centre(rng)
    along, across = _rotated(y, x, cy, cx, rng.uniform(0, np.pi))
    half_l, half_w = 0.36 * k, 0.14 * k
    body = (np.abs(along) < half_l) & (np.abs(across) < half_w)
    cap = (along > half_l) & (along < half_l + 0.04 * k) & (np.abs(across) < half_w * 0.4)
    fg = body | cap
    cyl = 0.55 + 0.5 * np.cos(np.clip(across / half_w, -1, 1) * np.pi / 2)
    band = (along > half_l * 0.45).astype(np.float32)  # the metal end band
    img = np.where(body[..., None], _shade(c, cyl), bg)
    metal = _shade(np.array([0.75, 0.75, 0.78], np.float32), cyl)
    img = np.where((band[..., None] > 0) & body[..., None], metal, img)
    img = np.where(cap[..., None], metal, img)
    return img, fg


def _key(rng: Rng, s: int, c: Array, bg: Array, k: float) -> tuple[Array, Array]:
    y, x = _grid(s)
    cy, cx = _centre(rng)
    along, across = _rotated(y, x, cy, cx, rng.uniform(0, 2 * np.pi))
    bow_c = -0.25 * k
    bow = (np.hypot(along - bow_c, across) < 0.15 * k) & ~(np.hypot(along - bow_c, across) < 0.05 * k)
    blade = (along > bow_c) & (along < 0.38 * k) & (np.abs(across) < 0.045 * k)
    bits = (along > 0.1 * k) & (along < 0.36 * k) & (across > 0) & (across < 0.1 * k)
    bits &= np.sin(along * 60 / k) > -0.2  # the cut teeth
    fg = bow | blade | bits
    lum = 0.8 + 0.25 * np.cos(across / (0.15 * k) * np.pi / 2) + 0.05 * _noise(rng, s, 8)
    return np.where(fg[..., None], _shade(c * 0.7 + 0.25, lum), bg), fg


def _cup(rng: Rng, s: int, c: Array, bg: Array, k: float) -> tuple[Array, Array]:
    y, x = _grid(s)
    cy, cx = _centre(rng)
    r = np.hypot(y - cy, x - cx)
    big = 0.33 * k
    ang = rng.uniform(0, 2 * np.pi)
    hy, hx = cy + big * 1.05 * np.sin(ang), cx + big * 1.05 * np.cos(ang)
    handle = (np.hypot(y - hy, x - hx) < 0.09 * k) & ~(np.hypot(y - hy, x - hx) < 0.045 * k)
    fg = (r < big) | handle
    liquid = r < big * 0.78
    lum = np.where(liquid, 0.35 + 0.1 * _noise(rng, s, 4), 0.95 - 0.2 * (r / big))
    img = np.where(fg[..., None], _shade(c * 0.8 + 0.2, lum), bg)
    return img, fg


def _leaf(rng: Rng, s: int, c: Array, bg: Array, k: float) -> tuple[Array, Array]:
    y, x = _grid(s)
    cy, cx = _centre(rng)
    along, across = _rotated(y, x, cy, cx, rng.uniform(0, 2 * np.pi))
    half_l = 0.4 * k
    t = np.clip(along / half_l, -1, 1)
    width = 0.2 * k * np.sqrt(np.clip(1 - t**2, 0, 1)) * (1 - 0.3 * t)
    fg = (np.abs(along) < half_l) & (np.abs(across) < width)
    rib = np.abs(across) < 0.01 + 0.5 / s
    veins = np.abs(np.sin((along - 0.8 * np.abs(across)) * 28 / k)) < 0.12
    lum = 0.8 + 0.15 * _noise(rng, s, 6) - 0.2 * veins + 0.3 * rib
    return np.where(fg[..., None], _shade(c, lum), bg), fg


TEXTURES: dict[str, Callable[[Rng, int, Array, float], Array]] = {
    "marble": _marble,
    "denim": _denim,
    "concrete": _concrete,
    "cork": _cork,
    "brick": _brick,
    "terrazzo": _terrazzo,
    "wire mesh": _mesh,
}
OBJECTS: dict[str, Callable[[Rng, int, Array, Array, float], tuple[Array, Array]]] = {
    "button": _button,
    "coin": _coin,
    "gear": _gear,
    "battery": _battery,
    "key": _key,
    "cup": _cup,
    "leaf": _leaf,
}
CATEGORIES: tuple[str, ...] = (*TEXTURES, *OBJECTS)


# ------------------------------------------------------------------------------------------------------- defects
# A defect painter: (rng, clean image, allowed mask, background) → (region, painted image). The world's own
# parameters: scratches bright or dark and of varying width, stains of any colour, cracks that open to a shade …

DefectFn = Callable[[Rng, Array, Array, Array], tuple[Array, Array]]


def _spot(rng: Rng, allowed: Array) -> tuple[float, float]:
    """A random point of ``allowed`` (in [0, 1] coordinates), away from the image border."""
    s = allowed.shape[0]
    inner = allowed.copy()
    m = max(2, s // 10)
    inner[:m], inner[-m:], inner[:, :m], inner[:, -m:] = False, False, False, False
    ys, xs = np.nonzero(inner if inner.any() else allowed)
    i = rng.integers(len(ys))
    return (ys[i] + 0.5) / s, (xs[i] + 0.5) / s


def _w_scratch(rng: Rng, img: Array, allowed: Array, bg: Array) -> tuple[Array, Array]:
    s = img.shape[0]
    p0, ang = np.array(_spot(rng, allowed)), rng.uniform(0, 2 * np.pi)
    d = np.array([np.sin(ang), np.cos(ang)])
    t = np.linspace(0, 1, 10)[:, None]
    bend = (t * (1 - t)) * rng.normal(0, 0.2) * np.array([-d[1], d[0]])
    pts = p0 + t * rng.uniform(0.15, 0.5) * d + bend
    region = _polyline_mask(s, np.clip(pts, 0, 0.999), int(rng.integers(1, 4))) & allowed
    value = 0.95 if rng.random() < 0.5 else 0.08
    return region, img * 0.3 + value * 0.7


def _w_crack(rng: Rng, img: Array, allowed: Array, bg: Array) -> tuple[Array, Array]:
    s = img.shape[0]
    p = np.array(_spot(rng, allowed))
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.6, 12))
    steps = rng.uniform(0.015, 0.045, 12)[:, None] * np.stack([np.sin(heading), np.cos(heading)], 1)
    pts = np.concatenate([p[None], p + np.cumsum(steps, 0)])
    region = _polyline_mask(s, np.clip(pts, 0, 0.999), int(rng.integers(1, 3))) & allowed
    return region, img * rng.uniform(0.1, 0.35)


def _w_hole(rng: Rng, img: Array, allowed: Array, bg: Array) -> tuple[Array, Array]:
    s = img.shape[0]
    cy, cx = _spot(rng, allowed)
    region = _blob(rng, s, cy, cx, rng.uniform(0.03, 0.09), 0.3) & allowed
    return region, np.broadcast_to(np.float32(rng.uniform(0.0, 0.12)), img.shape)


def _w_stain(rng: Rng, img: Array, allowed: Array, bg: Array) -> tuple[Array, Array]:
    s = img.shape[0]
    cy, cx = _spot(rng, allowed)
    region = _blob(rng, s, cy, cx, rng.uniform(0.05, 0.14), 0.5) & allowed
    colour = np.asarray(list(COLOURS.values())[rng.integers(len(COLOURS))], np.float32) * rng.uniform(0.4, 1)
    alpha = 0.45 + 0.4 * _noise(rng, s, 8)[..., None]
    return region, img * (1 - alpha) + colour[None, None] * alpha


def _w_contamination(rng: Rng, img: Array, allowed: Array, bg: Array) -> tuple[Array, Array]:
    s = img.shape[0]
    cy, cx = _spot(rng, allowed)
    y, x = _grid(s)
    region = np.zeros((s, s), bool)
    for _ in range(rng.integers(2, 9)):
        py, px = cy + rng.normal(0, 0.05), cx + rng.normal(0, 0.05)
        region |= np.hypot(y - py, x - px) < rng.uniform(1.0, 3.5) / s + 0.003
    if rng.random() < 0.5:  # a hair or fibre
        fibre = np.array([cy, cx]) + np.cumsum(rng.normal(0, 0.03, (8, 2)), 0)
        region |= _polyline_mask(s, np.clip(fibre, 0, 0.999), 1)
    colour = np.float32(rng.uniform(0, 1, 3))
    return region & allowed, np.broadcast_to(colour, img.shape)


def _w_colour(rng: Rng, img: Array, allowed: Array, bg: Array) -> tuple[Array, Array]:
    s = img.shape[0]
    cy, cx = _spot(rng, allowed)
    region = _blob(rng, s, cy, cx, rng.uniform(0.07, 0.15), 0.4) & allowed
    tint = np.asarray(list(COLOURS.values())[rng.integers(len(COLOURS))], np.float32)
    lum = img.mean(axis=2, keepdims=True)
    return region, np.clip(0.3 * img + 0.7 * (0.3 + lum) * tint, 0, 1)


def _w_missing(rng: Rng, img: Array, allowed: Array, bg: Array) -> tuple[Array, Array]:
    """A bite out of the object's outline shows the background."""
    s = img.shape[0]
    edge = allowed & ~ndi.binary_erosion(allowed, iterations=2)
    ys, xs = np.nonzero(edge if edge.any() else allowed)
    i = rng.integers(len(ys))
    region = _blob(rng, s, (ys[i] + 0.5) / s, (xs[i] + 0.5) / s, rng.uniform(0.07, 0.14), 0.4) & allowed
    return region, bg


def _w_burn(rng: Rng, img: Array, allowed: Array, bg: Array) -> tuple[Array, Array]:
    """A scorch mark: dark core fading into a brownish rim."""
    s = img.shape[0]
    cy, cx = _spot(rng, allowed)
    radius = rng.uniform(0.05, 0.12)
    region = _blob(rng, s, cy, cx, radius, 0.5) & allowed
    y, x = _grid(s)
    t = np.clip(np.hypot(y - cy, x - cx) / radius, 0, 1)[..., None]
    char = np.array([0.05, 0.03, 0.02], np.float32)
    scorch = np.array([0.45, 0.25, 0.08], np.float32)
    return region, (1 - t) * char + t * (0.5 * img + 0.5 * scorch)


def _w_dent(rng: Rng, img: Array, allowed: Array, bg: Array) -> tuple[Array, Array]:
    """A dent: the surface is shaded as if pressed in (light on one side, dark on the other)."""
    s = img.shape[0]
    cy, cx = _spot(rng, allowed)
    radius = rng.uniform(0.05, 0.11)
    region = _blob(rng, s, cy, cx, radius, 0.2) & allowed
    y, x = _grid(s)
    ang = rng.uniform(0, 2 * np.pi)
    slope = ((y - cy) * np.sin(ang) + (x - cx) * np.cos(ang)) / radius
    shade = np.clip(1 + 0.9 * slope, 0.15, 1.9)[..., None]
    return region, np.clip(img * shade, 0, 1)


DEFECTS: dict[str, DefectFn] = {
    "scratch": _w_scratch,
    "crack": _w_crack,
    "hole": _w_hole,
    "stain": _w_stain,
    "contamination": _w_contamination,
    "color": _w_colour,
    "missing": _w_missing,
    "burn": _w_burn,
    "dent": _w_dent,
}
# How a caption names a defect: "<object> with a scratch", "with contamination", "with a missing part".
DEFECT_PHRASES: dict[str, str] = {
    "scratch": "a scratch",
    "crack": "a crack",
    "hole": "a hole",
    "stain": "a stain",
    "contamination": "contamination",
    "color": "a color change",
    "missing": "a missing part",
    "burn": "a burn mark",
    "dent": "a dent",
}


def defects_of(category: str) -> tuple[str, ...]:
    """Defect kinds of a category (textures have no outline, so nothing can be missing)."""
    if category in TEXTURES:
        return tuple(d for d in DEFECTS if d != "missing")
    if category in OBJECTS:
        return tuple(DEFECTS)
    raise ValueError(f"unknown world category {category!r}; expected one of {CATEGORIES}")


# ------------------------------------------------------------------------------------------------------- items


@dataclass(frozen=True, eq=False)
class WorldItem:
    """One world item.

    Attributes:
        image: uint8 [S, S, 3].
        mask: bool [S, S]: exactly the pixels the defect changed (all false for a normal item).
        clean: uint8 [S, S, 3]: the same rendering without the defect (its *clean twin*; ``image`` when normal).
        category: class name (``gear``, ``wire mesh`` …).
        kind: ``texture`` or ``object``.
        colour, background, size: attribute words (background is ``""`` for textures).
        defect: defect kind, or ``None`` for a normal item.
        index: the item's index in its category (with the seed, it names the item's caption generator).
    """

    image: Array
    mask: Array
    clean: Array
    category: str
    kind: str
    colour: str
    background: str
    size: str
    defect: str | None
    index: int = 0


def _rngs(seed: int, category: str, index: int) -> tuple[Rng, Rng, Rng]:
    """Independent generators for the attributes + clean rendering, the defect and the caption of one item."""
    key = [WORLD_TAG, seed, CATEGORIES.index(category), index]
    return tuple(np.random.default_rng(s) for s in np.random.SeedSequence(key).spawn(3))  # type: ignore[return-value]


def caption_rng(seed: int, item: WorldItem) -> Rng:
    """The generator of an item's canonical caption (independent of its rendering)."""
    return _rngs(seed, item.category, item.index)[2]


def _quantise(img: Array) -> Array:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def render_item(seed: int, category: str, index: int, size: int = 128, anomaly_p: float = 0.5) -> WorldItem:
    """Render item ``index`` of ``category``: attributes, clean image, optional defect and caption."""
    rng, drng, _ = _rngs(seed, category, index)
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    defect = None
    if rng.random() < anomaly_p:
        kinds = defects_of(category)
        defect = kinds[rng.integers(len(kinds))]
    if category in TEXTURES:
        kind, background = "texture", ""
        size_word = list(TEXTURE_SIZES)[rng.integers(len(TEXTURE_SIZES))]
        scale = rng.uniform(*TEXTURE_SIZES[size_word])
        clean = TEXTURES[category](rng, size, _col(rng, colour, COLOURS), scale)
        allowed, bg = np.ones((size, size), bool), clean
    else:
        kind = "object"
        # The background differs from the object's colour, or the object would vanish.
        choices = [b for b in BACKGROUNDS if b not in (colour, "grey" if colour == "grey" else "")]
        background = choices[rng.integers(len(choices))]
        size_word = list(OBJECT_SIZES)[rng.integers(len(OBJECT_SIZES))]
        scale = rng.uniform(*OBJECT_SIZES[size_word])
        lum = 1 + 0.08 * (_noise(rng, size, 2) - 0.5) + 0.02 * rng.normal(0, 1, (size, size))
        bg = _shade(_col(rng, background, BACKGROUNDS, 0.03), lum)
        clean, allowed = OBJECTS[category](rng, size, _col(rng, colour, COLOURS), bg, scale)
    clean = np.clip(clean, 0, 1).astype(np.float32)
    q_clean = _quantise(clean)
    mask = np.zeros((size, size), bool)
    out = q_clean
    if defect is not None:
        region, painted = DEFECTS[defect](drng, clean, allowed, bg)
        for _ in range(8):  # a defect clipped to almost nothing by the outline is redrawn
            if region.sum() >= max(6, size * size // 2000):
                break
            region, painted = DEFECTS[defect](drng, clean, allowed, bg)
        out = q_clean.copy()
        out[region] = _quantise(np.asarray(painted, np.float32))[region]
        same = region & (out == q_clean).all(axis=2)  # keep the mask exact: every masked pixel differs
        out[same, 0] = np.where(q_clean[same, 0] < 128, q_clean[same, 0] + 24, q_clean[same, 0] - 24)
        mask = region & (out != q_clean).any(axis=2)
        if not mask.any():
            defect = None
    return WorldItem(out, mask, q_clean, category, kind, colour, background, size_word, defect, index)


@dataclass(frozen=True)
class CaptionVocab:
    """The words captions are composed of. zsad passes the state words and templates of ``zsad.prompts``
    (``zsad.pretrain.world.VOCAB``); they are arguments here because the data layer imports nothing of zsad.

    Attributes:
        normal_states, anomalous_states: ``"flawless {}"``-style state words.
        templates: ``"a photo of a {}."``-style sentence templates.
    """

    normal_states: tuple[str, ...]
    anomalous_states: tuple[str, ...]
    templates: tuple[str, ...]


def caption(
    item: WorldItem,
    rng: Rng,
    vocab: CaptionVocab,
    defect: str | None | bool = True,
    generic_p: float = 0.2,
    drop_p: float = 0.4,
) -> str:
    """A random caption of an item: template(state(noun)) [+ defect] [+ background].

    The noun is ``[size] [colour] class`` (each attribute dropped with ``drop_p``; the class replaced by the generic
    ``object`` with ``generic_p``, as object-agnostic prompts say it); the state is one of the normal or anomalous
    state words (anomalous items also name their defect most of the time); the template is one of the sentence
    templates.

    Args:
        item: the item described.
        rng: the caption's generator (``caption_rng`` for the canonical caption).
        vocab: state words and templates.
        defect: ``True``: the item's own state; ``None``/``False``: describe it as normal (a crop that misses the
            defect); a defect name: describe it with that defect.
        generic_p: probability of the class word ``object``.
        drop_p: probability of leaving out each attribute.
    """
    if defect is True:
        defect = item.defect
    defect = defect or None
    noun = "object" if rng.random() < generic_p else item.category
    words = [w for w in (item.size, item.colour) if rng.random() >= drop_p]
    noun = " ".join([*words, noun])
    states = vocab.normal_states if defect is None else vocab.anomalous_states
    phrase = states[rng.integers(len(states))].format(noun)
    if defect is not None and rng.random() < 0.75:
        phrase += f" with {DEFECT_PHRASES[defect]}"
    if item.background and rng.random() >= drop_p:
        phrase += f" on a {item.background} background"
    return vocab.templates[rng.integers(len(vocab.templates))].format(phrase)


def render_world(
    seed: int = 0, per_category: int = 100, size: int = 128, workers: int = 1, show_progress: bool = True
) -> list[WorldItem]:
    """Every item of the world, categories in order, ``per_category`` items each (deterministic by ``seed``)."""
    from tqdm.auto import tqdm

    jobs = [(seed, c, i, size) for c in CATEGORIES for i in range(per_category)]
    bar = tqdm(total=len(jobs), desc="pretraining world", unit="img", disable=not show_progress)
    if workers <= 1:
        out = []
        for job in jobs:
            out.append(render_item(*job))
            bar.update(1)
    else:
        import multiprocessing as mp

        # fork where the platform has it: the workers only run numpy, and a spawned worker would re-import the
        # caller's whole program (torch included) before drawing anything.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            out = []
            for item in pool.imap(_render_job, jobs, chunksize=16):
                out.append(item)
                bar.update(1)
    bar.close()
    return out


def _render_job(job: tuple[int, str, int, int]) -> WorldItem:
    return render_item(*job)


def contact_sheet(items: list[WorldItem], per_category: int = 6) -> Array:
    """uint8 grid: one row per category, masks outlined in red (to eyeball the world)."""
    rows = []
    for cat in CATEGORIES:
        tiles = []
        for it in [i for i in items if i.category == cat][:per_category]:
            img = it.image.copy()
            if it.mask.any():
                ring = ndi.binary_dilation(it.mask, iterations=2) & ~ndi.binary_dilation(it.mask)
                img[ring] = (255, 0, 0)
            tiles.append(np.pad(img, ((2, 2), (2, 2), (0, 0)), constant_values=255))
        if tiles:
            h, w = tiles[0].shape[:2]
            tiles += [np.full((h, w, 3), 255, np.uint8)] * (per_category - len(tiles))
            rows.append(np.concatenate(tiles, 1))
    return np.concatenate(rows, 0)
