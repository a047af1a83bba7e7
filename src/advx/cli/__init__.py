"""The ``advx`` command: a thin shell over the Python API.

Exit status: 0 ok, 1 a ``--fail-under`` bar was missed, 2 a usage or input error.
"""

from __future__ import annotations

import logging
import sys

import click

from .._version import __version__
from ..errors import AdvxError, QueryError


class _Group(click.Group):
    """Turn advx's own input errors into exit status 2 with a one-line message, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QueryError as e:
            spent = "" if e.queries is None else f" ({int(e.queries.sum())} queries spent)"
            click.echo(f"advx: error: {e}{spent}", err=True)
            ctx.exit(2)
        except AdvxError as e:
            click.echo(f"advx: error: {e}", err=True)
            ctx.exit(2)


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="advx")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """advx: attack, audit, harden and guard PyTorch classifiers."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="advx: %(message)s", stream=sys.stderr)


def _register_commands() -> None:
    # Every public module of this package adds its command(s) when imported: a new command is a
    # new file, with no list here to keep in step.
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


_register_commands()


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="advx")
