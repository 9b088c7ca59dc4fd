"""Prompts: fixed state-word/template ensembles (``ensemble``) and learnable prompt contexts (``learnable``)."""

from zsad.prompts.learnable import PromptLearner

__all__ = ["PromptLearner"]
