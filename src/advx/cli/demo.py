"""``advx demo``: the main job on the embedded data."""

from __future__ import annotations

import click

from . import cli
from ._common import info


@cli.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="advx-demo", show_default=True,
              help="Folder for summary.json and examples.png.")
@click.option("--n", type=click.IntRange(1, 1000), default=500, show_default=True, help="Held-out digits to attack.")
@click.option("--epochs", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def demo_command(out: str, n: int, epochs: int, seed: int) -> None:
    """Train a small CNN on embedded MNIST digits, break it with FGSM, PGD and CW, and write a
    JSON summary and a PNG of clean / adversarial / perturbation images."""
    from .._io import check_writable
    from ..demo import format_table, run_demo

    check_writable(f"{out}/summary.json", name="out")
    summary = run_demo(out, n=n, epochs=epochs, seed=seed, echo=info)
    click.echo(format_table(summary))
    info(f"wrote {', '.join(summary['files'].values())}  ({summary['seconds']:.0f}s in all)")
