"""``advx compare BASE.json NEW.json``: two audits of the same data, threat and suite compared,
with a regression gate (``--max-drop``)."""

from __future__ import annotations

import click

from . import cli
from ._common import emit_json, exit_on, gate_options, info, write_gate


@cli.command("compare")
@click.argument("base", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False))
@click.option(
    "--max-drop",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    help="Exit 1 when robust accuracy fell by more than this share (0.01: one point).",
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the comparison as an HTML page here.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the comparison as JSON here (else to stdout).",
)
@gate_options
def compare_command(base, new, max_drop, html_path, json_path, summary_md, junit_path) -> None:
    """Compare the audit reports BASE and NEW: robust accuracy overall, per stage and per class
    (with intervals), the samples newly broken, both models' fingerprints.

    Refused (exit 2) when the data, threat model or suite differ. Exit 1 when robust accuracy
    fell by more than --max-drop, or when the new audit is not reliable.
    """
    from .._io import check_writable
    from ..audit import compare

    for path, name in (
        (html_path, "html"),
        (json_path, "json"),
        (summary_md, "summary-md"),
        (junit_path, "junit"),
    ):
        if path is not None:
            check_writable(path, name=name)
    if html_path is not None:
        try:
            import jinja2  # noqa: F401
        except ImportError:
            from ..errors import InputError

            raise InputError("--html needs jinja2: pip install 'advx[report]'") from None
    comparison = compare(base, new, max_drop=max_drop)
    for line in comparison.summary_lines():
        if not line.startswith(("PASS", "FAIL")):
            info(line)
    if json_path is not None:
        comparison.save(json_path)
        info(f"wrote {json_path}")
    else:
        emit_json(comparison.to_dict())
    if html_path is not None:
        comparison.save_html(html_path)
        info(f"wrote {html_path}")
    write_gate(
        comparison.checks, summary_md=summary_md, junit_path=junit_path, comparison=comparison
    )
    exit_on(comparison.checks)
