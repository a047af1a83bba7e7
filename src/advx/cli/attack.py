"""``advx attack``: run one registered attack on a data set and save the adversarial examples."""

from __future__ import annotations

import math
import time
from typing import Any

import click
import numpy as np
import torch

from ..errors import InputError
from . import cli
from ._common import (
    build_classifier,
    check_channels,
    data_option,
    emit_json,
    info,
    model_options,
    parse_floats,
    parse_params,
    pick_device,
    plural,
    warn_threat,
)


def _attack_names() -> list[str]:
    from .. import attacks

    return attacks.list_attacks()


@cli.command("attack")
@click.argument("name", type=click.Choice(_attack_names(), case_sensitive=False))
@model_options
@click.option(
    "--blackbox",
    default=None,
    metavar="URL|FILE.onnx|pkg.module:fn",
    help="Attack a model you can only query (instead of --model): an HTTP endpoint, "
    "an ONNX file or a callable.",
)
@click.option(
    "--kind",
    type=click.Choice(["scores", "labels"]),
    default="scores",
    show_default=True,
    help="What the black box returns.",
)
@click.option(
    "--budget", type=click.IntRange(min=1), default=None, help="Hard cap on queries per sample."
)
@click.option(
    "--num-classes",
    type=click.IntRange(min=2),
    default=None,
    help="Classes of a label-only black box.",
)
@click.option(
    "--header",
    "headers",
    multiple=True,
    metavar="NAME:VALUE",
    help="HTTP header sent to a --blackbox URL, repeatable (--header 'X-Client-Id: audit').",
)
@click.option(
    "--token-env",
    default=None,
    metavar="VAR",
    help="Send 'Authorization: Bearer $VAR' to a --blackbox URL (the token stays out of argv).",
)
@click.option(
    "--protocol",
    type=click.Choice(["advx", "v2"]),
    default="advx",
    show_default=True,
    help="Wire format of a --blackbox URL: advx's {'inputs': ...} or the Open Inference "
    "Protocol v2 (Triton, KServe).",
)
@click.option(
    "--model-name",
    default=None,
    help="The served model's name for --protocol v2 (POST URL/v2/models/NAME/infer).",
)
@data_option
@click.option(
    "--threat",
    "threat_spec",
    default="linf:0.3",
    show_default=True,
    help="NORM:EPS, e.g. linf:8/255, l2:0.5, l2:inf.",
)
@click.option(
    "--target", default=None, help="Targeted attack: a class index for all samples, or 'random'."
)
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Attack hyper-parameter, repeatable (-p steps=100).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Samples per attack call.",
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    required=True,
    help="Where to write the .npz of results.",
)
@click.option(
    "--curve",
    "curve_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also plot robust accuracy against eps from the per-sample distances to this PNG "
    "(a minimum-norm attack: --threat linf:inf, or up to a finite eps).",
)
def attack_command(
    name,
    model_spec,
    weights,
    mean,
    std,
    bounds,
    blackbox,
    kind,
    budget,
    num_classes,
    headers,
    token_env,
    protocol,
    model_name,
    data,
    split,
    n,
    threat_spec,
    target,
    params,
    seed,
    batch_size,
    device,
    out,
    curve_path,
) -> None:
    """Run attack NAME and write x_adv with per-sample success, distance, queries and grads.

    A JSON summary goes to stdout.
    """
    from .. import attacks
    from .._io import atomic_open, check_writable, sha256_file
    from .._progress import progress
    from .._provenance import provenance
    from ..attacks._result import concat_results
    from ..data import data_sha256, load
    from ..threat import parse_threat
    from ..zoo import resolve_weights

    out_path = check_writable(out, name="out")
    dev = pick_device(device)
    threat = parse_threat(threat_spec)
    attack = attacks.create(name, threat, seed=seed, **parse_params(params))
    if curve_path is not None:
        _check_curve(attack, threat)
        curve_path = check_writable(curve_path, name="curve")
    if blackbox is not None and model_spec is not None:
        raise InputError("give either --model (white-box) or --blackbox (query access), not both")
    if blackbox is not None:
        from ..models import BlackBox

        lo_hi = parse_floats(bounds or "0,1", "bounds")
        if not lo_hi or len(lo_hi) != 2:
            raise InputError(f"--bounds: expected LOW,HIGH such as 0,1, got {bounds!r}")
        from ..models.remote import parse_headers

        http: dict[str, Any] = {}
        if headers or token_env or protocol != "advx" or model_name:
            http = dict(
                headers=parse_headers(list(headers)) if headers else None,
                token_env=token_env,
                protocol=protocol,
                model_name=model_name,
            )
        model = BlackBox.from_spec(
            blackbox,
            kind=kind,
            budget=budget,
            num_classes=num_classes,
            bounds=(lo_hi[0], lo_hi[1]),
            **http,
        )
    else:
        model = build_classifier(model_spec, weights, mean, std, bounds, dev)
        if budget is not None:
            model.budget = budget
    x, y = load(data, split=split, n=n)
    check_channels(model, x)
    warn_threat(threat, model.bounds, x)
    x, y = x.to(dev), y.to(dev)
    index = torch.arange(len(x), device=dev)
    num_classes = _num_classes(model, x, num_classes)

    tgt = None
    if target is not None:
        if target == "random":
            tgt = attacks.random_targets(y, num_classes, seed=seed, index=index)
        else:
            try:
                k = int(target)
            except ValueError:
                raise InputError(
                    f"--target: expected a class index or 'random', got {target!r}"
                ) from None
            if not 0 <= k < num_classes:
                raise InputError(f"--target: the model has classes 0..{num_classes - 1}, got {k}")
            keep = y != k
            if not bool(keep.all()):
                info(
                    f"skipping {plural(int((~keep).sum()), 'sample')} whose label is already "
                    f"the target {k}"
                )
            x, y, index = x[keep], y[keep], index[keep]
            tgt = torch.full_like(y, k)

    start = time.perf_counter()
    results = []
    batches = range(0, len(x), batch_size)
    for b in progress(batches, total=len(batches), desc=name, unit="batch"):
        sl = slice(b, b + batch_size)
        results.append(
            attack(model, x[sl], y[sl], target=None if tgt is None else tgt[sl], index=index[sl])
        )
    result = concat_results(results)
    seconds = time.perf_counter() - start

    with atomic_open(out_path, "wb") as f:
        np.savez_compressed(
            f,
            x_adv=result.x_adv.float().cpu().numpy(),
            success=result.success.cpu().numpy(),
            distance=result.distance.float().cpu().numpy(),
            queries=result.queries.cpu().numpy(),
            grads=result.grads.cpu().numpy(),
            y=y.cpu().numpy(),
            index=index.cpu().numpy(),
            target=(tgt if tgt is not None else torch.full_like(y, -1)).cpu().numpy(),
        )
    summary = result.summary()
    summary["seconds"] = round(seconds, 3)
    if curve_path is not None:
        summary["curve"] = _write_curve(curve_path, result, name, len(x))
    emit_json(
        {
            "attack": name,
            "params": attack.params,
            "threat": threat.to_dict(),
            "out": str(out_path),
            "summary": summary,
            "provenance": provenance(
                device=dev,
                seed=seed,
                model=model_spec or blackbox,
                weights_sha256=sha256_file(resolve_weights(weights)[0]) if weights else None,
                data=str(data),
                data_sha256=data_sha256(x, y),
            ),
        }
    )


def _num_classes(model, x, given: int | None) -> int:
    """From one query of the first input (charged to no attack), or as given for labels-only."""
    from ..models import ModelView, Tracker

    if model.access == "labels":
        if given is None:
            if model.num_classes is None:
                raise InputError(
                    "--num-classes: a label-only black box does not say how many classes it has"
                )
            return model.num_classes
        return given
    with model.prepared():
        return ModelView(model, Tracker(1, x.device)).logits(x[:1]).shape[1]


def _check_curve(attack, threat) -> None:
    """Before any work: a curve needs distances that say how close each point's boundary is."""
    from .. import viz

    if not type(attack).minimum_norm:
        raise InputError(
            f"--curve: {type(attack).__name__} is a fixed-eps attack: it only says which points "
            f"break within eps {threat.eps:g}, and its distances are where it stopped, not how "
            "close each point is to being fooled, so a curve from them would be a step at eps. "
            f"Run a minimum-norm attack with an unlimited budget instead, e.g. `advx attack fmn "
            f"--threat {threat.norm}:inf --curve ...` (others: `advx list`, kind min-norm)"
        )
    if not viz.have_matplotlib():
        raise InputError("--curve: the plot needs matplotlib: pip install 'advx[report]'")


def _write_curve(path, result, name: str, n: int) -> dict[str, Any]:
    """The PNG of robust accuracy against eps from ``result``'s distances; what it holds."""
    from .. import viz
    from .._io import atomic_open
    from ..attacks import robustness_curve

    budget = float(result.threat.eps)
    found = result.distance[result.success].double()
    top = budget if math.isfinite(budget) else float(found.max()) * 1.05 if found.numel() else 1.0
    top = top or 1.0  # every point already misclassified: distance 0
    eps, acc = robustness_curve(result, torch.linspace(0, top, 101, dtype=torch.float64))
    within = "" if math.isinf(budget) else f" within eps {budget:g}"
    png = viz.line_plot(
        {name: (eps.tolist(), acc.tolist())},
        xlabel=f"{result.threat.norm} eps",
        ylabel="not sent to the target" if result.targeted else "robust accuracy (upper bound)",
        title=f"{name}{within}: {n:,} samples, one minimum-norm run",
        points=False,
    )
    with atomic_open(path, "wb") as f:
        f.write(png)
    return {
        "png": str(path),
        "eps_max": top,
        "robust_accuracy_at_eps_max": float(acc[-1]),
        "note": "a point counts as robust at eps when the attack found no adversarial example "
        "within eps: an upper bound on robust accuracy, as tight as the attack is strong"
        + ("" if math.isinf(budget) else "; beyond the attack's eps nothing is known"),
    }
