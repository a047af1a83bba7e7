"""The exceptions advx raises. Each message says what was expected, what came, and what to do."""

from __future__ import annotations

__all__ = ["AdvxError", "InputError", "AccessError", "QueryError", "BudgetExceeded", "ModelError"]


class AdvxError(Exception):
    """Base class of every error advx raises on purpose."""


class InputError(AdvxError, ValueError):
    """An argument is wrong: the message names it and says how to fix it.

    The command line turns it into exit status 2.
    """


class AccessError(AdvxError, TypeError):
    """An attack needs more access to the model than the model gives (e.g. gradients)."""


class QueryError(AdvxError):
    """An attack had to stop because querying the model failed.

    ``queries`` holds what each sample had spent when it happened and ``partial`` the results
    that were complete at that point (an :class:`~advx.AttackResult` or ``None``): samples the
    clean check already found misclassified, with every sample's counts.
    """

    def __init__(self, message: str, *, queries=None, partial=None) -> None:
        super().__init__(message)
        self.queries = queries
        self.partial = partial


class BudgetExceeded(QueryError):
    """A per-sample query budget ran out."""


class ModelError(QueryError):
    """The model misbehaved: wrong output shape, NaN scores, a server that is down or answers
    garbage. The message names the cause."""
