"""``advx demo``: the main job on the embedded data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import cli
from ._common import info
from ._story import FULL, QUICK

F = TypeVar("F", bound=Callable[..., Any])


def _sized(name: str, what: str, type: click.ParamType) -> Callable[[F], F]:
    """An option whose default comes from the preset (FULL, or QUICK with --quick)."""
    field = name.lstrip("-").replace("-", "_")
    full, quick = getattr(FULL, field), getattr(QUICK, field)
    return click.option(
        name, type=type, default=None, help=f"{what} [default: {full}; with --quick: {quick}]"
    )


@cli.command("demo")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="advx-demo",
    show_default=True,
    help="Folder for summary.json, examples.png, the audits' JSON and report.html.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="The same story on 2,000 training digits, 100 held out and fewer epochs: a few "
    "minutes less; the numbers move a little.",
)
@_sized("--n", "Held-out digits to attack.", click.IntRange(1, 1000))
@_sized(
    "--epochs",
    "Epochs of the standard model, the distillation teacher and its student.",
    click.IntRange(min=1),
)
@_sized("--audit-n", "Digits audited (the first of the --n attacked).", click.IntRange(1, 1000))
@_sized("--harden-epochs", "Epochs of FGSM-RS adversarial training.", click.IntRange(min=1))
@click.option("--seed", type=int, default=0, show_default=True)
def demo_command(
    out: str,
    quick: bool,
    n: int | None,
    epochs: int | None,
    audit_n: int | None,
    harden_epochs: int | None,
    seed: int,
) -> None:
    """The whole story on embedded MNIST digits, offline: train a small CNN and break it with
    FGSM, PGD and CW; audit it; harden one with FGSM-RS and audit it; distill one and watch the
    audit flag it and CW break it. Writes a JSON summary, a PNG of clean / adversarial /
    perturbation images, the three audits and one HTML page comparing them."""
    from .._io import check_writable
    from ._story import format_table, run_demo

    check_writable(f"{out}/summary.json", name="out")
    given = {"n": n, "epochs": epochs, "audit_n": audit_n, "harden_epochs": harden_epochs}
    demo = run_demo(
        out,
        size=QUICK if quick else FULL,
        seed=seed,
        echo=info,
        **{k: v for k, v in given.items() if v is not None},
    )
    summary = demo.summary
    click.echo(format_table(summary))
    info(f"wrote {', '.join(summary['files'].values())}  ({summary['seconds']:.0f}s in all)")
