"""``advx guard``: calibrate a guard's policy, watch it (status, canary)."""

from __future__ import annotations

from . import cli


@cli.group("guard")
def guard_group() -> None:
    """Calibrate and watch the guard that protects a served model."""
