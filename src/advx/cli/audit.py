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
    check_channels,
    data_option,
    emit_json,
    exit_on,
    gate_options,
    info,
    model_options,
    parse_floats,
    pick_device,
    plural,
    warn_threat,
    write_gate,
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
    "--save-adv",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write every adversarial example found here (.npz, lossless): indices, inputs, labels, "
    "predictions and the stage that found each.",
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
    "--baseline",
    type=click.Path(dir_okay=False),
    default=None,
    help="A report of the same data, threat and suite (e.g. of the model in production): "
    "compare with it, and with --max-drop gate on it.",
)
@click.option(
    "--max-drop",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    help="With --baseline: exit 1 when robust accuracy fell by more than this share (0.01: one "
    "point).",
)
@gate_options
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
    save_adv,
    fail_under,
    baseline,
    max_drop,
    summary_md,
    junit_path,
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

    group = init_from_env(device)
    rank, world = group.rank, group.world
    for path, name in (
        (out, "out"),
        (html_path, "html"),
        (resume, "resume"),
        (summary_md, "summary-md"),
        (junit_path, "junit"),
        (save_adv, "save-adv"),
    ):
        if path is not None and rank == 0:
            check_writable(path, name=name)
    if max_drop is not None and baseline is None:
        raise InputError("--max-drop: gives the largest drop from a --baseline report; pass one")
    base_report = None
    if baseline is not None:
        from ..audit import Report

        base_report = Report.load(baseline)  # a bad baseline fails now, before any work
    if html_path is not None:
        from ..viz import have_matplotlib

        if not have_matplotlib():
            raise InputError("--html needs matplotlib and jinja2: pip install 'advx[report]'")
    dev = pick_device(device) if world == 1 or device != "auto" else local_device(device)
    threat = parse_threat(threat_spec)
    the_suite = load_suite(suite, threat)  # a bad suite fails here, before the model or the data
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
    check_channels(model, x)
    warn_threat(threat, model.bounds, x)
    if base_report is not None:  # refuse an incomparable baseline before the audit, not after
        from ..audit.comparison import check_comparable
        from ..audit.report import DataInfo
        from ..data import data_sha256

        check_comparable(
            base_report,
            data=DataInfo(name=str(data), n=len(y), sha256=data_sha256(x, y)),
            threat=threat.with_bounds(model.bounds).to_dict()
            if not threat.has_explicit_bounds
            else threat.to_dict(),
            suite=the_suite.to_dict(),
            base_label=str(baseline),
            new_label="this audit",
        )
    x, y = x.to(dev), y.to(dev)
    state = resume if resume is not None else (f"{out}.state" if out is not None else None)
    meta = {
        "model": model_spec,
        "data": str(data) + (f":{split}" if split else "") + (f"[:{n}]" if n else ""),
    }
    if weights is not None:
        from ..zoo import resolve_weights

        meta["weights"] = str(weights)
        meta["weights_sha256"] = sha256_file(resolve_weights(weights)[0])
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
            return_adv=save_adv is not None,
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
    if save_adv is not None and report.adversarial is not None:
        report.adversarial.save(save_adv)
        info(f"wrote {save_adv} ({plural(len(report.adversarial), 'adversarial example')})")
    from ..audit.gate import audit_checks

    gated = fail_under is not None or base_report is not None
    checks = audit_checks(report, fail_under=fail_under) if gated else []
    comparison = None
    if base_report is not None:
        from ..audit import compare

        comparison = compare(base_report, report, max_drop=max_drop)
        for line in comparison.summary_lines():
            if not line.startswith(("PASS", "FAIL")):
                info(line)
        checks += [c for c in comparison.checks if c.kind != "reliable"]  # once is enough
    write_gate(
        checks, summary_md=summary_md, junit_path=junit_path, report=report, comparison=comparison
    )
    exit_on(checks)


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
