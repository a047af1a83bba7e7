"""Training: one plain fit loop and losses as functions."""

from .fit import History, fit

__all__ = ["fit", "History"]
