"""``advx guard init`` and ``advx guard update``: the versioned model directory a service serves,
and the loop that turns reviewed inputs into a better version of it."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import InputError
from ._common import (
    build_classifier,
    emit_json,
    info,
    model_options,
    pick_device,
    recipe_callback,
)
from .guard import guard_group

ADMIN_TOKEN_ENV = "ADVX_ADMIN_TOKEN"


def _model_dir_option(f):
    return click.option(
        "--model-dir",
        type=click.Path(file_okay=False),
        required=True,
        help="The versioned model directory (v0001/, v0002/, ..., current).",
    )(f)


def _load(source: str, split: str | None, name: str):
    from ..data import load

    try:
        return load(source, split=split)
    except InputError as e:
        raise InputError(f"--{name}: {e}") from None


def _absolute_spec(spec: str) -> str:
    # a path/to/file.py:factory spec must still resolve when the service runs from elsewhere
    module, sep, attr = spec.partition(":")
    if sep and module.endswith(".py"):
        return f"{Path(module).resolve()}:{attr}"
    return spec


@guard_group.command("init")
@_model_dir_option
@model_options
@click.option("--data", required=True, help="Clean held-out data to calibrate on.")
@click.option("--split", default=None, help="Split of --data (train, test).")
@click.option(
    "--detectors",
    default="feature_squeezing,energy",
    show_default=True,
    help="Comma-separated detector names (advx.guard.DETECTORS); 'none' for no detector.",
)
@click.option("--fpr", type=float, default=0.05, show_default=True, help="Clean inputs flagged.")
@click.option("--risk", type=float, default=None, help="Error rate allowed on accepted inputs.")
@click.option(
    "--on-detect",
    type=click.Choice(["fallback", "abstain", "review", "reject"]),
    default="review",
    show_default=True,
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the version's meta as JSON.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
def init_command(
    model_dir,
    model_spec,
    weights,
    mean,
    std,
    bounds,
    data,
    split,
    detectors,
    fpr,
    risk,
    on_detect,
    seed,
    as_json,
    device,
) -> None:
    """Create a model directory: calibrate a guard for --model on --data and promote it as
    v0001. `advx serve --model-dir DIR` then serves it."""
    from ..guard.update import init

    if model_spec is None:
        raise InputError("--model is required: a built-in name, pkg.module:factory or file.py:f")
    for value, name in ((fpr, "fpr"), (risk, "risk")):
        if value is not None and not 0 < value < 1:
            raise InputError(f"--{name}: must be strictly between 0 and 1, got {value}")
    model = build_classifier(model_spec, weights, mean, std, bounds, pick_device(device))
    names = [] if detectors.strip().lower() in ("", "none") else detectors
    version = init(
        model_dir,
        model,
        data=_load(data, split, "data"),
        detectors=names,
        fpr=fpr,
        risk=risk,
        on_detect=on_detect,
        model_spec=_absolute_spec(model_spec),
        seed=seed,
    )
    if as_json:
        emit_json(version.meta)
    else:
        click.echo(
            f"{version.name} is current in {model_dir} (policy {version.policy.hash}, "
            f"model {version.meta['model_fingerprint'][:12]})"
        )


@guard_group.command("update")
@_model_dir_option
@click.option("--reviewed", required=True, help="The labelled items (advx review export).")
@click.option("--data", required=True, help="The model's training data, mixed with --reviewed.")
@click.option("--split", default=None, help="Split of --data (train, test).")
@click.option("--audit-data", required=True, help="Held-out data both models are audited on.")
@click.option("--audit-split", default=None, help="Split of --audit-data.")
@click.option(
    "--calib-data", default=None, help="Held-out data to recalibrate on (default --audit-data)."
)
@click.option("--calib-split", default=None, help="Split of --calib-data.")
@click.option(
    "--recipe",
    default="fgsm-rs",
    callback=recipe_callback,
    show_default=True,
)
@click.option("--threat", default="linf:0.3", show_default=True, help="Trained and audited at.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-4, show_default=True)
@click.option(
    "--review-share",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.25,
    show_default=True,
    help="Share of the training mix made of reviewed items (they are repeated).",
)
@click.option("--train-n", type=click.IntRange(min=1), default=None, help="First N of --data.")
@click.option(
    "--max-drop",
    type=click.FloatRange(0, 1),
    default=0.01,
    show_default=True,
    help="Largest drop in robust or clean accuracy that is still promoted.",
)
@click.option("--fpr", type=float, default=None, help="Default: the current policy's target.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--reload-url", default=None, help="A running advx serve to reload on promotion.")
@click.option(
    "--admin-token",
    default=None,
    help=f"Its admin token (default: ${ADMIN_TOKEN_ENV}).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
def update_command(
    model_dir,
    reviewed,
    data,
    split,
    audit_data,
    audit_split,
    calib_data,
    calib_split,
    recipe,
    threat,
    epochs,
    batch_size,
    lr,
    review_share,
    train_n,
    max_drop,
    fpr,
    seed,
    reload_url,
    admin_token,
    as_json,
    device,
) -> None:
    """Fine-tune the current version on the reviewed items mixed with its training data, audit
    it against the current one, and promote it (recalibrated) only when neither robust nor clean
    accuracy drops by more than --max-drop.

    Exit status: 0 promoted (and reloaded, with --reload-url), 1 refused or not reloaded,
    2 bad input.
    """
    from ..guard.update import update

    if fpr is not None and not 0 < fpr < 1:
        raise InputError(f"--fpr: must be strictly between 0 and 1, got {fpr}")
    token = admin_token or os.environ.get(ADMIN_TOKEN_ENV)
    if reload_url and not token:
        raise InputError(
            f"--reload-url needs the service's admin token: --admin-token or ${ADMIN_TOKEN_ENV}"
        )
    result = update(
        model_dir,
        reviewed=_load(reviewed, None, "reviewed"),
        train_data=_load(data, split, "data"),
        audit_data=_load(audit_data, audit_split, "audit-data"),
        calib_data=None if calib_data is None else _load(calib_data, calib_split, "calib-data"),
        recipe=recipe,
        threat=threat,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        review_share=review_share,
        train_n=train_n,
        max_drop=max_drop,
        fpr=fpr,
        seed=seed,
        device=str(pick_device(device)),
    )
    doc = result.to_dict()
    ok = result.promoted
    if result.promoted and reload_url:
        doc["reload"] = reload(reload_url, token)
        ok = bool(doc["reload"].get("ok")) and doc["reload"].get("version") == result.version
    if as_json:
        emit_json(doc)
    else:
        for line in result.lines():
            click.echo(line)
    if "reload" in doc:
        r = doc["reload"]
        info(
            f"service {reload_url}: serving {r.get('version')}"
            if ok
            else f"service {reload_url} did not switch to {result.version}: {r.get('reason') or r}"
        )
    raise SystemExit(0 if ok else 1)


def _reload_options(f):
    f = click.option(
        "--admin-token", default=None, help=f"Its admin token (default: ${ADMIN_TOKEN_ENV})."
    )(f)
    return click.option(
        "--reload-url", default=None, help="A running advx serve to reload afterwards."
    )(f)


@guard_group.command("versions")
@_model_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print every version's meta as JSON.")
def versions_command(model_dir, as_json) -> None:
    """List a model directory's versions, the current one marked, with their provenance."""
    from ..guard.versions import ModelDir

    md = ModelDir(model_dir)
    current = md.current()
    metas = [md.meta(v) for v in md.versions()]
    if as_json:
        emit_json({"current": current, "versions": metas})
        return
    if not metas:
        info(f"{model_dir} holds no versions; create one with advx guard init")
    for m in metas:
        new = (m.get("audit") or {}).get("new") or {}
        figures = (
            f"clean {new['clean_accuracy']:.4f} robust {new['robust_accuracy']:.4f}" if new else "-"
        )
        click.echo(
            f"{'*' if m['version'] == current else ' '} {m['version']}  {m['created']}  "
            f"parent {m.get('parent') or '-':5}  policy {m['policy_hash']}  {figures}"
        )


@guard_group.command("promote")
@_model_dir_option
@click.argument("version")
@_reload_options
def promote_command(model_dir, version, reload_url, admin_token) -> None:
    """Make VERSION current (e.g. roll back to an earlier one), once it loads completely.

    Exit status: 0 promoted (and served, with --reload-url), 1 not served, 2 bad input or a
    version that does not load (the current one is left as it was)."""
    from ..guard.versions import ModelDir

    token = admin_token or os.environ.get(ADMIN_TOKEN_ENV)
    if reload_url and not token:
        raise InputError(
            f"--reload-url needs the service's admin token: --admin-token or ${ADMIN_TOKEN_ENV}"
        )
    md = ModelDir(model_dir)
    previous = md.current()
    md.promote(version)
    click.echo(f"{version} is current in {model_dir} (was {previous})")
    if reload_url:
        r = reload(reload_url, token)
        if r.get("ok") and r.get("version") == version:
            info(f"service {reload_url}: serving {version}")
        else:
            info(f"service {reload_url} did not switch to {version}: {r.get('reason') or r}")
            raise SystemExit(1)


def reload(url: str, token: str | None, *, timeout: float = 60.0) -> dict:
    """Ask a running ``advx serve --model-dir`` to serve the current version; its answer, or
    ``{"ok": False, "reason": ...}`` when it could not be reached or refused the call."""
    import httpx

    target = url.rstrip("/") + "/admin/reload"
    try:
        r = httpx.post(target, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
    except httpx.HTTPError as e:
        return {"ok": False, "reason": f"cannot reach {target}: {type(e).__name__}: {e}"}
    try:
        body = r.json()
    except ValueError:
        body = {"text": r.text[:200]}
    if r.status_code != 200:
        return {"ok": False, "status": r.status_code, "reason": body}
    return body if isinstance(body, dict) else {"ok": False, "reason": body}
