"""``advx review``: the human review queue (list, show, label, export, the web page), and
``advx guard alerts``: the query attacks the service caught."""

from __future__ import annotations

import getpass
import json
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from ..errors import InputError
from . import cli
from ._common import emit_json
from .guard import guard_group

if TYPE_CHECKING:
    from ..guard.store import Store

# the store's statuses (advx.guard.store.STATUSES), spelled out so that `advx` starts without
# importing SQLAlchemy, which only the guard extra installs
_STATUSES = ("queued", "labelled")


def store_option(f):
    """``--store URL`` (also ``$ADVX_STORE``): for any command that opens the store."""
    return click.option(
        "--store",
        "store_url",
        envvar="ADVX_STORE",
        default=None,
        metavar="URL",
        help="The database (SQLAlchemy URL): sqlite:///path.db or postgresql://user:pw@host/db. "
        "Default: $ADVX_STORE, else a SQLite file under the user's state directory.",
    )(f)


def _classes_option(f):
    return click.option(
        "--classes",
        type=click.IntRange(min=2),
        default=None,
        help="The model's number of classes (recorded in the store; the service records it).",
    )(f)


def _open(url: str | None, classes: int | None = None) -> Store:
    try:
        from ..guard.store import Store, default_url
    except ImportError as e:
        raise InputError(
            f"the review store needs SQLAlchemy and alembic ({e.name} is missing): "
            "pip install 'advx[guard]'"
        ) from None
    return Store(url or default_url(), classes=classes)


def _reviewer() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "reviewer"


@cli.group("review")
def review_group() -> None:
    """Review what the guard held back: list, show and label items, export the labels as a
    data set, or label them on a web page."""


@review_group.command("list")
@store_option
@click.option(
    "--status",
    type=click.Choice([*_STATUSES, "all"]),
    default="queued",
    show_default=True,
    help="Which items.",
)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_command(store_url: str | None, status: str, limit: int, as_json: bool) -> None:
    """The review queue, oldest first."""
    with _open(store_url) as store:
        items = store.list(status=status, limit=limit)
    if as_json:
        emit_json(items)
        return
    if not items:
        click.echo(f"no {status} items" if status != "all" else "the queue is empty")
        return
    click.echo(
        f"{'id':>6}  {'created':19}  {'action':8} {'pred':>4} {'conf':>6}  {'label':>5}  client"
    )
    for it in items:
        conf = "" if it["confidence"] is None else f"{it['confidence']:.3f}"
        click.echo(
            f"{it['id']:>6}  {it['created'][:19]:19}  {it['action']:8} {_dash(it['predicted']):>4} "
            f"{conf:>6}  {_dash(it['label']):>5}  {it['client']}"
        )


@review_group.command("show")
@store_option
@click.argument("item_id", metavar="ID", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON, the input included.")
def show_command(store_url: str | None, item_id: int, as_json: bool) -> None:
    """One item: the model's answer, its scores and reasons, and a summary of the input."""
    with _open(store_url) as store:
        item = store.get(item_id)
    x = item.pop("input")
    if as_json:
        item["input"] = x.tolist() if isinstance(x, np.ndarray) else x
        emit_json(item)
        return
    for key in ("id", "status", "created", "client", "request_id", "action", "answered"):
        click.echo(f"{key:14} {_dash(item[key])}")
    conf = "" if item["confidence"] is None else f" (confidence {item['confidence']:.4f})"
    click.echo(f"{'predicted':14} {_dash(item['predicted'])}{conf}")
    if item["probs"]:
        click.echo(f"{'probs':14} " + " ".join(f"{p:.3f}" for p in item["probs"]))
    for name, value in item["scores"].items():
        click.echo(f"{'score':14} {name} = {value}")
    for reason in item["reasons"]:
        click.echo(f"{'reason':14} {reason}")
    click.echo(f"{'model':14} {item['model_version'] or '-'}  policy {item['policy_hash'] or '-'}")
    if isinstance(x, np.ndarray):
        finite = x[np.isfinite(x)]
        span = (
            f"min {finite.min():.4g} max {finite.max():.4g}" if finite.size else "no finite value"
        )
        click.echo(
            f"{'input':14} float32 {list(x.shape)} {span} sha256 {item['input_sha256'][:16]}"
        )
    else:
        click.echo(f"{'input':14} not an array, as sent: {json.dumps(x)[:120]}")
    if item["label"] is not None:
        click.echo(
            f"{'label':14} {item['label']} by {item['labelled_by']} at {item['labelled_at']}"
        )


@review_group.command("label")
@store_option
@_classes_option
@click.argument("item_id", metavar="ID", type=int)
@click.argument("label", type=int)
@click.option("--by", default=None, help="Who labels (default: your user name).")
def label_command(
    store_url: str | None, classes: int | None, item_id: int, label: int, by: str | None
) -> None:
    """Give item ID its true LABEL (a class index)."""
    with _open(store_url, classes) as store:
        item = store.label(item_id, label, by=by or _reviewer())
    click.echo(f"item {item['id']}: labelled {item['label']} by {item['labelled_by']}")


@review_group.command("export")
@store_option
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def export_command(store_url: str | None, out: str, force: bool) -> None:
    """Write the labelled items to OUT (.npz with x and y), a data set `advx train` reads."""
    with _open(store_url) as store:
        summary = store.export(out, force=force)
    skipped = (
        f" ({summary['skipped']} left out: not an image in [0, 1])" if summary["skipped"] else ""
    )
    click.echo(f"wrote {summary['items']} labelled items {summary['shape']} to {out}{skipped}")


@review_group.command("serve")
@store_option
@_classes_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8090, show_default=True)
@click.option("--by", default=None, help="Who labels (default: your user name).")
def serve_command(
    store_url: str | None, classes: int | None, host: str, port: int, by: str | None
) -> None:
    """The review page: each queued image, the model's prediction and scores, one-click labels."""
    from ..guard.review_page import review_app

    store = _open(store_url, classes)
    # on a loopback address, only requests addressed to it: no DNS rebinding onto the page
    loopback = host in ("127.0.0.1", "localhost", "::1")
    hosts = ["127.0.0.1", "localhost", "::1", "[::1]"] if loopback else None
    app = review_app(store, by=by or _reviewer(), allowed_hosts=hosts)
    import uvicorn

    click.echo(f"advx review: {store.masked_url} on http://{host}:{port}/", err=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        store.close()


@guard_group.command("alerts")
@store_option
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--client", default=None, help="Only this client's alerts.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def alerts_command(store_url: str | None, limit: int, client: str | None, as_json: bool) -> None:
    """The query attacks the service caught, newest first."""
    with _open(store_url) as store:
        alerts = store.alerts(limit=limit, client=client)
    if as_json:
        emit_json(alerts)
        return
    if not alerts:
        click.echo("no alerts")
        return
    click.echo(f"{'time':19}  {'queries':>7}  {'score':>7}  client")
    for a in alerts:
        click.echo(f"{a['time'][:19]:19}  {a['queries']:>7}  {a['score']:>7.3f}  {a['client']}")


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)
