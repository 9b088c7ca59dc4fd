"""``zsad data`` sub-commands: ``synth`` (generate the synthetic benchmark), ``check`` (inspect a dataset folder)
and ``to-meta`` (convert any readable dataset to ``meta.json``)."""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from data_modules.imageio import image_size, load_image, load_mask
from data_modules.meta import write_meta
from data_modules.readers import READERS, read_with_report, tasks_of
from data_modules.synthetic import SynthOptions, contact_sheet, ensure_synthetic
from data_modules.types import Sample


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command (with ``synth``, ``check``, ``to-meta``) to an argparse subparsers object."""
    data = subparsers.add_parser("data", help="generate, check and convert datasets")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="{synth,check,to-meta}")

    defaults = SynthOptions()
    synth = sub.add_parser("synth", help="generate the synthetic benchmark (MVTec layout, two domains)")
    synth.add_argument("--out", required=True, help="output folder (gets textures/, objects/, manifest.json)")
    synth.add_argument("--seed", type=int, default=defaults.seed)
    synth.add_argument("--size", type=int, default=defaults.size, help="image side in pixels")
    synth.add_argument("--n-test", type=int, default=defaults.n_test, help="test images per category")
    synth.add_argument("--n-train", type=int, default=defaults.n_train, help="train/good images per category")
    synth.add_argument("--anomaly-fraction", type=float, default=defaults.anomaly_fraction)
    synth.add_argument("--contact-sheet", metavar="PNG", help="also save a preview grid with mask outlines")
    synth.set_defaults(func=_synth)

    check = sub.add_parser(
        "check", help="read a dataset, decode every image and mask, and print a per-category table"
    )
    _dataset_args(check)
    check.add_argument(
        "--fast",
        action="store_true",
        help="read file headers only (sizes, no pixels): quicker, but a truncated file passes",
    )
    check.set_defaults(func=_check)

    to_meta = sub.add_parser("to-meta", help="write a dataset's test split as meta.json")
    _dataset_args(to_meta)
    to_meta.add_argument(
        "--out", help="output file (default <root>/meta.json); paths are relative to its folder"
    )
    to_meta.set_defaults(func=_to_meta)


def _dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help=f"reader name: {', '.join(READERS)}")
    p.add_argument("--root", required=True, help="dataset folder")
    p.add_argument("--categories", nargs="+", help="only these categories")


def _synth(args: argparse.Namespace) -> int:
    opts = {
        "size": args.size,
        "n_test": args.n_test,
        "n_train": args.n_train,
        "anomaly_fraction": args.anomaly_fraction,
    }
    out = ensure_synthetic(args.out, seed=args.seed, **opts)
    print(f"synthetic benchmark at {out} (readers: synthetic_textures, synthetic_objects; root {out})")
    if args.contact_sheet:
        print(f"contact sheet: {contact_sheet(out, args.contact_sheet)}")
    return 0


def _fmt_sizes(sizes: set[tuple[int, int]]) -> str:
    if len(sizes) == 1:
        w, h = next(iter(sizes))
        return f"{w}x{h}"
    return f"{len(sizes)} sizes" if sizes else "-"


def _sizes(sample: Sample, decode: bool) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """``(width, height)`` of a sample's image and mask: decoded in full, or (``decode=False``) from the headers.

    Raises:
        DataError: a missing, unreadable or (when decoding) truncated file, naming it.
    """
    if not decode:
        mask = image_size(sample.mask_path) if sample.mask_path is not None else None
        return image_size(sample.image_path), mask
    h, w = load_image(sample.image_path).shape[:2]
    if sample.mask_path is None:
        return (w, h), None
    mh, mw = load_mask(sample.mask_path).shape
    return (w, h), (mw, mh)


def _category_rows(samples: Sequence[Sample], decode: bool) -> tuple[list[list[str]], list[str]]:
    """Table rows per category and the size-mismatch note (printed once, with one example).

    Args:
        samples: the dataset's samples.
        decode: decode every image and mask (a progress bar on stderr); ``False`` reads the headers only.
    """
    from tqdm.auto import tqdm

    by_cat: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_cat[s.category].append(s)
    rows, mismatches, example = [], 0, ""
    bar = tqdm(total=len(samples), desc="decoding" if decode else "headers", unit="img", file=sys.stderr)
    with bar:
        for cat, items in by_cat.items():
            sizes = set()
            for s in items:
                size, msize = _sizes(s, decode)
                bar.update()
                sizes.add(size)
                if msize is not None and msize != size:
                    mismatches += 1
                    example = (
                        example or f"{s.mask_path} is {msize[0]}x{msize[1]}, its image {size[0]}x{size[1]}"
                    )
            n_anom = sum(s.label for s in items)
            n_masks = sum(s.mask_path is not None for s in items)
            rows.append(
                [
                    cat,
                    items[0].class_name,
                    str(len(items) - n_anom),
                    str(n_anom),
                    str(n_masks),
                    _fmt_sizes(sizes),
                ]
            )
    notes = []
    if mismatches:
        notes.append(
            f"note: {mismatches} mask(s) differ in size from their image (e.g. {example}); they are resized"
        )
    return rows, notes


def _print_table(rows: list[list[str]]) -> None:
    header = ["category", "class name", "normal", "anomalous", "masks", "image size"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def _check(args: argparse.Namespace) -> int:
    """Raises DataError (a missing folder, an unreadable or truncated file …); ``zsad``'s main prints it."""
    samples, report = read_with_report(args.dataset, args.root, args.categories)
    rows, notes = _category_rows(samples, decode=not args.fast)
    pixel, image = tasks_of(args.dataset, samples)
    print(
        f"{args.dataset} at {Path(args.root).resolve()}: tasks: image={'yes' if image else 'no'}, pixel={'yes' if pixel else 'no'}"
    )
    _print_table(rows)
    for n in notes:
        print(n)
    print(report.summary(args.dataset, samples))
    return 0


def _to_meta(args: argparse.Namespace) -> int:
    samples, report = read_with_report(args.dataset, args.root, args.categories)
    path = write_meta(samples, args.root, args.out)
    print(f"wrote {path} ({len(samples)} test items); {report.summary(args.dataset, samples)}")
    return 0
