"""Fixtures of the defense tests: the trained MLP as an advx Classifier."""

from __future__ import annotations

import pytest

import advx


@pytest.fixture()
def clf(trained_mlp):
    return advx.Classifier(trained_mlp)
