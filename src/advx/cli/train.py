"""``advx train``: harden a model with a training recipe, then audit it.

Under ``torchrun --nproc_per_node=K -m advx train ...`` the K processes train one model with
DistributedDataParallel (gloo on CPU, nccl on GPU), rank 0 writes the checkpoints, and the
closing audit is split across the processes as ``advx audit`` does.
"""

from __future__ import annotations

from typing import Any

import click
import torch

from ..errors import InputError
from . import cli
from ._common import (
    build_classifier,
    data_option,
    emit_json,
    info,
    model_options,
    parse_params,
    recipe_callback,
)

_AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@cli.command("train")
@model_options
@data_option
@click.option(
    "--recipe",
    default="standard",
    show_default=True,
    callback=recipe_callback,
    help="standard, fgsm-rs, pgd-at, trades or distillation (fgsm_rs and pgd_at too).",
)
@click.option(
    "--threat",
    "threat_spec",
    default="linf:0.3",
    show_default=True,
    help="NORM:EPS the recipe trains against and the audit measures, e.g. linf:0.3.",
)
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Recipe parameter, repeatable: alpha (fgsm-rs), steps, step_size (pgd-at, trades), "
    "beta (trades).",
)
@click.option(
    "--teacher",
    type=click.Path(),
    default=None,
    help="distillation: the teacher's checkpoint (folder or file).",
)
@click.option(
    "--temperature",
    type=float,
    default=None,
    help="Softmax temperature: distillation (default 100), or standard training of a teacher "
    "(default 1).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Global batch size.",
)
@click.option(
    "--lr",
    type=float,
    default=1e-3,
    show_default=True,
    help="Learning rate (the peak for --lr-schedule cyclic).",
)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option(
    "--lr-schedule",
    type=click.Choice(["constant", "cyclic", "multistep"]),
    default="constant",
    show_default=True,
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Initial weights, data order and random starts.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    required=True,
    help="Folder for checkpoints and the audit report.",
)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out.")
@click.option(
    "--augment",
    type=click.Choice(["none", "crop-flip"]),
    default="none",
    show_default=True,
    help="crop-flip: random crop with 4 pixels of padding and horizontal flip, per batch on the "
    "device (the CIFAR-10 recipe).",
)
@click.option(
    "--monitor",
    default="auto",
    show_default=True,
    help="Training samples held out to watch each epoch (clean and PGD accuracy): auto, none "
    "or a number.",
)
@click.option(
    "--audit-n",
    type=click.IntRange(min=0),
    default=200,
    show_default=True,
    help="Held-out samples for the closing audit (0: no audit).",
)
@click.option(
    "--no-audit",
    is_flag=True,
    help="Train only: skip the closing audit (it takes minutes; same as --audit-n 0).",
)
@click.option(
    "--audit-suite",
    default="fast",
    show_default=True,
    help="Suite of the closing audit: fast, standard or a TOML file.",
)
@click.option(
    "--audit-data",
    default=None,
    help="Held-out data for the audit (default: the test split of mnist-demo or of an idx folder).",
)
@click.option(
    "--eps-curve",
    default="auto",
    show_default=True,
    help="The audit's eps curve: auto, runs, min-norm, none or eps values.",
)
@click.option(
    "--autocast",
    type=click.Choice(list(_AUTOCAST)),
    default="none",
    show_default=True,
    help="Mixed precision.",
)
@click.option("--compile", "compile_", is_flag=True, help="Run the model through torch.compile.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
def train_command(
    model_spec,
    weights,
    mean,
    std,
    bounds,
    data,
    split,
    n,
    recipe,
    threat_spec,
    params,
    teacher,
    temperature,
    epochs,
    batch_size,
    lr,
    optimizer,
    weight_decay,
    lr_schedule,
    seed,
    out,
    resume,
    augment,
    monitor,
    audit_n,
    no_audit,
    audit_suite,
    audit_data,
    eps_curve,
    autocast,
    compile_,
    device,
) -> None:
    """Train a model with a recipe (standard, fgsm-rs, pgd-at, trades, distillation), save a
    checkpoint and training-curve.png after every epoch, then audit it on held-out data
    (report.json and report.html in --out; --no-audit skips it). A JSON summary goes to stdout.

    --data may also name a factory, pkg.module:make or path/to/file.py:make, returning a
    torch Dataset or DataLoader of (image, label) pairs: training then streams it (the audit
    needs --audit-data)."""
    from pathlib import Path

    from .. import audit as run_audit
    from .._checkpoint import require_safetensors
    from ..audit import load_suite
    from ..data import load
    from ..threat import parse_threat
    from ..training import Checkpointing, Monitor, Precision, Schedule, fit
    from ..training.distributed import init_from_env, local_device
    from ._common import pick_device
    from .audit import _curve

    require_safetensors()
    if no_audit:
        audit_n = 0
    group = init_from_env(device)
    try:
        dev = pick_device(device) if group.world == 1 or device != "auto" else local_device(device)
        threat = parse_threat(threat_spec)
        the_recipe = _build_recipe(recipe, threat, parse_params(params), teacher, temperature, dev)
        curve = _curve(eps_curve)
        if audit_n:
            load_suite(audit_suite, threat)  # a bad suite fails now, not after the training
        mon = _monitor(monitor)
        # the settings are checked now, not after the model and the data are loaded
        schedule = Schedule(
            epochs=epochs,
            lr=lr,
            optimizer=optimizer,
            weight_decay=weight_decay,
            lr_schedule=lr_schedule,
        )
        precision = Precision(autocast=_AUTOCAST[autocast], compile=compile_)

        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)  # the initial weights come from --seed too
            model = build_classifier(model_spec, weights, mean, std, bounds, dev)
        stream = _data_factory(data, split, n)
        x: Any
        y: Any = None
        if stream is not None:
            x, size = stream, _size(stream)
        else:
            x, y = load(data, split=split or "train", n=n)
            size = f"{len(x):,} samples"
        xa = ya = None
        if audit_n:
            if stream is not None and audit_data is None:
                raise InputError(
                    "--audit-data: a --data factory has no held-out split; name the audit's "
                    "data, or pass --no-audit"
                )
            xa, ya, x, y = _audit_data(data, audit_data, audit_n, x, y)
        out_path = Path(out)
        if group.main:
            info(
                f"training {model_spec} with {the_recipe.name} on {size} "
                f"for {epochs} epoch(s)"
                + (f" in {group.world} processes" if group.world > 1 else "")
                + (
                    f", then auditing it on {audit_n} held-out samples (--no-audit skips that)"
                    if audit_n
                    else ""
                )
            )
        history = fit(
            model,
            x,
            y,
            loss=the_recipe,
            schedule=schedule,
            batch_size=batch_size,
            seed=seed,
            precision=precision,
            monitor=Monitor(data=mon),
            checkpoint=Checkpointing(
                out_path,
                resume=resume,
                model_spec=_spec_with_args(model_spec),
                data_name=_data_name(data, split, n),
            ),
            augment=None if augment == "none" else augment,
            desc="train",
        )
        if history.stopped and group.main:
            info(f"training stopped early: {history.stopped}")
        if group.main and history.checkpoint:
            png = out_path / "training-curve.png"
            info(f"wrote {history.checkpoint}" + (f", {png}" if png.exists() else ""))
        report = None
        if xa is not None and ya is not None:  # audit_n > 0
            if group.main:
                info(
                    f"auditing the trained model on {len(xa)} held-out samples with the "
                    f"{audit_suite!r} suite at {threat_spec} -- this can take minutes "
                    "(--no-audit or --audit-n 0 skips it; advx audit --weights "
                    f"{out_path} --data {audit_data or data} --threat {threat_spec} runs it "
                    "later)"
                )
            report = run_audit(
                model,
                xa.to(dev),
                ya.to(dev),
                threat,
                suite=audit_suite,
                seed=seed,
                eps_curve=curve,
                meta={
                    "model": model_spec,
                    "data": f"{audit_data or data} (held out)",
                    "checkpoint": history.checkpoint,
                },
            )
    finally:
        if group.world > 1:
            torch.distributed.destroy_process_group()
    if not group.main:
        return
    summary = {
        "out": str(out_path),
        "checkpoint": history.checkpoint,
        "recipe": the_recipe.to_dict(),
        "history": history.to_dict(),
    }
    if report is not None:
        report.save(out_path / "report.json")
        files = [str(out_path / "report.json")]
        from ..viz import have_matplotlib

        if have_matplotlib():
            report.save_html(out_path / "report.html")
            files.append(str(out_path / "report.html"))
        else:
            info("matplotlib is not installed: no report.html (pip install 'advx[report]')")
        for line in report.summary_lines():
            info(line)
        info(f"wrote {', '.join(files)}")
        summary["audit"] = {
            "clean_accuracy": report.clean_accuracy,
            "robust_accuracy": report.robust_accuracy,
            "reliable": report.reliable,
            "findings": [f.code for f in report.findings],
            "files": files,
        }
    emit_json(summary)


def _build_recipe(name: str, threat, params: dict, teacher, temperature, device):
    from ..training import losses

    def no_extra(allowed: tuple[str, ...]) -> None:
        extra = sorted(set(params) - set(allowed))
        if extra:
            raise InputError(
                f"--param: {name} takes {', '.join(allowed) or 'no parameters'}, "
                f"not {', '.join(extra)}"
            )

    if name != "distillation" and teacher is not None:
        raise InputError("--teacher: only the distillation recipe takes a teacher")
    if name in ("fgsm-rs", "pgd-at", "trades") and temperature is not None:
        raise InputError(f"--temperature: {name} has no temperature")
    if name == "standard":
        no_extra(())
        return losses.standard(1.0 if temperature is None else temperature)
    if name == "distillation":
        no_extra(())
        if teacher is None:
            raise InputError(
                "--teacher: the distillation recipe needs the teacher's checkpoint (advx train "
                "--out DIR of a model trained with --recipe standard --temperature T)"
            )
        from ..zoo import load as load_checkpoint

        return losses.distillation(
            load_checkpoint(teacher, device=device), 100.0 if temperature is None else temperature
        )
    allowed = {
        "fgsm-rs": ("alpha",),
        "pgd-at": ("steps", "step_size"),
        "trades": ("beta", "steps", "step_size"),
    }[name]
    no_extra(allowed)
    return losses.RECIPES[name](threat, **params)


def _data_factory(data: str, split, n):
    """The Dataset or DataLoader a ``pkg.module:make`` / ``file.py:make`` --data names, or None
    when --data is data advx reads itself."""
    from pathlib import Path

    from torch.utils.data import DataLoader, Dataset

    from .._io import import_object

    head, sep, attr = data.partition(":")
    if not sep or not attr or Path(data).exists() or not (head.endswith(".py") or "." in head):
        return None
    if "/" in head and not head.endswith(".py"):
        return None  # a path with a colon in it, not a factory
    obj = import_object(data, name="--data")
    made = obj() if callable(obj) and not isinstance(obj, (Dataset, DataLoader)) else obj
    if not isinstance(made, (Dataset, DataLoader)):
        raise InputError(
            f"--data: {data} gave a {type(made).__name__}; a factory must return a "
            "torch.utils.data.Dataset or DataLoader of (image, label) pairs"
        )
    if split is not None or n is not None:
        raise InputError(
            "--split/-n: a --data factory returns the data to train on as it is; choose the "
            "split and the samples inside it"
        )
    return made


def _size(data) -> str:
    from torch.utils.data import DataLoader

    inner: Any = data.dataset if isinstance(data, DataLoader) else data
    try:
        count = f"{len(inner):,} samples"
    except TypeError:
        count = "samples"
    return f"{count} ({type(data).__name__})"


def _monitor(text: str):
    s = text.strip().lower()
    if s == "auto":
        return "auto"
    if s in ("none", "0", "off"):
        return None
    try:
        return int(s)
    except ValueError:
        raise InputError(
            f"--monitor: expected auto, none or a number of samples, got {text!r}"
        ) from None


def _audit_data(data: str, audit_data: str | None, k: int, x, y):
    """(audit x, audit y, training x, training y): the test split when there is one, else the
    last k training samples, held out of training."""
    from pathlib import Path

    from ..data import load

    if audit_data is not None:
        xa, ya = load(audit_data, split="test" if Path(audit_data).is_dir() else None, n=k)
        return xa, ya, x, y
    if data.lower() == "mnist-demo" or (Path(data).is_dir() and _has_idx_test(Path(data))):
        xa, ya = load(data, split="test", n=k)
        return xa, ya, x, y
    if k >= len(x):
        raise InputError(
            f"--audit-n: {k} held-out samples would leave none to train on ({len(x)} in all); "
            "lower it or pass --audit-data"
        )
    info(
        f"holding out the last {k} samples of {data} for the audit "
        "(pass --audit-data to audit other data)"
    )
    return x[-k:], y[-k:], x[:-k], y[:-k]


def _has_idx_test(folder) -> bool:
    return any(
        (folder / f"t10k{s}").exists()
        for s in ("-images-idx3-ubyte.gz", "-images-idx3-ubyte", "-images.idx3-ubyte")
    )


def _data_name(data: str, split, n) -> str:
    return str(data) + f":{split or 'train'}" + (f"[:{n}]" if n else "")


def _spec_with_args(model_spec: str | None):
    """The spec the checkpoint records: with the --model-arg values, so that advx.zoo.load
    rebuilds the same architecture."""
    args = click.get_current_context().meta.get("advx.model_args") or {}
    if model_spec is None or not args:
        return model_spec
    return {"spec": model_spec, "kwargs": dict(args)}
