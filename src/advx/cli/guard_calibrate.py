"""``advx guard calibrate``: thresholds on clean held-out data, with stated guarantees, written
to a policy file that ``advx serve --policy`` and ``Guard.from_policy`` read."""

from __future__ import annotations

import click

from ..errors import InputError
from ._common import build_classifier, data_option, emit_json, info, model_options, pick_device
from .guard import guard_group


@guard_group.command("calibrate")
@model_options
@data_option
@click.option(
    "--fpr",
    type=float,
    default=0.05,
    show_default=True,
    help="Share of clean inputs the whole policy may flag (all detectors together).",
)
@click.option(
    "--risk",
    type=float,
    default=None,
    help="Error rate allowed on accepted inputs; sets the confidence floor (selective risk).",
)
@click.option(
    "--delta",
    type=float,
    default=0.05,
    show_default=True,
    help="The guarantees hold with probability at least 1 - delta.",
)
@click.option(
    "--detectors",
    default="feature_squeezing,energy",
    show_default=True,
    help="Comma-separated detector names (advx.guard.DETECTORS); 'none' for no detector.",
)
@click.option(
    "--on-detect",
    type=click.Choice(["fallback", "abstain", "review", "reject"]),
    default="review",
    show_default=True,
    help="What the guard does with a flagged input.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the data split.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    required=True,
    help="Write the policy here (TOML).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
def calibrate_command(
    model_spec,
    weights,
    mean,
    std,
    bounds,
    data,
    split,
    n,
    fpr,
    risk,
    delta,
    detectors,
    on_detect,
    seed,
    out,
    as_json,
    device,
) -> None:
    """Calibrate a guard on clean held-out data and write its policy.

    The detectors' thresholds are set so that the share of clean inputs the whole policy flags
    is --fpr (reported with its interval); with --risk, the confidence floor so that the error
    rate on accepted inputs is at most --risk with probability at least 1 - --delta.
    """
    import dataclasses

    from .._io import check_writable
    from ..data import load
    from ..guard import Guard, build_detectors

    if model_spec is None:
        raise InputError(
            "--model is required: a built-in name, pkg.module:factory or file.py:factory"
        )
    for value, name, hint in (
        (fpr, "fpr", "e.g. 0.05"),
        (delta, "delta", "e.g. 0.05"),
        (risk, "risk", "e.g. 0.01"),
    ):
        if value is not None and not 0 < value < 1:
            raise InputError(f"--{name}: must be strictly between 0 and 1 ({hint}), got {value}")
    check_writable(out, name="out")
    model = build_classifier(model_spec, weights, mean, std, bounds, pick_device(device))
    names = [] if detectors.strip().lower() in ("", "none") else detectors
    guard = Guard(model, detectors=build_detectors(names, model))
    guard.use(dataclasses.replace(guard.policy, on_detect=on_detect))
    x, y = load(data, split=split, n=n)
    report = guard.calibrate(x, y, fpr=fpr, risk=risk, delta=delta, seed=seed)
    report.policy.save(out)
    if as_json:
        emit_json(report.to_dict())
    else:
        for line in report.lines():
            click.echo(line)
    info(f"wrote {out}")
