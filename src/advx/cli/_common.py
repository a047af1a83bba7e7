"""Options and helpers shared by the commands."""

from __future__ import annotations

import ast
import functools
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


def recipe_callback(ctx, param, value: str) -> str:
    """--recipe in either spelling, fgsm_rs or fgsm-rs (the README's and the command line's)."""
    from ..training import recipe_name

    try:
        return recipe_name(value)
    except InputError as e:
        raise click.BadParameter(str(e).removeprefix("recipe: ")) from None


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
    """--model, --model-arg, --download, --weights, --mean, --std, --bounds.

    --model-arg and --download are taken off the command's arguments and kept in the click
    context, where :func:`build_classifier` reads them: every command gets them without
    changing its signature."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context(silent=True)
        model_args = kwargs.pop("model_args", ())
        download = kwargs.pop("download", False)
        if ctx is not None:
            ctx.meta["advx.model_args"] = parse_model_args(model_args)
            ctx.meta["advx.download"] = bool(download)
        return f(*args, **kwargs)

    g = wrapper
    g = click.option(
        "--bounds",
        default=None,
        help="Valid input range, before normalization [default: 0,1, the checkpoint's or the "
        "zoo model's].",
    )(g)
    g = click.option(
        "--std",
        default=None,
        help="Per-channel std used inside the model, e.g. 0.229,0.224,0.225 (a zoo model's "
        "comes from its config).",
    )(g)
    g = click.option(
        "--mean",
        default=None,
        help="Per-channel mean used inside the model, e.g. 0.485,0.456,0.406 (a zoo model's "
        "comes from its config).",
    )(g)
    g = click.option(
        "--weights",
        type=click.Path(),
        default=None,
        help="State dict (.pt/.pth/.th or .safetensors), or what advx train --out wrote (the "
        "folder or its checkpoint.json: --model, --mean, --std and --bounds then default to "
        "what it records).",
    )(g)
    g = click.option(
        "--download",
        is_flag=True,
        default=False,
        help="Let a zoo model (timm:, torchvision:, hf:, robustbench:) download weights that are "
        "not cached; nothing is downloaded without it.",
    )(g)
    g = click.option(
        "--model-arg",
        "model_args",
        multiple=True,
        metavar="KEY=VALUE",
        help="Keyword argument for the model's factory or zoo, repeatable: num_classes=10, "
        "dataset=cifar10, threat=Linf (robustbench:), model_dir=DIR, cache_dir=DIR.",
    )(g)
    g = click.option(
        "--model",
        "model_spec",
        required=False,
        default=None,
        help="Built-in name (smallcnn, lenet, resnet20), pkg.module:factory, file.py:factory, "
        "timm:NAME, torchvision:NAME[:WEIGHTS], hf:ORG/NAME or robustbench:NAME.",
    )(g)
    return g


def parse_model_args(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``--model-arg num_classes=10 --model-arg threat=Linf`` -> {"num_classes": 10, ...}."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(
                f"--model-arg: expected KEY=VALUE such as num_classes=10, got {pair!r}"
            )
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word such as cifar10 or Linf
        out[key.strip().replace("-", "_")] = value
    return out


def _context_meta(key: str, default: Any) -> Any:
    ctx = click.get_current_context(silent=True)
    return default if ctx is None else ctx.meta.get(key, default)


def build_classifier(
    model_spec: str,
    weights,
    mean,
    std,
    bounds,
    device: torch.device,
    batch_size="auto",
    *,
    model_args: dict[str, Any] | None = None,
    download: bool | None = None,
    **classifier_kw,
):
    from ..models import Classifier
    from ..zoo import build, hub, resolve_weights

    if model_args is None:
        model_args = _context_meta("advx.model_args", {})
    if download is None:
        download = _context_meta("advx.download", False)
    recorded: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    given = {"mean": mean, "std": std, "bounds": bounds}  # what the user typed, not defaults
    if weights is not None:
        weights, info_ = resolve_weights(weights)
        recorded = info_ or {}
    if model_spec is None:
        if not recorded.get("spec"):
            raise InputError(
                "--model is required: a built-in name, pkg.module:factory, file.py:factory, "
                "timm:NAME, torchvision:NAME[:WEIGHTS], hf:ORG/NAME or robustbench:NAME "
                "(or --weights DIR of an advx training run that recorded its model)"
            )
        model_spec, kwargs = recorded["spec"], dict(recorded.get("kwargs") or {})
    kwargs.update(model_args or {})
    if mean is None and recorded.get("mean") is not None:
        mean = ",".join(str(v) for v in recorded["mean"])
    if std is None and recorded.get("std") is not None:
        std = ",".join(str(v) for v in recorded["std"])
    if bounds is None:
        bounds = ",".join(str(v) for v in recorded.get("bounds") or (0, 1))
    zoo = hub.is_zoo_spec(model_spec)
    obj = build(model_spec, weights=weights, download=bool(download), **kwargs)
    if isinstance(obj, Classifier) and zoo:
        obj.net.to(device).eval()  # built here from the zoo: moving it is fine
        prep = hub.preprocessing_of(obj.net)
        if prep is not None:
            info(f"{model_spec}: input space from {prep.source}: {_describe_space(prep)}")
        typed = {k: v for k, v in given.items() if v is not None}
        if not typed:
            obj.batch_size = batch_size
            for key, value in classifier_kw.items():
                if value:
                    setattr(obj, key, value)
            return obj
        # the user's --mean/--std/--bounds win over the config (said, since it is unusual)
        info(
            f"{model_spec}: {', '.join('--' + k for k in typed)} given: used instead of the config"
        )
        mean = given["mean"] or _join(obj.mean)
        std = given["std"] or _join(obj.std)
        bounds = given["bounds"] or _join(obj.bounds)
        obj = obj.net
    elif isinstance(obj, Classifier):
        for key, value in classifier_kw.items():
            if value:
                setattr(obj, key, value)
        return obj
    lo_hi = parse_floats(bounds, "bounds")
    if not lo_hi or len(lo_hi) != 2:
        raise InputError(f"--bounds: expected LOW,HIGH such as 0,1, got {bounds!r}")
    m, s = parse_floats(mean, "mean"), parse_floats(std, "std")
    if m is not None and s is not None and len(m) != len(s):
        raise InputError(
            f"--mean has {plural(len(m), 'value')} and --std {len(s)}: give one value per "
            "channel, as many for both (e.g. --mean 0.1307 --std 0.3081 for MNIST, or "
            "--mean 0.4914,0.4822,0.4465 --std 0.247,0.243,0.261 for CIFAR-10)"
        )
    net = obj.to(device).eval()  # our own freshly built module: moving it is fine
    return Classifier(
        net,
        bounds=(lo_hi[0], lo_hi[1]),
        mean=parse_floats(mean, "mean"),
        std=parse_floats(std, "std"),
        batch_size=batch_size,
        **classifier_kw,
    )


def _join(values) -> str | None:
    if values is None:
        return None
    vals = values.tolist() if hasattr(values, "tolist") else list(values)
    return ",".join(repr(float(v)) for v in vals)


def _describe_space(prep) -> str:
    parts = [f"bounds {prep.bounds[0]:g},{prep.bounds[1]:g}"]
    if prep.mean is not None:
        parts.append("mean " + ",".join(f"{v:g}" for v in prep.mean))
        parts.append("std " + ",".join(f"{v:g}" for v in (prep.std or ())))
    if prep.input_size is not None:
        parts.append("input " + "x".join(str(v) for v in prep.input_size))
    return ", ".join(parts)


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
        help="mnist-demo, an .npz with x and y, an idx file or folder, a folder of images "
        "(root/<class>/<files>), a CIFAR-10 cifar-10-batches-py folder, or a Hugging Face "
        "datasets folder (save_to_disk).",
        **default,
    )(f)
    return f


def stream_options(f):
    """--resize, --center-crop, --data-keys: how ``advx audit`` reads --data from disk."""
    f = click.option(
        "--data-keys",
        default=None,
        help="IMAGE,LABEL: the columns of a Hugging Face dataset that hold the images and the "
        "labels (default: image/img and label/labels).",
    )(f)
    f = click.option(
        "--center-crop",
        default=None,
        help="N or HxW: crop each image of a folder to its center (after --resize).",
    )(f)
    f = click.option(
        "--resize",
        default=None,
        help="N (the shorter side to N, keeping the aspect) or HxW: resize each image of a folder "
        "(needed when their sizes differ).",
    )(f)
    return f


def parse_size(text: str | None, name: str) -> int | tuple[int, int] | None:
    """``32`` -> 32, ``32x48`` -> (32, 48)."""
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes, default=0) < 1:
        raise InputError(f"--{name}: expected N or HxW such as 32 or 224x224, got {text!r}")
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


def open_source(data, *, split, n, resize, center_crop, data_keys, bounds):
    """The --data of a streaming command as a :class:`~advx.data.sources.Source`: read from disk
    (or from the file's 8-bit arrays) chunk by chunk, file names kept."""
    from ..data import as_source, open_dataset

    keys: tuple[str, ...] = ()
    if data_keys:
        keys = tuple(k.strip() for k in data_keys.split(","))
        if len(keys) != 2 or not all(keys):
            raise InputError(
                f"--data-keys: expected IMAGE,LABEL such as image,label, got {data_keys!r}"
            )
    ds = open_dataset(
        data,
        split=split,
        n=n,
        resize=parse_size(resize, "resize"),
        center_crop=parse_size(center_crop, "center-crop"),
        keys=keys,
    )
    return as_source(ds, bounds=bounds)


def check_channels(model, x: torch.Tensor) -> None:
    """--mean/--std against the data's channels, before any work (not a shape error mid-attack)."""
    for name in ("std", "mean"):  # std first: a mean given alone gets a std of ones, and back
        stat = getattr(model, name, None)
        if stat is None or x.dim() < 2 or stat.numel() in (1, x.shape[1]):
            continue
        raise InputError(
            f"--{name}: {plural(stat.numel(), 'value')} but the data has "
            f"{plural(x.shape[1], 'channel')} (dimension 1 of {tuple(x.shape)}): give one value "
            "per channel"
        )
    check_input_size(model, x)


def check_input_size(model, x: torch.Tensor) -> None:
    """A zoo model's config says what it was trained on: channels that differ are an error
    (it would fail mid-attack), a different height and width a warning (a CNN with global
    pooling runs, but its accuracy there is not the one published)."""
    from ..zoo import hub

    net = getattr(model, "net", None)
    prep = hub.preprocessing_of(net) if isinstance(net, torch.nn.Module) else None
    if prep is None or prep.input_size is None or x.dim() != 4:
        return
    c, h, w = prep.input_size
    if x.shape[1] != c:
        raise InputError(
            f"--data: the images have {plural(x.shape[1], 'channel')} but the model takes {c} "
            f"(its config: {prep.source})"
        )
    if tuple(x.shape[2:]) != (h, w):
        info(
            f"advx: warning: the images are {x.shape[2]}x{x.shape[3]} but the model was trained "
            f"at {h}x{w} (its config: {prep.source}); resize or crop them to {h}x{w}",
            always=True,
        )


def warn_threat(threat, bounds: tuple[float, float], x: torch.Tensor) -> None:
    """Warn when eps allows any input in the box: robust accuracy is then 0 by construction, and
    the usual cause is an eps on the 0..255 scale for images in [0, 1] (30 for 30/255)."""
    import math

    eps = threat.eps
    if not isinstance(eps, (int, float)) or math.isinf(eps) or x.dim() < 2:
        return
    width = float(bounds[1]) - float(bounds[0])
    d = x[0].numel()
    whole = {"linf": width, "l2": width * math.sqrt(d), "l1": width * d}.get(threat.norm)
    if whole is None or eps < whole:
        return
    hint = f"; did you mean {threat.norm}:{eps:g}/255?" if threat.norm == "linf" and eps > 1 else ""
    info(
        f"advx: warning: {threat.norm} eps {eps:g} covers the whole input box "
        f"[{bounds[0]:g}, {bounds[1]:g}] (any input is allowed, so robust accuracy is 0 by "
        f"construction){hint}",
        always=True,
    )


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
