"""Small builders shared by tests."""

from __future__ import annotations

import torch

from data_modules.types import Batch


def batch_of(
    images: torch.Tensor, masks: torch.Tensor | None = None, labels=None, class_name: str = "object"
) -> Batch:
    """A Batch around ``images`` [B,3,H,W]; masks default to a square defect on the first half of the batch."""
    b, _, h, w = images.shape
    if masks is None:
        masks = torch.zeros(b, 1, h, w, dtype=torch.bool)
        masks[: max(1, b // 2), :, h // 4 : h // 2, w // 4 : w // 2] = True
    if labels is None:
        labels = masks.flatten(1).any(1).long()
    return Batch(
        images,
        masks,
        torch.as_tensor(labels).long(),
        ["cat"] * b,
        [class_name] * b,
        ["ds"] * b,
        [f"{i}.png" for i in range(b)],
        torch.arange(b),
    )


def dummy_config(tmp_path, *overrides: str):  # noqa: ANN001, ANN201 — a DictConfig
    """The run config of the tiny ``dummy`` method on the synthetic protocol, everything under ``tmp_path``.

    Needs the ``dummy_method`` fixture (conftest.py) so the registry knows ``dummy``.
    """
    from zsad.config import compose

    return compose([], [
        "method.name=dummy", "protocol=synthetic", f"data.synthetic.root={tmp_path / 's'}",
        f"out_dir={tmp_path / 'runs'}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "logger=none", *overrides,
    ])  # fmt: skip
