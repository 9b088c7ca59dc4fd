"""Errors a user can meet through the configuration (layer 0: imported by the config and the registry alike)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; the message names the key or file at fault."""
