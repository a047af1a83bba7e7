"""Options and helpers shared by the commands."""

from __future__ import annotations

import ast
import json
import sys
from typing import Any

import click
import torch

from ..errors import InputError


def parse_floats(text: str | None, name: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(
            f"--{name}: expected comma-separated numbers such as 0.485,0.456,0.406, got {text!r}"
        ) from None


def parse_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``-p steps=40 -p loss=margin`` -> {"steps": 40, "loss": "margin"}."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--param: expected KEY=VALUE such as steps=40, got {pair!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word such as margin
        params[key.strip().replace("-", "_")] = value
    return params


def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device: unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device: CUDA is not available on this machine; use --device cpu")
    return device


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def model_options(f):
    """--model, --weights, --mean, --std, --bounds."""
    f = click.option(
        "--bounds",
        default="0,1",
        show_default=True,
        help="Valid input range, before normalization.",
    )(f)
    f = click.option(
        "--std", default=None, help="Per-channel std used inside the model, e.g. 0.229,0.224,0.225."
    )(f)
    f = click.option(
        "--mean",
        default=None,
        help="Per-channel mean used inside the model, e.g. 0.485,0.456,0.406.",
    )(f)
    f = click.option(
        "--weights",
        type=click.Path(dir_okay=False),
        default=None,
        help="State dict (.pt/.pth/.th or .safetensors).",
    )(f)
    f = click.option(
        "--model",
        "model_spec",
        required=False,
        default=None,
        help="Built-in name (smallcnn, lenet, resnet20), pkg.module:factory or file.py:factory.",
    )(f)
    return f


def build_classifier(
    model_spec: str,
    weights,
    mean,
    std,
    bounds,
    device: torch.device,
    batch_size="auto",
    **classifier_kw,
):
    from ..models import Classifier
    from ..zoo import build

    obj = build(model_spec, weights=weights)
    if isinstance(obj, Classifier):
        for key, value in classifier_kw.items():
            if value:
                setattr(obj, key, value)
        return obj
    lo_hi = parse_floats(bounds, "bounds")
    if not lo_hi or len(lo_hi) != 2:
        raise InputError(f"--bounds: expected LOW,HIGH such as 0,1, got {bounds!r}")
    net = obj.to(device).eval()  # our own freshly built module: moving it is fine
    return Classifier(
        net,
        bounds=(lo_hi[0], lo_hi[1]),
        mean=parse_floats(mean, "mean"),
        std=parse_floats(std, "std"),
        batch_size=batch_size,
        **classifier_kw,
    )


def data_option(f=None, *, required: bool = False):
    """--data, --split, -n. ``required``: no default data set (a CI job must say what it
    measures; only ``advx demo`` falls back to the embedded digits)."""
    if f is None:
        return lambda g: data_option(g, required=required)
    # -n as well: under torchrun, whose own parser takes "--n" for one of its options
    f = click.option(
        "-n",
        "--n",
        "n",
        type=click.IntRange(min=1),
        default=None,
        help="Use the first N samples (-n N under torchrun).",
    )(f)
    f = click.option("--split", default=None, help="Split for built-in or idx data (train, test).")(
        f
    )
    # no default=None when required: click 8.3 takes an explicit None as a value given
    default: dict[str, Any] = {} if required else {"default": "mnist-demo", "show_default": True}
    f = click.option(
        "--data",
        required=required,
        help="mnist-demo, an .npz with x and y, an idx file or folder, or a folder of images.",
        **default,
    )(f)
    return f


def info(msg: str, *, always: bool = False) -> None:
    """A line for the person at the terminal (stderr, so stdout stays machine-readable); -q
    silences it unless ``always`` (a verdict such as FAIL)."""
    ctx = click.get_current_context(silent=True)
    if not always and ctx is not None and ctx.meta.get("advx.quiet"):
        return
    click.echo(msg, err=True)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 point``, ``2 points``."""
    return f"{n:,} {word if n == 1 else (words or word + 's')}"


def gate_options(f):
    """--summary-md and --junit: the gate's outcome where a CI job shows it."""
    f = click.option(
        "--junit",
        "junit_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="Write JUnit XML here: one testcase per gate check (for a CI's test report).",
    )(f)
    f = click.option(
        "--summary-md",
        "summary_md",
        type=click.Path(dir_okay=False),
        default=None,
        help="Write a Markdown summary here (e.g. $GITHUB_STEP_SUMMARY).",
    )(f)
    return f


def write_gate(checks, *, summary_md=None, junit_path=None, report=None, comparison=None) -> None:
    """Write the Markdown summary and the JUnit XML asked for."""
    from ..audit.gate import junit, markdown, write_text

    if summary_md is not None:
        write_text(summary_md, markdown(checks=checks, report=report, comparison=comparison))
        info(f"wrote {summary_md}")
    if junit_path is not None:
        suite = "advx compare" if report is None else "advx audit"
        write_text(junit_path, junit(checks, suite=suite))
        info(f"wrote {junit_path}")


def exit_on(checks) -> None:
    """Exit 1 when a gate check failed (each said why on stderr)."""
    for c in checks:
        info(f"{'PASS' if c.passed else 'FAIL'}: {c.message}", always=not c.passed)
    if not all(c.passed for c in checks):
        sys.exit(1)
