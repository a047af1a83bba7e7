"""Small helpers for the words the audit writes."""

from __future__ import annotations

__all__ = ["plural", "fmt_ci"]


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 sample``, ``2 samples``, ``1,000 samples``."""
    return f"{n:,} {word if n == 1 else (words or word + 's')}"


def fmt_ci(ci: list[float] | None, digits: int = 1) -> str:
    """`` [74.1%, 85.2%]`` (with a leading space), or "" for no interval."""
    if not ci:
        return ""
    return f" [{ci[0]:.{digits}%}, {ci[1]:.{digits}%}]"
