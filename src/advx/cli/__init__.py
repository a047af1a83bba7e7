"""The ``advx`` command: a thin shell over the Python API.

Exit status, the same for every subcommand (a CI job can tell a missed bar from a crash):

- 0: ok;
- 1: a bar was missed (``--fail-under``) or a regression found (``--baseline``, ``compare``);
- 2: a usage or input error (a bad option, a missing file, data that does not fit the model);
- 3: an unexpected crash: one line ``advx: internal error: ...``, the traceback with ``-v``.

``-v`` (more log output, the traceback of a crash) and ``-q`` (no progress bars, no
informational lines) are accepted before the subcommand and after it.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

import click

from .._version import __version__
from ..errors import AdvxError, QueryError

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_CRASH = 0, 1, 2, 3

# ctx.meta is shared by a context and all its children: the verbosity set anywhere on the line
_VERBOSE, _QUIET = "advx.verbose", "advx.quiet"


def _add_verbosity(cmd: click.Command) -> None:
    """Give ``cmd`` the -v / -q options (unless it has options of those names already)."""
    taken = {opt for p in cmd.params for opt in getattr(p, "opts", [])}
    if "-v" not in taken and "--verbose" not in taken:
        cmd.params.append(
            click.Option(
                ["-v", "--verbose"],
                count=True,
                help="More log output (-vv for debug); a crash shows its traceback.",
            )
        )
    if "-q" not in taken and "--quiet" not in taken:
        cmd.params.append(
            click.Option(["-q", "--quiet"], is_flag=True, help="No progress bars, errors only.")
        )


def _apply_verbosity(ctx: click.Context) -> None:
    """Take -v / -q out of the parameters (the callbacks do not see them) and apply them."""
    meta = ctx.meta
    meta[_VERBOSE] = meta.get(_VERBOSE, 0) + int(ctx.params.pop("verbose", 0) or 0)
    meta[_QUIET] = bool(meta.get(_QUIET, False) or ctx.params.pop("quiet", False))
    ctx.params.pop("quiet", None)
    if meta[_QUIET]:
        level = logging.ERROR
        if not meta.get("advx.quiet_bars"):
            from .._progress import quiet

            ctx.with_resource(quiet())
            meta["advx.quiet_bars"] = True
    else:
        level = logging.WARNING - 10 * min(meta[_VERBOSE], 2)
    logging.basicConfig(level=level, format="advx: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)


def verbosity(ctx: click.Context | None = None) -> tuple[int, bool]:
    """(count of -v, whether -q was given) for the command line being run."""
    ctx = ctx or click.get_current_context(silent=True)
    if ctx is None:
        return 0, False
    return int(ctx.meta.get(_VERBOSE, 0)), bool(ctx.meta.get(_QUIET, False))


class _Command(click.Command):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _add_verbosity(self)

    def invoke(self, ctx: click.Context) -> Any:
        _apply_verbosity(ctx)
        return super().invoke(ctx)


class _Group(click.Group):
    """Every subcommand gets -v / -q and the exit statuses above: advx's own input errors become
    status 2 with a one-line message, anything unexpected status 3 (never a bare traceback)."""

    command_class = _Command
    group_class = type  # subgroups (e.g. ``advx guard``) are _Groups too

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _add_verbosity(self)

    def invoke(self, ctx: click.Context) -> Any:
        _apply_verbosity(ctx)
        try:
            return super().invoke(ctx)
        except QueryError as e:
            spent = "" if e.queries is None else f" ({int(e.queries.sum())} queries spent)"
            click.echo(f"advx: error: {e}{spent}", err=True)
            ctx.exit(EXIT_USAGE)
        except AdvxError as e:
            click.echo(f"advx: error: {e}", err=True)
            ctx.exit(EXIT_USAGE)
        except click.ClickException as e:
            # click's own errors about the command line (a file option that cannot be opened
            # is a ClickException with status 1): all are usage errors here
            e.exit_code = EXIT_USAGE  # type: ignore[misc]
            raise
        except (click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:
            if ctx.parent is not None:  # the outermost group reports it, once
                raise
            click.echo(f"advx: internal error: {type(e).__name__}: {e}", err=True)
            if verbosity(ctx)[0]:
                click.echo(traceback.format_exc().rstrip(), err=True)
            else:
                click.echo("advx: (run again with -v for the traceback)", err=True)
            ctx.exit(EXIT_CRASH)


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="advx")
def cli() -> None:
    """advx: attack, audit, harden and guard PyTorch classifiers.

    Exit status: 0 ok, 1 a bar missed or a regression found, 2 a usage or input error,
    3 an unexpected crash (-v shows its traceback).
    """


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
    from .._threads import configure

    # torch's default thread count is the machine's cores, even when the process may use fewer
    # or they are busy: on a shared 2-core machine that made PGD-40 many times slower
    configure()
    cli.main(args=argv, prog_name="advx")
