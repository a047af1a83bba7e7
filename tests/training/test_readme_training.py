"""The README's training snippets run as written (extracted by their headings: a README that
drifts from the code fails here)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def block(heading: str) -> str:
    """The first ```python block under ``heading`` (before the next heading)."""
    text = README.read_text()
    lines = text.splitlines()
    at = lines.index(heading)
    section = []
    for line in lines[at + 1 :]:
        if line.startswith("#") and not line.startswith("# "):  # a heading, not a comment
            break
        section.append(line)
    found = re.search(r"```python\n(.*?)```", "\n".join(section) + "\n", re.S)
    assert found, f"no python block under {heading!r} in README.md"
    return found.group(1)


def run_snippet(code: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # its files (runs/...) go there
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


def test_the_own_loop_snippet_runs_as_written_and_trains(tmp_path, monkeypatch, capsys):
    code = block("### Adversarial training in your own loop")
    assert "recipe_loss(" in code
    run_snippet(code, tmp_path, monkeypatch)
    losses = [float(v) for v in re.findall(r"epoch \d+: loss ([\d.]+)", capsys.readouterr().out)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]  # the loss falls, as the recipe trains the net


def _harden(code: str, **swaps: tuple[str, str]) -> str:
    for old, new in swaps.values():
        assert code.count(old) == 1, f"the README's Harden snippet no longer has {old!r}"
        code = code.replace(old, new)
    return code


def test_the_harden_snippet_runs_with_a_built_in_net_shortened(tmp_path, monkeypatch, capsys):
    """As written but shorter (300 digits, one epoch, clean accuracy for the audit): the path
    from advx.zoo.nets.smallcnn() through fit's checkpoint to advx.zoo.load (which once failed:
    "cannot rebuild, no model spec recorded")."""
    code = _harden(
        block("## Harden a model"),
        data=('split="train")', 'split="train", n=300)'),
        epochs=("epochs=10", "epochs=1"),
        audit=(
            'advx.audit(robust, x_test, y_test, advx.Linf(0.3), suite="fast").robust_accuracy',
            "(robust.predict(x_test) == y_test).float().mean().item()",
        ),
    )
    run_snippet(code, tmp_path, monkeypatch)
    assert (tmp_path / "runs" / "fgsm" / "checkpoint.json").exists()
    assert (tmp_path / "runs" / "fgsm" / "training-curve.png").exists()
    clean = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= clean <= 1.0


@pytest.mark.slow
def test_the_harden_snippet_runs_exactly_as_written(tmp_path, monkeypatch, capsys):
    run_snippet(block("## Harden a model"), tmp_path, monkeypatch)
    robust = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert robust > 0.3  # 10 epochs of FGSM-RS at 0.3 on the digits: robust to a real degree
