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
    open_source,
    parse_floats,
    pick_device,
    plural,
    stream_options,
    warn_threat,
    write_gate,
)


@cli.command("audit")
@model_options
@data_option(required=True)
@stream_options
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
    "predictions, the stage that found each, and file names where the data has them. Written "
    "as they are found, never all in memory.",
)
@click.option(
    "--samples-csv",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the per-sample results here (index, name, label, clean prediction, robust, "
    "stage that broke it, distance): one row per sample, with its file name where the data "
    "has one.",
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
    help="auto (FMN below eps, the cascade at it, APGD-CE above), runs (APGD-CE per eps), "
    "min-norm (FMN), none, or comma-separated eps values.",
)
@click.option("--no-checks", is_flag=True, help="Skip the sanity checks.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Samples per unit of work (and of saved state). Default: 500 on a CPU; on a GPU as "
    "many as its free memory holds, up to 10,000.",
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
    resize,
    center_crop,
    data_keys,
    threat_spec,
    suite,
    seed,
    out,
    html_path,
    save_adv,
    samples_csv,
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
    from ..audit.runner import UNIT
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
        (samples_csv, "samples-csv"),
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
    # read chunk by chunk from where it lies (the model may be on a GPU): one pass now counts,
    # checks and fingerprints it, before any work
    source = open_source(
        data,
        split=split,
        n=n,
        resize=resize,
        center_crop=center_crop,
        data_keys=data_keys,
        bounds=model.bounds,
    )
    scan = source.scan(batch_size or UNIT)  # a read size only: the cached scan is reused
    probe = torch.empty((1, *scan.shape))  # the shape of one sample, for the checks below
    check_channels(model, probe)
    warn_threat(threat, model.bounds, probe)
    if base_report is not None:  # refuse an incomparable baseline before the audit, not after
        from ..audit.comparison import check_comparable
        from ..audit.report import DataInfo

        check_comparable(
            base_report,
            data=DataInfo(name=str(data), n=scan.n, sha256=scan.sha256),
            threat=threat.with_bounds(model.bounds).to_dict()
            if not threat.has_explicit_bounds
            else threat.to_dict(),
            suite=the_suite.to_dict(),
            base_label=str(baseline),
            new_label="this audit",
        )
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
            source,
            threat,
            suite=suite,
            seed=seed,
            eps_curve=curve,
            checks=not no_checks,
            state=state,
            batch_size=batch_size,
            meta=meta,
            state_mismatch="error" if resume is not None else "restart",
            save_adv=save_adv,
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
            Path(f"{state}.adv").unlink(missing_ok=True)  # and its adversarial examples
    else:
        emit_json(report.to_dict())
    if html_path is not None:
        report.save_html(html_path)
        info(f"wrote {html_path}")
    if save_adv is not None:
        found = sum(1 for b in report.samples.broken_by if b >= 0)
        info(f"wrote {save_adv} ({plural(found, 'adversarial example')})")
    if samples_csv is not None:
        _write_samples(samples_csv, report, source.names)
        info(f"wrote {samples_csv}")
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


def _write_samples(path, report, names) -> None:
    """One CSV row per sample: what the report's per-sample data says, with its name."""
    import csv

    from .._io import atomic_open

    s = report.samples
    with atomic_open(path, "w") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "index",
                "name",
                "label",
                "clean_pred",
                "clean_correct",
                "robust",
                "broken_by",
                "distance",
            ]
        )
        for i in range(len(s.label)):
            w.writerow(
                [
                    i,
                    names[i] if names is not None else "",
                    s.label[i],
                    s.clean_pred[i],
                    int(s.clean_correct[i]),
                    int(s.robust[i]),
                    s.broken_by[i],
                    "" if s.distance[i] is None else s.distance[i],
                ]
            )


def _curve(spec: str):
    s = spec.strip().lower()
    if s in ("none", "off", "no", ""):
        return None
    if s in ("auto", "runs", "min-norm"):
        return s
    values = parse_floats(spec, "eps-curve")
    if not values:
        raise InputError(
            f"--eps-curve: expected auto, runs, min-norm, none or eps values, got {spec!r}"
        )
    return values
