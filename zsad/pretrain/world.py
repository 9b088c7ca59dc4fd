"""The pretraining world as tensors, and the random views both toy backbones train on.

``load_world`` renders the world of ``data_modules.pretrain_world`` once (in worker processes) into uint8 tensors:
each item's image, its defect mask and its *clean twin* (the same rendering without the defect). ``sample_views``
cuts random crops (scale, position, flips, quarter turns — one batched ``grid_sample``) and says for each crop
whether the defect is still in it, so that a caption describes what the crop shows: a crop that misses the defect
is described as normal. That is what makes the toy CLIP's local windows carry the defect words.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from data_modules import pretrain_world as W
from zsad.prompts.ensemble import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES

# The caption words are the prompts' own: what the toy CLIP learns to read is what the methods will say.
VOCAB = W.CaptionVocab(tuple(NORMAL_STATES), tuple(ANOMALOUS_STATES), tuple(TEMPLATES))


@dataclass
class WorldTensors:
    """The rendered world.

    Attributes:
        images: uint8 [N, 3, S, S] as rendered (defective or not).
        clean: uint8 [N, 3, S, S] the clean twin of every item (equal to ``images`` for normal items).
        masks: bool [N, S, S] defect masks.
        items: attributes of every item (their image arrays are dropped to save memory).
    """

    images: Tensor
    clean: Tensor
    masks: Tensor
    items: list[W.WorldItem]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def anomalous(self) -> Tensor:
        """Indices of the defective items."""
        return torch.nonzero(self.masks.flatten(1).any(1)).flatten()


def load_world(
    seed: int, per_category: int, size: int = 128, workers: int = 2, show_progress: bool = True
) -> WorldTensors:
    """Render the world (deterministic by ``seed``) into tensors, with the clean twins."""
    items = W.render_world(seed, per_category, size, workers=workers, show_progress=show_progress)
    images = torch.from_numpy(np.stack([it.image for it in items])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([it.mask for it in items]))
    clean = torch.from_numpy(np.stack([it.clean for it in items])).permute(0, 3, 1, 2).contiguous()
    light = [W.WorldItem(np.empty(0), np.empty(0), np.empty(0), *attrs(it)) for it in items]
    return WorldTensors(images, clean, masks, light)


def attrs(it: W.WorldItem) -> tuple:
    return (it.category, it.kind, it.colour, it.background, it.size, it.defect, it.index)


@dataclass
class Views:
    """A batch of random views.

    Attributes:
        images: float [B, 3, s, s] in [0, 1].
        masks: float [B, s, s] in [0, 1]: the defect's coverage of each output pixel.
        index: long [B] item of each view.
        has_defect: bool [B] whether the view shows enough of its item's defect to call it defective.
    """

    images: Tensor
    masks: Tensor
    index: Tensor
    has_defect: Tensor


def crop_params(
    n: int, gen: torch.Generator, scale: tuple[float, float] = (0.35, 1.0), turns: bool = True
) -> Tensor:
    """[n, 2, 3] affine matrices (``F.affine_grid`` convention) of random square crops with flips and quarter turns.

    The crop side is a fraction ``scale`` of the image side; its centre is uniform where the crop stays inside.
    """
    s = torch.empty(n).uniform_(*scale, generator=gen)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - s)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - s)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    k = torch.randint(0, 4 if turns else 1, (n,), generator=gen).float() * (torch.pi / 2)
    cos, sin = torch.cos(k), torch.sin(k)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = s * cos * flip, -s * sin
    theta[:, 1, 0], theta[:, 1, 1] = s * sin * flip, s * cos
    theta[:, 0, 2], theta[:, 1, 2] = cx, cy
    return theta


def warp(images: Tensor, theta: Tensor, size: int) -> Tensor:
    """Apply crops ``theta`` [B, 2, 3] to float images [B, C, S, S] → [B, C, size, size] (bilinear).

    Downscaling a whole 128² image to 112² with plain bilinear sampling aliases little; the crops mostly upscale.
    """
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def sample_views(
    world: WorldTensors,
    index: Tensor,
    size: int,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.35, 1.0),
    theta: Tensor | None = None,
    clean: bool = False,
    min_defect: float = 0.004,
) -> Views:
    """Random views of items ``index`` (or of their clean twins with ``clean``).

    Args:
        world: the rendered world.
        index: long [B] items.
        size: output side.
        gen: the generator of the crops.
        scale: crop side as a fraction of the image side.
        theta: crops to reuse (e.g. the same crop of an item and of its clean twin); drawn when ``None``.
        clean: take the clean twins.
        min_defect: fraction of the view the defect must cover (or 24 pixels, whichever is smaller) to count:
            a sliver at the crop's edge is not called a defect.
    """
    if theta is None:
        theta = crop_params(len(index), gen, scale)
    src = (world.clean if clean else world.images)[index].float() / 255.0
    if clean:  # a clean twin has no defect: nothing to warp for its mask
        imgs = warp(src, theta, size)
        masks = imgs.new_zeros(imgs.shape[0], size, size)
    else:  # image and mask in one grid_sample (channels are sampled independently: the same numbers, ~40 % faster)
        out = warp(torch.cat([src, world.masks[index].float()[:, None]], dim=1), theta, size)
        imgs, masks = out[:, :3].contiguous(), out[:, 3].contiguous()
    need = min(min_defect * size * size, 24.0)
    covered = masks.flatten(1).sum(1)
    return Views(imgs, masks, index, (covered >= need) & (covered > 0))


def captions(world: WorldTensors, views: Views, rng: np.random.Generator) -> list[str]:
    """One random caption per view: the item's attributes and the state the view shows."""
    out = []
    for i, has in zip(views.index.tolist(), views.has_defect.tolist()):
        item = world.items[i]
        out.append(W.caption(item, rng, VOCAB, defect=item.defect if has else None))
    return out
