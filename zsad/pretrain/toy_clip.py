"""Contrastive image–text pretraining of the toy CLIP (open_clip architecture, both towers) on the world.

The loss is open_clip's own ``ClipLoss`` (symmetric InfoNCE over the batch with a learned temperature), called as a
library function. Two choices of the batch make the little model learn what anomaly detection reads:

* **views, not images**: every image is a random crop (35–100 % of the side, flips, quarter turns) captioned
  with what the crop shows — a crop that misses the defect is captioned normal — so small windows learn the state;
* **clean twins**: part of every batch are pairs (a defective view, the *same* crop of its clean twin). The two
  images differ only in the defect and their captions mostly in the state words, so the contrastive loss can only
  tell them apart through the defect (hard negatives, as in NegCLIP);
* **token dropping** (FLIP): most steps encode a random subset of the patch tokens (a fixed count per step), which
  makes a step several times cheaper on the CPU; the caption's state follows the *kept* patches (a defect whose
  patches were all dropped is not shown, so it is not named). The last steps see every token, as at test time.

One term is added to open_clip's loss, because the contrastive loss alone supervises only the CLS token and left the
patch tokens the methods read near-uniform (README, "The default leaderboard"): the **dense state term**
(``dense_loss``, weight ``dense_weight``) classifies the V-V patch tokens of every block (the path the AnomalyCLIP
family reads, from block 1 as in the toy presets) as normal or anomalous against the text of the two states, with
per-patch labels from the defect masks. It is the toy stand-in for what a web-scale CLIP brings and a 4-block CLIP
trained on ~58 000 views does not by itself: patch tokens that know the state words. Real CLIP weights are trained without it.
The same views' global embeddings can be classified the same way (``image_weight``; off by default: measured to move
image AUROC from one domain to the other rather than up, README "What was tried").

The vision forward used here is open_clip's ``VisionTransformer`` forward (conv1 → CLS + positional embedding →
``ln_pre`` → blocks → ``ln_post`` → ``proj``) with the token subset taken after the positional embedding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.model import CLIP
from torch import Tensor

from zsad.backbones.clip import TOY_CONFIG, _tokenizer
from zsad.backbones.clip.attention import _mlp_residual, dual_attention
from zsad.methods.base import CLIP_MEAN, CLIP_STD
from zsad.pretrain.world import VOCAB, Views, WorldTensors, captions, crop_params, sample_views


@dataclass(frozen=True)
class ClipRecipe:
    """Everything that decides the toy CLIP's weights besides the world (part of the cache manifest)."""

    steps: int = 400
    batch_size: int = 96
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 20
    twin_frac: float = 0.5  # share of the batch made of (defective view, clean twin view) pairs
    min_scale: float = 0.35  # smallest crop side, as a fraction of the image side
    image_size: int = 112
    keep_tokens: tuple[int, ...] = (16, 24)  # patch tokens kept per step (drawn per step); () = all
    full_frac: float = 0.2  # the last share of steps keeps every token
    # dense state term: views per step whose V-V patch tokens (what the methods read) are classified normal /
    # anomalous against the text of the two states (0 = off)
    dense_batch: int = 48
    dense_weight: float = 3.0
    # a patch is anomalous when the defect covers this share of it (covered, but less: ignored)
    dense_min_cover: float = 0.25
    # image state term: the same views' global embeddings classified normal / anomalous (0 = off)
    image_weight: float = 0.0


def build_toy_clip() -> CLIP:
    """The toy CLIP (``zsad.backbones.clip.TOY_CONFIG``) with open_clip's initialisation."""
    cfg = dict(TOY_CONFIG)
    return CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=cfg["vision_cfg"],
        text_cfg=cfg["text_cfg"],
        quick_gelu=cfg["quick_gelu"],
    )


def encode_text(model: CLIP, tokens: Tensor) -> Tensor:
    """Unit text features of ``tokens`` [B, L] for any L ≤ the context length (captions are short: the padding
    columns are cut off before the call, which changes nothing under the causal mask and saves most of the work)."""
    length = tokens.shape[1]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection  # EOT has the top id
    return F.normalize(pooled, dim=-1)


def tokenize(texts: list[str]) -> Tensor:
    """CLIP BPE ids [B, L] with L the longest caption (not the 77-token context)."""
    tokens = _tokenizer(int(TOY_CONFIG["text_cfg"]["context_length"]))(texts)
    length = int((tokens != 0).sum(1).max())
    return tokens[:, :length]


def _normalise(images: Tensor) -> Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def keep_index(b: int, n_patches: int, n_keep: int | None, gen: torch.Generator) -> Tensor | None:
    """long [b, n_keep]: a random subset of patch indices per image (sorted), or ``None`` to keep all."""
    if n_keep is None or n_keep >= n_patches:
        return None
    return torch.rand(b, n_patches, generator=gen).argsort(1)[:, :n_keep].sort(1).values


def patch_cover(masks: Tensor, patch: int) -> Tensor:
    """[B, N]: the share of each patch the defect covers (masks [B, S, S] in [0, 1])."""
    return F.avg_pool2d(masks[:, None], patch).flatten(1)


def kept_defect(views: Views, keep: Tensor | None, patch: int, min_defect: float = 0.004) -> Tensor:
    """bool [B]: whether the kept patches of each view show enough of its defect (``sample_views``' rule)."""
    if keep is None:
        return views.has_defect
    per_patch = patch_cover(views.masks, patch) * patch * patch  # defect pixels per patch
    covered = per_patch.gather(1, keep).sum(1)
    size = views.masks.shape[-1]
    need = min(min_defect * size * size, 24.0)
    return (covered >= need) & (covered > 0)


def make_batch(
    world: WorldTensors,
    recipe: ClipRecipe,
    gen: torch.Generator,
    rng: np.random.Generator,
    n_keep: int | None = None,
) -> tuple[Tensor, list[str], Tensor | None]:
    """CLIP-normalised images [B, 3, s, s], their captions and kept patch indices (``None`` = all tokens).

    Twin pairs come first (a defective view and the same crop of its clean twin, with the same kept patches),
    then random views.
    """
    n_pairs = int(recipe.batch_size * recipe.twin_frac) // 2
    n_rand = recipe.batch_size - 2 * n_pairs
    patch = int(TOY_CONFIG["vision_cfg"]["patch_size"])
    n_patches = (recipe.image_size // patch) ** 2
    scale = (recipe.min_scale, 1.0)
    parts, texts, keeps = [], [], []
    if n_pairs:
        anomalous = world.anomalous
        idx = anomalous[torch.randint(len(anomalous), (n_pairs,), generator=gen)]
        theta = crop_params(n_pairs, gen, scale)
        keep = keep_index(n_pairs, n_patches, n_keep, gen)
        for clean in (False, True):
            v = sample_views(world, idx, recipe.image_size, gen, theta=theta, clean=clean)
            v.has_defect = kept_defect(v, keep, patch)
            parts.append(v.images)
            texts += captions(world, v, rng)
            keeps.append(keep)
    idx = torch.randint(len(world), (n_rand,), generator=gen)
    v = sample_views(world, idx, recipe.image_size, gen, scale)
    keep = keep_index(n_rand, n_patches, n_keep, gen)
    v.has_defect = kept_defect(v, keep, patch)
    parts.append(v.images)
    texts += captions(world, v, rng)
    keeps.append(keep)
    kept = None if n_keep is None or n_keep >= n_patches else torch.cat(keeps)
    return _normalise(torch.cat(parts)), texts, kept


def embed(model: CLIP, images: Tensor, keep: Tensor | None = None) -> Tensor:
    """[B, 1 + K, width]: CLS and the patch tokens (all, or only ``keep`` [B, K]) with their positions, after
    ``ln_pre`` — the input of the vision blocks."""
    v = model.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)  # [B, N, width]
    x = x + v.positional_embedding[1:].to(x.dtype)
    if keep is not None:
        x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
    cls = (v.class_embedding + v.positional_embedding[0]).to(x.dtype).expand(x.shape[0], 1, -1)
    return v.ln_pre(torch.cat([cls, x], dim=1))


def encode_image(model: CLIP, images: Tensor, keep: Tensor | None = None) -> Tensor:
    """Unit image features; with ``keep`` [B, K] only those patch tokens (and CLS) enter the blocks."""
    v = model.visual
    x = v.transformer(embed(model, images, keep))
    return F.normalize(v.ln_post(x[:, 0]) @ v.proj, dim=-1)


def vv_forward(model: CLIP, images: Tensor) -> tuple[list[Tensor], Tensor]:
    """Unit V-V patch tokens [B, N, embed] after every block, with the V-V path from block 1 — what
    ``CLIPVision(images, taps, dpam_start=1)`` returns (the methods' toy taps), here with gradients — and the unit
    global embedding [B, embed] of the original path (what ``encode_image`` returns with every token)."""
    v = model.visual
    x = embed(model, images)
    x_vv, out = x, []
    for block in v.transformer.resblocks:
        o_ori, o_vv, _ = dual_attention(block, block.ln_1(x), dual=True, want_probs=False)
        x_vv = x_vv + o_vv
        x = _mlp_residual(block, x + o_ori)
        out.append(F.normalize(v.ln_post(x_vv[:, 1:]) @ v.proj, dim=-1))
    return out, F.normalize(v.ln_post(x[:, 0]) @ v.proj, dim=-1)


def patch_labels(masks: Tensor, patch: int, min_cover: float) -> Tensor:
    """long [B, N]: 1 where the defect covers ≥ ``min_cover`` of a patch, 0 where it covers nothing, -1 between."""
    cover = patch_cover(masks, patch)
    labels = torch.full_like(cover, -1, dtype=torch.long)
    labels[cover == 0] = 0
    labels[cover >= min_cover] = 1
    return labels


def state_prompts(world: WorldTensors, rng: np.random.Generator) -> tuple[list[str], dict[str, int]]:
    """Two prompts per world category (normal, anomalous: one random template and state word each) and the row of
    each category's normal prompt."""
    cats = sorted({it.category for it in world.items})
    texts: list[str] = []
    for c in cats:
        template = VOCAB.templates[rng.integers(len(VOCAB.templates))]
        for states in (VOCAB.normal_states, VOCAB.anomalous_states):
            texts.append(template.format(states[rng.integers(len(states))].format(c)))
    return texts, {c: 2 * i for i, c in enumerate(cats)}


def _balanced_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean of the anomalous and the normal items' mean cross-entropy (labels 1 / 0; -1 ignored)."""
    ce = F.cross_entropy(logits.flatten(0, -2), labels.clamp(min=0).flatten(), reduction="none")
    ce = ce.view_as(labels)
    pos, neg = labels == 1, labels == 0
    return 0.5 * (ce[pos].mean() if pos.any() else 0.0) + 0.5 * (ce[neg].mean() if neg.any() else 0.0)


def dense_loss(
    model: CLIP, world: WorldTensors, recipe: ClipRecipe, gen: torch.Generator, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """Balanced state classification against the state prompts: (patch term, image term).

    ``recipe.dense_batch`` full views (all tokens), half of them of defective items. Patch term: each V-V patch
    token's two logits are its cosines with its category's normal and anomalous prompt times CLIP's temperature; the
    cross-entropy is the mean of the normal patches' and the anomalous patches' means (patches only partly covered
    are ignored), averaged over the blocks. Image term: the same for the views' global embeddings, labelled by
    whether the view shows its defect.
    """
    n = recipe.dense_batch
    defective = world.anomalous[torch.randint(len(world.anomalous), (n // 2,), generator=gen)]
    idx = torch.cat([defective, torch.randint(len(world), (n - n // 2,), generator=gen)])
    views = sample_views(world, idx, recipe.image_size, gen, (recipe.min_scale, 1.0))
    labels = patch_labels(views.masks, int(TOY_CONFIG["vision_cfg"]["patch_size"]), recipe.dense_min_cover)
    texts, row = state_prompts(world, rng)
    txt = encode_text(model, tokenize(texts))  # [2C, D]: normal, anomalous per category
    rows = torch.tensor([row[world.items[i].category] for i in views.index.tolist()])
    pair = torch.stack([txt[rows], txt[rows + 1]], dim=1)  # [n, 2, D]
    scale = model.logit_scale.exp()
    tokens, glob = vv_forward(model, _normalise(views.images))
    patch = torch.zeros(())
    for t in tokens:
        patch = patch + _balanced_ce(scale * torch.einsum("bnd,bkd->bnk", t, pair), labels) / len(tokens)
    image = _balanced_ce(scale * torch.einsum("bd,bkd->bk", glob, pair), views.has_defect.long())
    return patch, image


def train_clip(
    world: WorldTensors,
    recipe: ClipRecipe,
    seed: int,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Train the toy CLIP; returns its state dict (open_clip keys) and the final losses.

    Args:
        world: the rendered world.
        recipe: steps, batch, optimiser and view settings.
        seed: seeds the initialisation, the views and the captions.
        progress: called after every step with the step number and the running losses.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_toy_clip()
    model.train()
    # The token embedding (49408 × width) sees a few hundred distinct words: sparse gradients and SparseAdam
    # update only those rows instead of the whole table every step.
    model.token_embedding.sparse = True
    dense = [p for n, p in model.named_parameters() if n != "token_embedding.weight"]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for p in dense if all(p is not d for d in decay)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    opt_emb = torch.optim.SparseAdam(
        [model.token_embedding.weight], lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6
    )
    schedule = _warmup_cosine(recipe.warmup, recipe.steps)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in (opt, opt_emb)]
    loss_fn = ClipLoss()
    full_from = recipe.steps - int(round(recipe.full_frac * recipe.steps))
    ema: dict[str, float] | None = None
    for step in range(1, recipe.steps + 1):
        n_keep = None
        if recipe.keep_tokens and step <= full_from:
            n_keep = int(recipe.keep_tokens[int(torch.randint(len(recipe.keep_tokens), (1,), generator=gen))])
        images, texts, keep = make_batch(world, recipe, gen, rng, n_keep)
        img = encode_image(model, images, keep)
        txt = encode_text(model, tokenize(texts))
        contrastive = loss_fn(img, txt, model.logit_scale.exp())
        dense, image = (
            dense_loss(model, world, recipe, gen, rng) if recipe.dense_batch else (torch.zeros(()),) * 2
        )
        loss = contrastive + recipe.dense_weight * dense
        if recipe.image_weight:
            loss = loss + recipe.image_weight * image
        opt.zero_grad(set_to_none=True)
        opt_emb.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        opt_emb.step()
        for sch in scheds:
            sch.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the inverse temperature
            acc = float((img @ txt.t()).argmax(1).eq(torch.arange(len(texts))).float().mean())
        now = {"loss": contrastive.item(), "acc": acc, "dense": dense.item(), "image": image.item()}
        ema = now if ema is None else {k: 0.9 * ema[k] + 0.1 * v for k, v in now.items()}
        if progress is not None:
            progress(step, ema)
    model.token_embedding.sparse = False
    model.eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ema = ema or {"loss": 0.0, "acc": 0.0, "dense": 0.0, "image": 0.0}
    final = {"clip_loss": round(ema["loss"], 4), "clip_batch_acc": round(ema["acc"], 4)}
    if recipe.dense_batch:
        final["clip_dense_loss"] = round(ema["dense"], 4)
    if recipe.dense_batch and recipe.image_weight:
        final["clip_image_state_loss"] = round(ema["image"], 4)
    return state, final


def _warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def recipe_dict(recipe: ClipRecipe) -> dict:
    return {"architecture": TOY_CONFIG, **asdict(recipe)}
