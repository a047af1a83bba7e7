"""The README's Python snippets run as written, in order, like a notebook: the first one builds
``net``, ``x``, ``y`` and ``model`` from the embedded digits, the later ones use them. A snippet
the README itself marks ``<!-- readme-test: not run (why) -->`` is left out; every other one runs,
so a README that drifts from the code fails here. The HTTP snippets talk to a real
``advx serve`` started for the test (its port put in place of the README's 8000)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._server import free_port, wait_until_up

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOT_RUN = re.compile(r"<!-- readme-test: not run \((.+)\) -->")
# Run apart, each by its own test: the training snippets (tests/training/test_readme_training.py).
ELSEWHERE = ("## Harden a model", "### Adversarial training in your own loop")


def snippets() -> list[tuple[str, int, str, str | None]]:
    """(heading, line, code, reason it is not run) for every ```python block, in order."""
    out: list[tuple[str, int, str, str | None]] = []
    lines = README.read_text().splitlines()
    heading, i = "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line
        if line.strip() == "```python":
            start = i + 1
            end = lines.index("```", start)
            marker = NOT_RUN.search(lines[i - 1]) if i else None
            out.append(
                (heading, start + 1, "\n".join(lines[start:end]), marker and marker.group(1))
            )
            i = end
        i += 1
    return out


def test_the_readme_marks_few_snippets_not_run():
    found = snippets()
    skipped = [(h, reason) for h, _, _, reason in found if reason]
    assert len(found) >= 8 and len(skipped) <= 1, skipped


@pytest.fixture()
def served_lenet():
    """``advx serve --model lenet`` on a free port, as the README's HTTP snippets expect."""
    pytest.importorskip("uvicorn")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "advx", "serve", "--model", "lenet", "--port", str(port)]
        + ["--detect-queries", "off"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_up(proc, url)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_every_python_snippet_runs_as_written(tmp_path, monkeypatch, capsys, served_lenet):
    pytest.importorskip("tritonclient.http")
    monkeypatch.chdir(tmp_path)  # the files the snippets write (report.json, policy.toml) go here
    monkeypatch.setenv("ADVX_PROGRESS", "0")
    namespace: dict = {"__name__": "__readme__"}
    ran = []
    import warnings

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a snippet that warns is a snippet to fix
        torch.manual_seed(0)
        for heading, line, code, reason in snippets():
            if reason or heading in ELSEWHERE:
                continue
            code = code.replace("127.0.0.1:8000", f"127.0.0.1:{served_lenet}")
            # a snippet that fails names its place in the README: line numbers stay the README's
            compiled = compile("\n" * (line - 1) + code, str(README), "exec")
            exec(compiled, namespace)
            ran.append(heading)
    assert "## Attack a model" in ran and "## Guard a model" in ran, ran
    # what the snippets computed is real, not just free of exceptions
    result, model, x, y = (namespace[k] for k in ("result", "model", "x", "y"))
    clean = (model.predict(x) == y).float().mean().item()
    assert clean > 0.8  # the snippet's two epochs trained the net
    assert result.success.float().mean().item() > 0.5  # PGD at 0.1 breaks most of an undefended net
    assert (tmp_path / "report.json").exists() and (tmp_path / "policy.toml").exists()
    assert "broken" in capsys.readouterr().out  # result.summary() printed
    # the query detector caught Square within its first queries, and flagged no clean digit
    flags, clean_flags = namespace["flags"], [f for f, _ in namespace["clean"]]
    assert True in flags and flags.index(True) < 50 and sum(flags) > len(flags) // 2
    assert len(clean_flags) == 96 and not any(clean_flags)
