"""``advx audit``: the robustness audit, with a report and a CI gate.

Under ``torchrun --nproc_per_node=K -m advx audit ...`` the samples are split across the K
processes (gloo on CPU, nccl on GPU) and rank 0 writes the one report.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import torch

from .._distributed import init_from_env, local_device
from ..errors import InputError
from . import cli
from ._common import (
    build_classifier,
    data_option,
    emit_json,
    info,
    model_options,
    parse_floats,
    pick_device,
)


@cli.command("audit")
@model_options
@data_option(required=True)
@click.option(
    "--threat",
    "threat_spec",
    required=True,
    help="NORM:EPS, e.g. linf:8/255 (required: a gate must say what it measures).",
)
@click.option(
    "--suite",
    default="standard",
    show_default=True,
    help="standard, fast, or a TOML file of attacks.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the JSON report here (else to stdout).",
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the HTML report here.",
)
@click.option(
    "--fail-under",
    type=click.FloatRange(0, 1),
    default=None,
    help=(
        "Exit 1 when robust accuracy is below this, or when a sanity check says it cannot be "
        "trusted."
    ),
)
@click.option(
    "--resume",
    "resume",
    type=click.Path(dir_okay=False),
    default=None,
    help="State file: saved as the audit goes, resumed from when it exists.",
)
@click.option(
    "--eps-curve",
    default="auto",
    show_default=True,
    help="auto, min-norm, none, or comma-separated eps values.",
)
@click.option("--no-checks", is_flag=True, help="Skip the sanity checks.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Samples per unit of work (and of saved state).",
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option(
    "--autocast",
    type=click.Choice(["none", "bf16", "fp16"]),
    default="none",
    show_default=True,
    help="Run the model in mixed precision (a GPU); losses stay in full precision.",
)
@click.option(
    "--compile",
    "compile_",
    is_flag=True,
    help="Compile the model's forward passes with torch.compile (pays off on long audits).",
)
def audit_command(
    model_spec,
    weights,
    mean,
    std,
    bounds,
    data,
    split,
    n,
    threat_spec,
    suite,
    seed,
    out,
    html_path,
    fail_under,
    resume,
    eps_curve,
    no_checks,
    batch_size,
    device,
    autocast,
    compile_,
) -> None:
    """Measure robust accuracy with a cascade of attacks; write a JSON (and HTML) report."""
    from .. import audit as run_audit
    from .._io import check_writable, sha256_file
    from ..audit import load_suite
    from ..data import load
    from ..threat import parse_threat

    if model_spec is None:
        raise InputError(
            "--model is required: a built-in name, pkg.module:factory or file.py:factory"
        )
    group = init_from_env(device)
    rank, world = group.rank, group.world
    for path, name in ((out, "out"), (html_path, "html"), (resume, "resume")):
        if path is not None and rank == 0:
            check_writable(path, name=name)
    if html_path is not None:
        from ..viz import have_matplotlib

        if not have_matplotlib():
            raise InputError("--html needs matplotlib and jinja2: pip install 'advx[report]'")
    dev = pick_device(device) if world == 1 or device != "auto" else local_device(device)
    threat = parse_threat(threat_spec)
    load_suite(suite, threat)  # a bad suite fails here, before the model or the data are loaded
    curve = _curve(eps_curve)
    model = build_classifier(
        model_spec,
        weights,
        mean,
        std,
        bounds,
        dev,
        compile=compile_,
        autocast={"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[autocast],
    )
    x, y = load(data, split=split, n=n)
    x, y = x.to(dev), y.to(dev)
    state = resume if resume is not None else (f"{out}.state" if out is not None else None)
    meta = {
        "model": model_spec,
        "data": str(data) + (f":{split}" if split else "") + (f"[:{n}]" if n else ""),
    }
    if weights is not None:
        meta["weights"] = str(weights)
        meta["weights_sha256"] = sha256_file(weights)
    try:
        report = run_audit(
            model,
            x,
            y,
            threat,
            suite=suite,
            seed=seed,
            eps_curve=curve,
            checks=not no_checks,
            state=state,
            batch_size=batch_size,
            meta=meta,
            state_mismatch="error" if resume is not None else "restart",
        )
    except KeyboardInterrupt:
        if rank == 0:
            if state is not None:
                info(
                    f"interrupted: the per-sample state is saved in {state}; run the same command "
                    f"with --resume {state} to continue where it stopped"
                )
            else:
                info(
                    "interrupted: nothing saved; pass --resume FILE (or --out) to make the audit "
                    "resumable"
                )
        sys.exit(130)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if report is None:  # not rank 0
        return
    for line in report.summary_lines():
        info(line)
    if out is not None:
        report.save(out)
        info(f"wrote {out}")
        if resume is None and state is not None and Path(state).exists():
            os.unlink(state)  # our own default state file: the audit is complete
    else:
        emit_json(report.to_dict())
    if html_path is not None:
        report.save_html(html_path)
        info(f"wrote {html_path}")
    if fail_under is not None:
        if report.robust_accuracy < fail_under:
            info(
                f"FAIL: robust accuracy {report.robust_accuracy:.2%} is below --fail-under "
                f"{fail_under:.2%}",
                always=True,
            )
            sys.exit(1)
        if not report.reliable:
            info(
                "FAIL: a sanity check found that the robust accuracy cannot be trusted (see the "
                "findings)",
                always=True,
            )
            sys.exit(1)
        info(f"PASS: robust accuracy {report.robust_accuracy:.2%} >= {fail_under:.2%}")


def _curve(spec: str):
    s = spec.strip().lower()
    if s in ("none", "off", "no", ""):
        return None
    if s in ("auto", "min-norm"):
        return s
    values = parse_floats(spec, "eps-curve")
    if not values:
        raise InputError(f"--eps-curve: expected auto, min-norm, none or eps values, got {spec!r}")
    return values
