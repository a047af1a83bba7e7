"""``advx demo``: the main job on the embedded data."""

from __future__ import annotations

import click

from . import cli
from ._common import info


@cli.command("demo")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="advx-demo",
    show_default=True,
    help="Folder for summary.json, examples.png, the audits' JSON and report.html.",
)
@click.option(
    "--n",
    type=click.IntRange(1, 1000),
    default=500,
    show_default=True,
    help="Held-out digits to attack.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Epochs of the standard model, the distillation teacher and its student.",
)
@click.option(
    "--audit-n",
    type=click.IntRange(1, 1000),
    default=200,
    show_default=True,
    help="Digits audited (the first of the --n attacked).",
)
@click.option(
    "--harden-epochs",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Epochs of FGSM-RS adversarial training.",
)
@click.option("--seed", type=int, default=0, show_default=True)
def demo_command(
    out: str, n: int, epochs: int, audit_n: int, harden_epochs: int, seed: int
) -> None:
    """The whole story on embedded MNIST digits, offline: train a small CNN and break it with
    FGSM, PGD and CW; audit it; harden one with FGSM-RS and audit it; distill one and watch the
    audit flag it and CW break it. Writes a JSON summary, a PNG of clean / adversarial /
    perturbation images, the three audits and one HTML page comparing them."""
    from .._io import check_writable
    from ._story import format_table, run_demo

    check_writable(f"{out}/summary.json", name="out")
    summary = run_demo(
        out,
        n=n,
        epochs=epochs,
        audit_n=min(audit_n, n),
        harden_epochs=harden_epochs,
        seed=seed,
        echo=info,
    )
    click.echo(format_table(summary))
    info(f"wrote {', '.join(summary['files'].values())}  ({summary['seconds']:.0f}s in all)")
