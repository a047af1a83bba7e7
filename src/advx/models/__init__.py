"""Models an attack can query: white-box classifiers and (later) black boxes."""

from ._base import Access, Model, ModelView, Tracker
from .blackbox import BlackBox
from .classifier import Classifier, as_model

__all__ = ["Access", "BlackBox", "Classifier", "Model", "ModelView", "Tracker", "as_model"]
