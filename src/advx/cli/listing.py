"""``advx list``: the registered attacks."""

from __future__ import annotations

import click

from . import cli
from ._common import emit_json


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_command(as_json: bool) -> None:
    """List the registered attacks with their kind and norms."""
    from .. import attacks

    rows = [attacks.info(name) for name in attacks.list_attacks()]
    if as_json:
        emit_json(rows)
        return
    click.echo(f"{'name':<14}{'kind':<16}{'norms':<14}{'min-norm':<10}{'targeted':<10}summary")
    for r in rows:
        click.echo(
            f"{r['name']:<14}{r['kind']:<16}{','.join(r['norms']):<14}"
            f"{'yes' if r['minimum_norm'] else 'no':<10}"
            f"{'yes' if r['targeted'] else 'no':<10}{r['summary']}"
        )
