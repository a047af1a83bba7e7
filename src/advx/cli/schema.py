"""``advx schema``: the JSON Schemas of the documents advx writes."""

from __future__ import annotations

import click

from . import cli
from ._common import emit_json


@cli.command("schema")
@click.argument("document", type=click.Choice(["report"]))
def schema_command(document: str) -> None:
    """Print the JSON Schema of a document advx writes (report: the audit report)."""
    from ..audit.report import json_schema

    emit_json(json_schema())
