"""Self-supervised pretraining of the toy DINOv3-architecture ViT on the world's images — no text, no masks.

The recipe is DINOv2/v3's core, shrunk: a student and an EMA teacher (the same timm DINOv3 ViT), multi-crop views
(two global crops, a few local crops; RoPE takes any size), and two self-distillation losses:

* **DINO** (image level): the student's CLS distribution over ``n_prototypes`` of every view matches the teacher's
  (centred, sharpened) distribution of the *other* global views;
* **iBOT** (patch level): a random share of the student's global-view patches is replaced by a learned mask token,
  and the student's distribution at those patches matches the teacher's at the same, unmasked patches.

``objective`` picks ``dino``, ``ibot`` or ``dino+ibot``; ``zsad pretrain --dino-objective`` and
``zsad.pretrain.measure`` compare them (why the default is what it is: README, toy section). Not included: KoLeo,
Gram anchoring, high-resolution adaptation, distillation from a larger model.

Only the backbone's weights are saved (timm keys, the file ``build_dinov3('tiny', FILE)`` loads); the heads, the
mask token and the teacher are training scaffolding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsad.backbones.dinov3 import TINY_PRESET
from zsad.methods.base import IMAGENET_MEAN, IMAGENET_STD
from zsad.pretrain.world import WorldTensors, crop_params, warp

OBJECTIVES = ("dino", "ibot", "dino+ibot")


@dataclass(frozen=True)
class DinoRecipe:
    """Everything that decides the toy DINOv3's weights besides the world (part of the cache manifest)."""

    steps: int = 200
    batch_size: int = 48
    objective: str = "dino"  # measured against ibot and dino+ibot: README, "Toy weights"
    lr: float = 1e-3
    weight_decay: float = 0.04
    warmup: int = 20
    global_size: int = 112
    local_size: int = 48
    n_local: int = 4
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.12, 0.4)
    n_prototypes: int = 1024
    head_hidden: int = 256
    head_bottleneck: int = 64
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    ema: tuple[float, float] = (0.99, 1.0)  # teacher momentum: cosine from the first to the second value
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # iBOT: share of masked patches per masked view, uniform
    mask_prob: float = 0.5  # iBOT: share of global views that are masked


def build_toy_dino(image_size: int = 112) -> nn.Module:
    """The toy DINOv3 ViT (``zsad.backbones.dinov3.TINY_PRESET``), any input size (RoPE, dynamic patch grid)."""
    preset = dict(TINY_PRESET)
    arch = preset.pop("base")
    return timm.create_model(
        arch, pretrained=False, num_classes=0, img_size=image_size, dynamic_img_size=True, **preset
    )


class Head(nn.Module):
    """DINO projection head: MLP → L2-normalised bottleneck → weight-normalised prototypes (logits)."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, n_prototypes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        self.prototypes = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck, n_prototypes, bias=False)
        )
        self.prototypes.parametrizations.weight.original0.data.fill_(1.0)  # unit-norm prototypes, fixed below
        self.prototypes.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.prototypes(F.normalize(self.mlp(x), dim=-1))


class Student(nn.Module):
    """Backbone + DINO head + iBOT head + mask token (the teacher is an EMA copy of the whole)."""

    def __init__(self, recipe: DinoRecipe) -> None:
        super().__init__()
        self.backbone = build_toy_dino(recipe.global_size)
        dim = int(self.backbone.embed_dim)
        args = (dim, recipe.head_hidden, recipe.head_bottleneck, recipe.n_prototypes)
        self.dino_head = Head(*args)
        self.ibot_head = Head(*args)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.mask_token, std=0.02)

    def tokens(self, images: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(CLS [B, C], patch tokens [B, N, C]) after the final norm; ``mask`` bool [B, gh, gw] → mask token."""
        m = self.backbone
        x = m.patch_embed(images)  # [B, gh, gw, C] (dynamic image size)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x, rope = m._pos_embed(x)
        x = m.norm_pre(x)
        for blk in m.blocks:
            x = blk(x, rope=rope)
        x = m.norm(x)
        return x[:, 0], x[:, m.num_prefix_tokens :]


def _augment(images: Tensor, gen: torch.Generator) -> Tensor:
    """Photometric jitter (brightness, contrast, saturation, sometimes grey): the views must agree despite it."""
    b = images.shape[0]
    u = lambda lo, hi: torch.empty(b, 1, 1, 1).uniform_(lo, hi, generator=gen)  # noqa: E731
    x = images * u(0.7, 1.3)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.7, 1.3) + mean
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * u(0.5, 1.5)
    to_grey = torch.rand(b, 1, 1, 1, generator=gen) < 0.15
    x = torch.where(to_grey, x.mean(1, keepdim=True).expand_as(x), x)
    return (x.clamp(0, 1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )


def _views(
    world: WorldTensors, recipe: DinoRecipe, gen: torch.Generator
) -> tuple[list[Tensor], list[Tensor]]:
    idx = torch.randint(len(world), (recipe.batch_size,), generator=gen)
    src = world.images[idx].float() / 255.0
    glob = [
        _augment(warp(src, crop_params(len(idx), gen, recipe.global_scale), recipe.global_size), gen)
        for _ in range(2)
    ]
    local = [
        _augment(warp(src, crop_params(len(idx), gen, recipe.local_scale), recipe.local_size), gen)
        for _ in range(recipe.n_local)
    ]
    return glob, local


def _random_masks(b: int, grid: tuple[int, int], recipe: DinoRecipe, gen: torch.Generator) -> Tensor:
    """bool [b, gh, gw]: a random share of patches per image (none for images left unmasked)."""
    n = grid[0] * grid[1]
    ratio = torch.empty(b).uniform_(*recipe.mask_ratio, generator=gen)
    ratio = torch.where(torch.rand(b, generator=gen) < recipe.mask_prob, ratio, torch.zeros(b))
    scores = torch.rand(b, n, generator=gen)
    ranks = scores.argsort(1).argsort(1)
    return (ranks < (ratio * n).round()[:, None]).view(b, *grid)


def _ce(teacher_probs: Tensor, student_logits: Tensor, temp: float) -> Tensor:
    """Cross-entropy of the student's tempered distribution against the teacher's probabilities, per row."""
    return -(teacher_probs * F.log_softmax(student_logits / temp, dim=-1)).sum(-1)


def train_dino(
    world: WorldTensors,
    recipe: DinoRecipe,
    seed: int,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Train the toy DINOv3 ViT; returns the backbone's timm state dict and the final losses."""
    if recipe.objective not in OBJECTIVES:
        raise ValueError(f"DINO objective {recipe.objective!r}; expected one of {OBJECTIVES}")
    use_dino, use_ibot = "dino" in recipe.objective, "ibot" in recipe.objective
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    student = Student(recipe)
    teacher = Student(recipe)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    other = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.99),
    )
    warm = recipe.warmup
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm
            if s < warm
            else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, recipe.steps - warm)))
        ),
    )
    centre_cls = torch.zeros(recipe.n_prototypes)
    centre_patch = torch.zeros(recipe.n_prototypes)
    running: dict[str, float] = {}
    for step in range(1, recipe.steps + 1):
        glob, local = _views(world, recipe, gen)
        b = glob[0].shape[0]
        grid = (recipe.global_size // 16, recipe.global_size // 16)
        masks = [_random_masks(b, grid, recipe, gen) if use_ibot else None for _ in glob]
        with torch.no_grad():
            t_cls, t_patch = teacher.tokens(torch.cat(glob))
            t_cls_logits = teacher.dino_head(t_cls)
            t_cls_p = F.softmax((t_cls_logits - centre_cls) / recipe.teacher_temp, dim=-1).chunk(2)
        s_cls, s_patch = student.tokens(torch.cat(glob), torch.cat(masks) if use_ibot else None)
        terms: dict[str, Tensor] = {}
        if use_dino:
            s_glob = student.dino_head(s_cls).chunk(2)
            s_loc = student.dino_head(student.tokens(torch.cat(local))[0]).chunk(len(local)) if local else ()
            losses = []
            for ti, tp in enumerate(t_cls_p):  # each teacher global view teaches every other student view
                for si, sl in enumerate((*s_glob, *s_loc)):
                    if si == ti:
                        continue
                    losses.append(_ce(tp, sl, recipe.student_temp).mean())
            terms["dino"] = torch.stack(losses).mean()
        if use_ibot:
            m = torch.cat(masks).flatten(1)  # [2B, N]
            with torch.no_grad():
                t_patch_logits = teacher.ibot_head(t_patch[m])
                t_patch_p = F.softmax((t_patch_logits - centre_patch) / recipe.teacher_temp, dim=-1)
            s_patch_logits = student.ibot_head(s_patch[m])
            # Each masked image weighs the same whatever its number of masked patches (as iBOT does).
            per_patch = _ce(t_patch_p, s_patch_logits, recipe.student_temp)
            weight = (1.0 / m.sum(1).clamp(min=1)).unsqueeze(1).expand_as(m)[m]
            terms["ibot"] = (per_patch * weight).sum() / max(1, int(m.any(1).sum()))
        loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            mom = (
                recipe.ema[1]
                - (recipe.ema[1] - recipe.ema[0]) * (math.cos(math.pi * step / recipe.steps) + 1) / 2
            )
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.mul_(mom).add_(ps.detach(), alpha=1 - mom)
            c = recipe.center_momentum
            centre_cls = c * centre_cls + (1 - c) * t_cls_logits.mean(0)
            if use_ibot and m.any():
                centre_patch = c * centre_patch + (1 - c) * t_patch_logits.mean(0)
        for k, v in terms.items():
            running[k] = v.item() if k not in running else 0.9 * running[k] + 0.1 * v.item()
        if progress is not None:
            progress(step, dict(running))
    # The teacher is the model DINO keeps (its EMA weights are smoother than the student's).
    state = {k: v.detach().clone() for k, v in teacher.backbone.state_dict().items()}
    return state, {f"{k}_loss": round(v, 4) for k, v in running.items()}


def recipe_dict(recipe: DinoRecipe) -> dict:
    return {"architecture": {k: v for k, v in TINY_PRESET.items()}, **asdict(recipe)}
