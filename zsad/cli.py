"""``zsad train | test | bench | predict | convert | pretrain | data`` — the command line.

Configs are YAML layers plus ``key=value`` overrides, in order::

    zsad train experiments/methods/ava_dino.yaml protocol=synthetic method.vision.name=tiny trainer.max_epochs=1
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("WANDB_SILENT", "true")


def _split(items: list[str]) -> tuple[list[str], list[str]]:
    layers = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    for layer in layers:
        if not layer.endswith((".yaml", ".yml")):
            raise SystemExit(f"zsad: {layer!r} is neither a YAML file nor a key=value override")
    return layers, overrides


def _compose(items: list[str]):  # noqa: ANN202
    """Compose layers + overrides; with no YAML but ``checkpoint=PATH``, start from the checkpoint's own config."""
    from zsad.config import compose

    layers, overrides = _split(items)
    ckpt = next((o.split("=", 1)[1] for o in overrides if o.startswith("checkpoint=")), None)
    if not layers and ckpt:
        layers = [_checkpoint_config(Path(ckpt))]
    return compose(layers, overrides)


def _checkpoint_config(path: Path) -> Path:
    """The resolved config a checkpoint was trained with, written to a temporary YAML layer."""
    import tempfile

    import torch
    from omegaconf import OmegaConf

    from zsad.config import ConfigError

    if not path.is_file():
        raise ConfigError(f"checkpoint: {path} does not exist")
    meta = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("zsad")  # config only
    if meta is None:
        raise ConfigError(f"checkpoint: {path} is not a zsad checkpoint (no 'zsad' metadata)")
    out = Path(tempfile.mkdtemp(prefix="zsad-ckpt-")) / "config.yaml"
    OmegaConf.save(OmegaConf.create(meta["config"]), out)
    return out


def _print_summary(run: Path) -> None:
    import json

    from zsad.results.render import summary_table

    path = run / "metrics.json"
    if path.is_file():
        print(summary_table(json.loads(path.read_text())))
        print(f"metrics: {path}")


def cmd_train(args: argparse.Namespace) -> int:
    from zsad.run import train

    cfg = _compose(args.config)
    out = train(cfg, test_after=not args.no_test, resume=not args.restart)
    if not args.no_test:
        _print_summary(out)
    print(f"run folder: {out}")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from zsad.run import run_dir, test

    cfg = _compose(args.config)
    test(cfg)
    _print_summary(run_dir(cfg))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from zsad.predict import predict

    cfg = _compose(args.config)
    written = predict(cfg, Path(args.images), Path(args.out), class_name=args.class_name)
    print(f"wrote {len(written)} heatmap overlays to {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from zsad.bench.grid import run_bench

    run_bench(
        Path(args.spec), overrides=args.overrides, force=args.force, out=Path(args.out) if args.out else None
    )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from zsad.convert import convert

    layers, overrides = _split(args.config)
    out = convert(args.method, Path(args.official), Path(args.out), overrides=overrides, layers=layers)
    print(f"wrote zsad checkpoint {out}")
    print(f"evaluate it with: zsad test checkpoint={out} protocol=… (or data=…)")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from zsad.pretrain import cache
    from zsad.pretrain.build import pretrain, spec_with

    spec = spec_with(
        clip_steps=args.clip_steps,
        dino_steps=args.dino_steps,
        dino_objective=args.dino_objective,
        per_category=args.per_category,
        seed=args.seed,
    )
    root = cache.cache_dir(args.out)
    with cache.locked(root):
        manifest = pretrain(root, spec, force=args.force, only=tuple(args.only))
    for model, path in cache.toy_paths(root).items():
        entry = manifest.get(model, {})
        if entry:
            print(
                f"{model}: {path}  sha256 {entry['sha256'][:12]}…  {entry['steps']} steps, {entry['final']}"
            )
    print(f"manifest: {root / cache.MANIFEST}  (world contact sheet: {root / 'world.png'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zsad", description="Zero-shot anomaly detection: train, test, benchmark."
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and the traceback of a user error"
    )
    sub = p.add_subparsers(dest="command", required=True)
    cfg_help = "YAML layers (experiments/…) and key=value overrides, in order; group=name loads experiments/<group>s/name.yaml"

    t = sub.add_parser("train", help="train a method on the auxiliary set, then test on the targets")
    t.add_argument("config", nargs="+", help=cfg_help)
    t.add_argument("--no-test", action="store_true", help="skip the evaluation after training")
    t.add_argument("--restart", action="store_true", help="ignore checkpoints already in the run folder")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("test", help="evaluate a checkpoint on the target sets (writes metrics.json)")
    e.add_argument(
        "config", nargs="+", help=cfg_help + " — include checkpoint=PATH (alone: the checkpoint's config)"
    )
    e.set_defaults(func=cmd_test)

    b = sub.add_parser("bench", help="run a benchmark grid and write the leaderboard")
    b.add_argument("spec", help="a bench YAML (experiments/bench/*.yaml)")
    b.add_argument("overrides", nargs="*", help="key=value overrides applied to every run of the grid")
    b.add_argument("--force", action="store_true", help="re-run finished runs instead of reusing them")
    b.add_argument("--out", default=None, help="results folder (default: the spec's, usually results/)")
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("predict", help="write heatmap overlays for a folder of images")
    r.add_argument(
        "config", nargs="+", help=cfg_help + " — include checkpoint=PATH (alone: the checkpoint's config)"
    )
    r.add_argument("--images", required=True, help="folder of images (png/jpg/bmp/tif)")
    r.add_argument("--out", required=True, help="output folder for the overlays")
    r.add_argument("--class-name", default="object", help="class name shown to the text prompts")
    r.set_defaults(func=cmd_predict)

    c = sub.add_parser(
        "convert",
        help="turn an official checkpoint into a zsad checkpoint (config + trainable weights + backbone identity)",
    )
    c.add_argument("method", help="method whose official checkpoint this is (anomalyclip, ava_dino)")
    c.add_argument("official", help="the official checkpoint file (AnomalyCLIP: epoch_N.pth of its train.py)")
    c.add_argument("out", help="the zsad checkpoint to write")
    c.add_argument(
        "config",
        nargs="*",
        help="key=value overrides (and YAML layers) after experiments/methods/METHOD.yaml + "
        "experiments/ablations/METHOD_faithful.yaml, e.g. method.clip.pretrained=ViT-L-14-336px.pt",
    )
    c.set_defaults(func=cmd_convert)

    w = sub.add_parser(
        "pretrain",
        help="train the toy CLIP and toy DINOv3 on the generated pretraining world (the default bench's weights)",
    )
    w.add_argument("--out", default=None, help="cache folder (default $ZSAD_TOY_DIR or <project>/.cache/toy)")
    w.add_argument("--force", action="store_true", help="rebuild even when the cached weights are current")
    w.add_argument(
        "--only", nargs="+", choices=["clip", "dino"], default=["clip", "dino"], help="models to build"
    )
    w.add_argument("--seed", type=int, default=None, help="world + training seed (default 0)")
    w.add_argument("--per-category", type=int, default=None, help="world images per category")
    w.add_argument("--clip-steps", type=int, default=None, help="toy CLIP training steps")
    w.add_argument("--dino-steps", type=int, default=None, help="toy DINOv3 training steps")
    w.add_argument(
        "--dino-objective",
        choices=["dino", "ibot", "dino+ibot"],
        default=None,
        help="self-supervised loss(es)",
    )
    w.set_defaults(func=cmd_pretrain)

    from data_modules.cli import register

    register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("zsad", "data_modules"):  # Lightning has its own handler; a root handler would print twice
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        kind = _user_error_kind(e)
        if kind is None:
            raise  # a bug, not a user error: the full traceback
        if args.verbose:
            traceback.print_exc()
        print(f"zsad: {kind}: {_one_line(e)}", file=sys.stderr)
        return 2


# The expected user errors (module, class, what the message line calls it): each stops the CLI with one line on
# stderr and exit code 2 (-v adds the traceback). Looked up among the modules already imported, because an error
# class whose module was never imported cannot have been raised, and importing them all (Lightning for
# CheckpointMismatch) would slow every command down.
USER_ERRORS: tuple[tuple[str, str, str], ...] = (
    ("zsad.config", "ConfigError", "config error"),
    ("data_modules.errors", "DataError", "data error"),
    ("zsad.backbones.errors", "WeightsError", "weights error"),
    ("zsad.module", "CheckpointMismatch", "checkpoint mismatch"),
    ("zsad.convert", "ConversionError", "conversion error"),
)


def _user_error_kind(e: BaseException) -> str | None:
    """What ``e`` is called in the message line when it is an expected user error, else None."""
    for module, name, kind in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            return kind
    return None


def _one_line(e: BaseException) -> str:
    """The error's message on one line (multi-line messages joined with '; ')."""
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


if __name__ == "__main__":
    raise SystemExit(main())
