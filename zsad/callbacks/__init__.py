"""Test-time Lightning callbacks: the Evaluator (exact metrics → ``metrics.json``) and the Gallery (pictures)."""

from zsad.callbacks.evaluator import Evaluator
from zsad.callbacks.gallery import Gallery

__all__ = ["Evaluator", "Gallery"]
