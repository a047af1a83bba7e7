"""Building and loading models: built-in architectures, ``pkg.module:factory`` specs, models
from the zoos by name (``timm:``, ``torchvision:``, ``hf:``, ``robustbench:``, see
:mod:`advx.zoo.hub`) and weights.

Only ``torch.load(..., weights_only=True)`` and safetensors are used to read weights: advx never
unpickles arbitrary objects.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import import_object
from ..errors import InputError
from . import hub, nets

__all__ = [
    "build",
    "load",
    "load_weights",
    "resolve_weights",
    "describe",
    "BUILTIN",
    "nets",
    "hub",
]

BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "smallcnn": nets.smallcnn,
    "lenet": nets.lenet,
    "resnet20": nets.resnet20,
    "wong_cnn": nets.wong_cnn,
}


_BUILTIN_CLASSES: dict[str, type[nn.Module]] = {
    "smallcnn": nets.SmallCNN,
    "lenet": nets.LeNet,
    "resnet20": nets.ResNet20,
    "wong_cnn": nets.WongCNN,
}


_FORMS = (
    "a built-in name ({builtin}), pkg.module:factory, path/to/file.py:factory, timm:NAME, "
    "torchvision:NAME[:WEIGHTS], hf:ORG/NAME or robustbench:NAME"
)


def _factory(spec: str) -> Callable[..., Any]:
    if spec.lower() in BUILTIN:
        return BUILTIN[spec.lower()]
    if ":" not in spec:
        raise InputError(
            f"model: expected {_FORMS.format(builtin=', '.join(BUILTIN))}, got {spec!r}"
            + hub.suggest(spec.lower(), BUILTIN)
        )
    try:
        return import_object(spec, name="model")
    except InputError as e:
        prefix, _, rest = spec.partition(":")
        near = difflib.get_close_matches(prefix.lower(), hub.ZOOS, n=1, cutoff=0.6)
        if near and "." not in prefix:  # tim:resnet18 is a misspelt zoo, not a module
            raise InputError(
                f"model: no zoo or module {prefix!r}; did you mean {near[0]}:{rest}?"
            ) from None
        raise e from None


def build(
    spec: str,
    *,
    weights: str | os.PathLike | None = None,
    download: bool = False,
    **kwargs: Any,
):
    """Call the factory named by ``spec`` and load ``weights`` into what it returns; the model
    comes back in eval mode (attacks evaluate in eval mode).

    The factory may return an ``nn.Module`` or an :class:`advx.Classifier` (to declare
    bounds and normalization together with the architecture). A zoo spec (``timm:NAME``,
    ``torchvision:NAME[:WEIGHTS]``, ``hf:ORG/NAME``, ``robustbench:NAME``) gives an
    :class:`advx.Classifier` whose bounds, mean and std come from the model's own config;
    ``download=True`` lets it fetch weights that are not cached (nothing is downloaded
    otherwise). ``kwargs`` go to the factory (or the zoo, see :func:`advx.zoo.hub.load`).
    """
    from ..models import Classifier

    if hub.is_zoo_spec(spec):
        return hub.load(spec, download=download, weights=weights, **kwargs)
    if download:
        kwargs["download"] = download  # a factory of the user's own may take it
    obj = _factory(spec)(**kwargs)
    net = obj.net if isinstance(obj, Classifier) else obj
    if not isinstance(net, nn.Module):
        raise InputError(
            f"model: {spec} returned a {type(obj).__name__}, "
            "expected an nn.Module or an advx.Classifier"
        )
    if weights is not None:
        load_weights(net, weights)
    net.eval()
    return obj


def describe(net: nn.Module) -> dict[str, Any] | None:
    """How to rebuild ``net`` (``{"spec": name, "kwargs": {...}}``) when it is one of the
    built-in architectures; None for any other module (pass ``model_spec=`` to ``fit`` then)."""
    for name, cls in _BUILTIN_CLASSES.items():
        if type(net) is cls:
            config: dict[str, Any] = net.config  # type: ignore[assignment]
            return {"spec": name, "kwargs": dict(config)}
    return None


def load(
    path: str | os.PathLike,
    *,
    model: str | nn.Module | None = None,
    device: str | torch.device = "cpu",
):
    """A ready :class:`advx.Classifier` from an advx training checkpoint.

    ``path`` is a checkpoint folder (``fit(..., out=DIR)`` or ``advx train --out DIR``), its
    ``checkpoint.json`` or a ``.safetensors`` file written there. The architecture is rebuilt from
    the model spec the checkpoint records (or from ``model``: a spec or an ``nn.Module`` to load
    into), the weights are loaded strictly -- a checkpoint of another architecture is refused,
    naming the keys that differ -- and the Classifier gets the recorded bounds and normalization.
    """
    from .._checkpoint import read_sidecar
    from ..models import Classifier

    meta, weights = read_sidecar(path)
    info = meta.get("model") or {}
    ours = not isinstance(
        model, nn.Module
    )  # a module we build ourselves may be moved; the caller's is not
    if model is None:
        if not info.get("spec"):
            raise InputError(
                f"load: {path} was trained from a {info.get('class', 'model')} that advx cannot "
                "rebuild (no model spec recorded); pass model= (a spec such as 'lenet' or "
                "the nn.Module to load into)"
            )
        obj = build(info["spec"], **(info.get("kwargs") or {}))
    elif isinstance(model, str):
        obj = build(model)
    else:
        obj = model
    if isinstance(obj, Classifier):
        load_weights(obj.net, weights)
        if ours:
            obj.net.to(device).eval()
        return obj
    if not isinstance(obj, nn.Module):
        raise InputError(f"load: model must be a spec or an nn.Module, got {type(obj).__name__}")
    load_weights(obj, weights)
    net = obj.to(device).eval() if ours else obj
    return Classifier(
        net,
        bounds=tuple(info.get("bounds") or (0.0, 1.0)),
        mean=info.get("mean"),
        std=info.get("std"),
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise InputError(
                "weights: reading .safetensors needs the safetensors package: "
                "pip install safetensors"
            ) from None
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(
            f"weights: cannot read {path} as a state dict ({type(e).__name__}: {e})"
        ) from None
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(
            f"weights: {path} does not hold a state dict (a mapping of names to tensors)"
        )
    # checkpoints saved from DataParallel/DDP prefix every key with "module."
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def resolve_weights(path: str | os.PathLike) -> tuple[Path, dict[str, Any] | None]:
    """(the weights file, the model the checkpoint records or None) for a weights file, or for
    what ``advx train --out DIR`` / ``fit(..., out=DIR)`` writes: the folder, its
    ``checkpoint.json`` or the ``.safetensors`` beside it (the sidecar's sha256 checked)."""
    from .._checkpoint import SIDECAR, read_sidecar

    path = Path(path)
    if not path.exists():
        raise InputError(f"weights: no file or folder {path}")
    sidecar = path.is_dir() or path.suffix == ".json"
    if path.suffix == ".safetensors" and (path.parent / SIDECAR).exists():
        sidecar = True
    if not sidecar:
        return path, None
    meta, weights = read_sidecar(path)
    return weights, dict(meta.get("model") or {})


def load_weights(net: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state dict into ``net`` strictly; a mismatch names the keys that differ. ``path``
    is a weights file or an advx training checkpoint (its folder or its ``checkpoint.json``)."""
    path, _ = resolve_weights(path)
    state = _read_state(path)
    own = net.state_dict()
    # checkpoints from before PyTorch 0.4.1 lack batch norm's bookkeeping counter: not a mismatch
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(
                "shape mismatch "
                + ", ".join(
                    f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:5]
                )
            )
        raise InputError(
            f"weights: {path.name} does not fit {type(net).__name__}: " + "; ".join(parts)
        )
    net.load_state_dict(state, strict=False)
    return net
