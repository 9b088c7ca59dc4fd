"""Errors shared by the backbone builders."""

from __future__ import annotations


class WeightsError(RuntimeError):
    """Backbone weights cannot be resolved; the message names the config key to set."""
