"""Training-free probes of toy (or any) weights on the synthetic benchmark's test sets.

They answer "did pretraining give the backbone anything?" before any method trains on top of it, and they are how
the pretraining recipes were compared (README, toy section):

* ``clip``: WinCLIP zero-shot (the ``winclip`` method, fixed prompt ensemble on windows) — image and pixel AUROC;
* ``dino``: per-image patch outlierness of the DINOv3 tokens — every patch token of a tap is standardised per image
  and channel over the image's patches (as AVA-DINO does) and scored by its norm; pixel AUROC of the upsampled map,
  image AUROC of its maximum. No text, no training: a backbone whose patch tokens single out the defect scores high;
* ``vv``: zero-shot maps from the CLIP's V-V patch tokens and the fixed prompt ensemble (no windows, no training):
  whether the patch tokens the AnomalyCLIP family reads carry the state words on categories never seen;
* ``token_uniformity``: how alike the CLIP's V-V patch tokens (what the AnomalyCLIP family reads) are within an image.

``python -m zsad.pretrain.measure [--toy-dir DIR] [--clip FILE] [--dino FILE] [--n-test 40] [--controls]`` prints
both, per domain (mean over categories); ``--controls`` adds the same probes on random weights.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from data_modules import synthetic
from data_modules.imageio import load_image, load_mask
from data_modules.readers import read
from zsad.metrics.functional import auroc

DOMAINS = tuple(synthetic.DOMAINS)  # synthetic_textures, synthetic_objects


def _categories(root: Path, dataset: str, size: int, mean: tuple, std: tuple) -> Iterator[tuple]:
    """(category, class name, images [N,3,S,S] normalised, labels [N], masks [N,H,W]) per category."""
    samples = read(dataset, root / synthetic.DOMAINS[dataset])
    for cat in sorted({s.category for s in samples}):
        ss = [s for s in samples if s.category == cat]
        imgs = torch.stack(
            [torch.from_numpy(np.array(load_image(s.image_path))).permute(2, 0, 1).float() / 255 for s in ss]
        )
        h, w = imgs.shape[-2:]  # the images' own size, for the normal images' empty masks
        imgs = torch.nn.functional.interpolate(imgs, size=(size, size), mode="bicubic", align_corners=False)
        imgs = (imgs - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        masks = np.stack([load_mask(s.mask_path) if s.mask_path else np.zeros((h, w), bool) for s in ss])
        yield cat, ss[0].class_name, imgs, np.array([s.label for s in ss]), masks


def score(
    maps: torch.Tensor, scores: torch.Tensor, labels: np.ndarray, masks: np.ndarray
) -> tuple[float, float]:
    maps = torch.nn.functional.interpolate(maps[:, None].float(), size=masks.shape[-2:], mode="bilinear")[
        :, 0
    ]
    return float(auroc(scores.numpy(), labels)), float(auroc(maps.flatten().numpy(), masks.reshape(-1)))


def _mean_percent(res: list[tuple[float, float]]) -> tuple[float, float]:
    """(image AUROC, pixel AUROC) of each category → their means over the categories, in %."""
    return tuple(100 * float(np.mean(x)) for x in zip(*res))


def _shuffled(
    tokens: list[torch.Tensor], permute: Callable[[int], torch.Tensor] | None
) -> list[torch.Tensor]:
    """Every tap's tokens [B, N, C] with the patch positions in the order ``permute(N)`` (a control), or as they are."""
    if permute is None:
        return tokens
    perm = permute(tokens[0].shape[1])
    return [t[:, perm] for t in tokens]


def probe_clip(
    clip_file: str | Path, root: Path, image_size: int = 112, domains: tuple[str, ...] = DOMAINS
) -> dict[str, tuple[float, float]]:
    """WinCLIP zero-shot with the toy CLIP (``none``: random weights): {dataset: (image AUROC, pixel AUROC)} in %."""
    from data_modules.types import Batch
    from zsad.config import compose
    from zsad.registry import build_method

    cfg = compose(
        ["experiments/methods/winclip.yaml"],
        ["method.clip.name=toy", f"method.clip.pretrained={clip_file}", f"method.image_size={image_size}"],
    )
    torch.manual_seed(0)  # random weights ("none") are the same on every call
    model = build_method(cfg.method).eval()
    out = {}
    for dataset in domains:
        res = []
        for _, name, imgs, labels, masks in _categories(root, dataset, image_size, model.mean, model.std):
            b = len(imgs)
            batch = Batch(
                imgs, None, torch.as_tensor(labels), [name] * b, [name] * b, [dataset] * b, [""] * b
            )
            with torch.no_grad():
                o = model(imgs, batch)
            res.append(score(o.anomaly_map, o.image_score, labels, masks))
        out[dataset] = _mean_percent(res)
    return out


def probe_dino(
    dino_file: str | Path,
    root: Path,
    image_size: int = 112,
    taps: tuple[int, ...] = (2, 3, 4),
    domains: tuple[str, ...] = DOMAINS,
    permute: Callable[[int], torch.Tensor] | None = None,
) -> dict[str, tuple[float, float]]:
    """Patch outlierness of the DINOv3 tokens (``none``: random weights): {dataset: (image AUROC, pixel AUROC)} in %.

    ``permute(n)`` (a control): a permutation of the n patch positions applied to every tap's tokens.
    """
    from zsad.backbones.dinov3 import build_dinov3
    from zsad.methods.ava_dino import standardise

    torch.manual_seed(0)  # random weights ("none") are the same on every call
    backbone = build_dinov3("tiny", str(dino_file), image_size=image_size)
    out = {}
    for dataset in domains:
        res = []
        for _, _, imgs, labels, masks in _categories(root, dataset, image_size, backbone.mean, backbone.std):
            with torch.no_grad():
                feats = backbone(imgs, taps=taps)
            tokens = _shuffled(feats.patch_tokens, permute)
            z = torch.stack([standardise(t).norm(dim=-1) for t in tokens]).mean(0)
            maps = z.view(-1, *feats.grid)
            res.append(score(maps, maps.flatten(1).amax(1), labels, masks))
        out[dataset] = _mean_percent(res)
    return out


def probe_vv(
    clip_file: str | Path,
    root: Path,
    image_size: int = 112,
    taps: tuple[int, ...] = (1, 2, 3, 4),
    domains: tuple[str, ...] = DOMAINS,
    permute: Callable[[int], torch.Tensor] | None = None,
) -> dict[str, tuple[float, float]]:
    """Zero-shot maps from the CLIP's V-V patch tokens (what the AnomalyCLIP family reads; DPAM from block 1):
    {dataset: (image AUROC, pixel AUROC)} in %.

    Each tap's map is the softmax over (normal, anomalous) of the tokens' cosines × 100 with the fixed prompt
    ensemble of the image's class name (``zsad.prompts``); the taps are averaged, the image score is the map's
    maximum. No training: this is what a method's prompts could start from. ``permute(n)``: a control that
    shuffles the patch positions of every tap.
    """
    from zsad.backbones.clip import build_clip
    from zsad.prompts.ensemble import EnsembleTextCache

    torch.manual_seed(0)  # random weights ("none") are the same on every call
    clip = build_clip("toy", str(clip_file), image_size=image_size).eval()
    prompts = EnsembleTextCache()
    out = {}
    for dataset in domains:
        res = []
        for _, name, imgs, labels, masks in _categories(
            root, dataset, image_size, clip.visual.mean, clip.visual.std
        ):
            with torch.no_grad():
                feats = clip.visual(imgs, taps, dpam_start=1)
                text = prompts([name], clip.text, imgs.device)[0]  # [2, D]
            tokens = _shuffled(feats.patch_tokens, permute)
            probs = torch.stack([(100 * t @ text.t()).softmax(-1)[..., 1] for t in tokens]).mean(0)
            maps = probs.view(-1, *feats.grid)
            res.append(score(maps, maps.flatten(1).amax(1), labels, masks))
        out[dataset] = _mean_percent(res)
    return out


def mean_pairwise_cosine(tokens: torch.Tensor) -> torch.Tensor:
    """[B]: the mean cosine between distinct patch tokens of each image (tokens [B, N, D]); 1 = all patches alike."""
    t = torch.nn.functional.normalize(tokens.float(), dim=-1)
    n = t.shape[1]
    sim = t @ t.transpose(1, 2)
    return (sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))


def token_uniformity(
    clip_file: str | Path, root: Path, image_size: int = 112, dpam_start: int | None = 1
) -> dict[str, float]:
    """How alike the CLIP's last-tap patch tokens are within an image: {dataset: mean pairwise cosine}.

    The AnomalyCLIP family reads these tokens (the V-V path from ``dpam_start``; ``None``: the plain path): when they
    are all alike, a map drawn from them cannot single out a patch.
    """
    from zsad.backbones.clip import build_clip

    torch.manual_seed(0)  # random weights ("none") are the same on every call
    vision = build_clip("toy", str(clip_file), image_size=image_size).eval().visual
    out = {}
    for dataset in DOMAINS:
        values = []
        for _, _, imgs, _, _ in _categories(root, dataset, image_size, vision.mean, vision.std):
            with torch.no_grad():
                feats = vision(imgs, (len(vision.blocks),), dpam_start=dpam_start)
            values.append(mean_pairwise_cosine(feats.patch_tokens[-1]))
        out[dataset] = float(torch.cat(values).mean())
    return out


def main(argv: list[str] | None = None) -> int:
    from zsad.pretrain.cache import toy_paths

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--toy-dir", default=None, help="toy-weight folder (default: the cache folder)")
    p.add_argument(
        "--clip", default=None, help="CLIP file (default: the folder's toy_clip.pt); 'skip' to skip"
    )
    p.add_argument("--dino", default=None, help="DINOv3 file (default: the folder's toy_dinov3.pth); 'skip'")
    p.add_argument("--data", default="data/synthetic-probe", help="benchmark folder (generated if missing)")
    p.add_argument("--n-test", type=int, default=40, help="test images per category")
    p.add_argument("--controls", action="store_true", help="also the same probes on random weights")
    args = p.parse_args(argv)
    paths = toy_paths(args.toy_dir)
    root = synthetic.ensure_synthetic(Path(args.data), n_test=args.n_test, show_progress=False)
    clip = None if args.clip == "skip" else args.clip or paths["clip"]
    dino = None if args.dino == "skip" else args.dino or paths["dino"]
    rows, cosines = [], []
    if clip:
        rows.append(("clip winclip zero-shot", probe_clip(clip, root)))
        rows.append(("clip V-V tokens zero-shot", probe_vv(clip, root)))
        cosines.append(("toy", token_uniformity(clip, root)))
        if args.controls:
            rows.append(("  same, random weights", probe_clip("none", root)))
            rows.append(("  V-V, random weights", probe_vv("none", root)))
            cosines.append(("random", token_uniformity("none", root)))
    if dino:
        rows.append(("dinov3 patch outlierness", probe_dino(dino, root)))
        if args.controls:
            rows.append(("  same, random weights", probe_dino("none", root)))
    for what, res in cosines:
        print(f"clip V-V token cosine ({what}) " + "  ".join(f"{d}: {v:.3f}" for d, v in res.items()))
    for what, res in rows:
        cells = "  ".join(f"{d}: I {i:.1f} P {px:.1f}" for d, (i, px) in res.items())
        print(f"{what:26s} {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
