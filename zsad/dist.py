"""Distributed helpers shared by the module and the Evaluator."""

from __future__ import annotations

import atexit

import torch

_EXIT_HOOKED = False


def destroy_process_group_at_exit() -> None:
    """Tear the process group down before interpreter shutdown.

    Lightning leaves it alive; a gloo group destroyed during finalisation can abort the process ("terminate called
    without an active exception"), which turns a finished DDP run into a failed one.
    """
    global _EXIT_HOOKED
    if _EXIT_HOOKED or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    _EXIT_HOOKED = True

    def destroy() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)
