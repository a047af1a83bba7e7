"""The HTML report: self-contained, and rendered by a real headless browser when one is here."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess

import pytest

import advx
from advx.audit._codec import png_decode
from advx.audit.html import render_comparison
from advx.audit.report import EpsCurve

pytest.importorskip("jinja2")
pytest.importorskip("matplotlib")

EPS = 0.1


@pytest.fixture(scope="module")
def page(trained_mlp, mnist_test, tmp_path_factory):
    x, y = mnist_test
    r = advx.audit(
        trained_mlp,
        x[:80],
        y[:80],
        advx.Linf(EPS),
        suite=[advx.FGSM(advx.Linf(EPS)), advx.PGD(advx.Linf(EPS), steps=10)],
        eps_curve=[0.05, 0.1],
    )
    path = tmp_path_factory.mktemp("html") / "report.html"
    r.save_html(path)
    return r, path


def test_the_page_is_self_contained_and_says_what_the_json_says(page):
    r, path = page
    html = path.read_text()
    assert f"{100 * r.robust_accuracy:.2f}%" in html and f"{100 * r.clean_accuracy:.2f}%" in html
    assert html.count("data:image/png;base64,") >= 4  # eps curve, cascade, per class, examples
    assert not re.search(r"""(src|href)=["']https?://""", html)  # nothing fetched from the network
    for section in ("cascade", "per-class", "eps-curve", "provenance"):
        assert f'id="{section}"' in html


def test_the_examples_are_the_reports_own_pngs(page):
    r, path = page
    html = path.read_text()
    assert r.examples
    for e in r.examples:
        # the stored data URI as it is, no re-rendering
        assert f'alt="sample {e.index}, clean" src="{e.clean}"' in html
        assert f'alt="sample {e.index}, adversarial" src="{e.adversarial}"' in html
    shown = re.findall(
        r'<img class="example" alt="sample \d+, (\w+)" src="(data:image/png[^"]+)"', html
    )
    assert len(shown) == 3 * len(r.examples)  # clean, adversarial, perturbation
    perturbations = [png_decode(uri, "p") for kind, uri in shown if kind == "perturbation"]
    for e, p in zip(r.examples, perturbations):
        clean, adv = (t.numpy().astype(int) for t in e.pixels())
        changed = clean != adv
        assert changed.any() and (p[~changed] == 128).all() and (p[changed] != 128).all()
        assert abs(p.astype(int) - 128).max() == 127  # stretched to its largest change


def test_a_curve_without_a_large_eps_point_renders(page):
    # a minimum-norm curve has no large-eps point: the page leaves that column out
    r, _ = page
    curve = EpsCurve(
        eps=[0.0, 0.1], robust_accuracy=[0.9, 0.2], n=80, attack="fab", source="minimum-norm"
    )
    html = dataclasses.replace(r, eps_curve=curve).to_html()
    assert "(any input)" not in html and "minimum-norm attack, fab, on the first 80" in html
    assert "(any input)" in r.to_html()


def test_the_comparison_page_holds_each_report(page):
    r, _ = page
    html = render_comparison([("first", r), ("second", r)], title="two")
    assert html.count('id="cascade"') == 2 and "first" in html and "second" in html
    assert html.count(f"{100 * r.robust_accuracy:.2f}%") >= 4  # table row and card, twice


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(
    _browser() is None, reason="no headless browser installed (Debian: apt-get install chromium)"
)
def test_a_real_browser_renders_the_report(page, tmp_path):
    r, path = page
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [_browser(), *flags, "--dump-dom", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="robust-accuracy"' in dom.stdout and f"{100 * r.robust_accuracy:.2f}%" in dom.stdout
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [_browser(), *flags, f"--screenshot={shot}", "--window-size=1200,1800", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and shot.exists()
    from PIL import Image

    img = Image.open(shot).convert("L")
    # the plots drew: a good share of the page is neither white nor near-white
    dark = sum(img.histogram()[:200]) / (img.width * img.height)
    assert dark > 0.03, dark
