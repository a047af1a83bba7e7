"""Models from the public zoos by name: ``timm:NAME``, ``torchvision:NAME[:WEIGHTS]``,
``hf:ORG/NAME`` and ``robustbench:NAME``.

Each zoo is an optional extra (``pip install 'advx[timm]'`` and so on) imported only when a spec
names it. The input space -- bounds, per-channel mean and std, input size -- is read from the
model's own configuration (timm's pretrained config, the torchvision weights' transforms, the
Hugging Face image processor's config, RobustBench's model entry), so the user types no
normalization: a wrong mean/std is the most common silent mistake in robustness evaluations.

Nothing is downloaded unless asked (``download=True``, ``--download``). Without it, weights come
from the zoo's own cache or a local folder, and a miss names the cache path that was searched and
how to fill it.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import re
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError

__all__ = [
    "ZOOS",
    "Preprocessing",
    "is_zoo_spec",
    "load",
    "save",
    "preprocessing_of",
    "suggest",
]

#: zoo prefix -> the extra that installs it
ZOOS: dict[str, str] = {
    "timm": "timm",
    "torchvision": "torchvision",
    "hf": "transformers",
    "robustbench": "robustbench",
}

# RobustBench's spellings of its data sets and threat models (its enums' values)
_RB_DATASETS = ("cifar10", "cifar100", "imagenet")
_RB_THREATS = ("Linf", "L2", "corruptions", "corruptions_3d")
_RB_SIZES = {"cifar10": 32, "cifar100": 32, "imagenet": 224}


@dataclass(frozen=True)
class Preprocessing:
    """The input space a zoo model expects, as its config declares it.

    ``bounds`` are the valid pixel values before normalization, ``mean``/``std`` the per-channel
    normalization the model's own pipeline applies after scaling, ``input_size`` (C, H, W) the
    size it was trained at (resize and crop your images to it), ``source`` where it was read.
    """

    bounds: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: tuple[int, int, int] | None = None
    source: str = ""


# what each zoo model was built with, keyed by the module (weakly: the model owns its lifetime)
_INFO: weakref.WeakKeyDictionary[nn.Module, Preprocessing] = weakref.WeakKeyDictionary()


def preprocessing_of(net: nn.Module) -> Preprocessing | None:
    """The :class:`Preprocessing` read from the config of a model built from a zoo, else None."""
    return _INFO.get(net)


def is_zoo_spec(spec: str) -> bool:
    prefix, sep, _ = str(spec).partition(":")
    return bool(sep) and prefix.lower() in ZOOS


def suggest(name: str, choices: Iterable[str], *, n: int = 5) -> str:
    """``"; did you mean a, b?"`` for the close names among ``choices``, or ``""``."""
    pool = list(dict.fromkeys(choices))
    close = difflib.get_close_matches(name, pool, n=n, cutoff=0.6)
    if not close:  # a prefix or a tag (resnet18 for resnet18.a1_in1k) is as good a hint
        close = [c for c in pool if c.lower().startswith(name.lower())][:n]
    return f"; did you mean {', '.join(close)}?" if close else ""


def _require(module: str, zoo: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install (torchvision built for CUDA torch)
        extra = ZOOS[zoo]
        raise InputError(
            f"model: {zoo}: models need the {extra} package, which cannot be imported here "
            f"({type(e).__name__}: {e}); install it with pip install 'advx[{extra}]'"
        ) from None


def load(
    spec: str,
    *,
    download: bool = False,
    weights: str | os.PathLike | None = None,
    **kwargs: Any,
):
    """A ready :class:`advx.Classifier` (eval mode, input space from the model's config) for a
    zoo spec. ``weights`` (a state dict file) replaces the zoo's pretrained weights; other
    keyword arguments go to the zoo (``dataset``, ``threat``, ``model_dir`` for RobustBench,
    ``cache_dir``, ``revision`` for Hugging Face, ``pretrained`` for timm) or to the model's
    constructor (``num_classes`` ...)."""
    from ..models import Classifier

    prefix, _, name = str(spec).partition(":")
    zoo = prefix.lower()
    if not name:
        raise InputError(f"model: {spec!r} names no model; e.g. {_EXAMPLES[zoo]}")
    loader = {
        "timm": _timm,
        "torchvision": _torchvision,
        "hf": _hf,
        "robustbench": _robustbench,
    }[zoo]
    net, prep = loader(name, download=bool(download), weights=weights, **kwargs)
    if weights is not None:
        from . import load_weights

        load_weights(net, weights)
    net.eval()  # attacks evaluate in eval mode (fit switches to training mode itself)
    _INFO[net] = prep
    return Classifier(net, bounds=prep.bounds, mean=prep.mean, std=prep.std)


_EXAMPLES = {
    "timm": "timm:resnet18.a1_in1k",
    "torchvision": "torchvision:resnet50:IMAGENET1K_V2",
    "hf": "hf:microsoft/resnet-50",
    "robustbench": "robustbench:Standard --model-arg dataset=cifar10 --model-arg threat=Linf",
}


def _floats(v: Any) -> tuple[float, ...] | None:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return (float(v),)
    return tuple(float(x) for x in v)


def _not_cached(what: str, searched: Path | str, fill: str) -> InputError:
    return InputError(
        f"model: {what} is not on this machine (searched {searched}) and nothing is downloaded "
        f"unless asked: {fill}"
    )


# ---- timm -------------------------------------------------------------------------------------


def timm_preprocessing(cfg: Mapping[str, Any], *, source: str) -> Preprocessing:
    """The input space from a timm data config or ``pretrained_cfg`` (``mean``, ``std``,
    ``input_size``; timm models take images scaled to [0, 1] and normalize them)."""
    size = cfg.get("test_input_size") or cfg.get("input_size")
    return Preprocessing(
        bounds=(0.0, 1.0),
        mean=_floats(cfg.get("mean")),
        std=_floats(cfg.get("std")),
        input_size=tuple(int(s) for s in size) if size else None,  # type: ignore[arg-type]
        source=source,
    )


def _weights_file(folder: Path) -> Path | None:
    for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if (folder / fname).is_file():
            return folder / fname
    return None


def _timm(name: str, *, download: bool, weights: Any, **kwargs: Any):
    local = name[len("local-dir:") :] if name.startswith("local-dir:") else name
    if Path(local).is_dir():
        return _timm_folder(name, Path(local), weights=weights, **kwargs)
    timm = _require("timm", "timm")
    known = set(timm.list_models()) | set(timm.list_models(pretrained=True))
    if name not in known and name.split(".")[0] not in known:
        raise InputError(f"model: timm has no model {name!r}{suggest(name, known)}")
    pretrained = kwargs.pop("pretrained", weights is None)
    overlay: dict[str, Any] = {}
    if pretrained and not download:
        overlay["file"] = str(_timm_cached(timm, name))
    net = timm.create_model(
        name,
        pretrained=bool(pretrained),
        **({"pretrained_cfg_overlay": overlay} if overlay else {}),
        **kwargs,
    )
    data_cfg = timm.data.resolve_data_config({}, model=net)
    return net, timm_preprocessing(data_cfg, source=f"timm pretrained_cfg of {name}")


def _advx_architecture(arch: str) -> bool:
    from . import BUILTIN

    return arch.lower() in BUILTIN or ":" in arch


def _timm_folder(name: str, folder: Path, *, weights: Any, **kwargs: Any):
    """A model in timm's hub layout (what ``timm.models.push_to_hf_hub`` writes, and
    :func:`save`): config.json (architecture, num_classes, model_args, pretrained_cfg) beside
    model.safetensors. The architecture is a timm model name, or an advx built-in name or
    ``pkg.module:factory`` spec (built by advx: timm is then not needed)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InputError(
            f"model: timm:{name}: the folder has no config.json (timm's hub layout: "
            "config.json with architecture and pretrained_cfg, and model.safetensors)"
        )
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise InputError(f"model: timm:{name}: {cfg_path} is not JSON ({e})") from None
    arch = config.get("architecture")
    if not isinstance(arch, str) or not arch:
        raise InputError(f"model: timm:{name}: {cfg_path} names no architecture")
    args = dict(config.get("model_args") or {})
    if _advx_architecture(arch):
        # advx's factories take what model_args records (num_classes is timm's own key)
        from ..models import Classifier
        from . import build

        args.update(kwargs)
        args.pop("pretrained", None)
        obj = build(arch, **args)
        net = obj.net if isinstance(obj, Classifier) else obj
        if not isinstance(net, nn.Module):
            raise InputError(f"model: timm:{name}: {arch} returned no nn.Module")
    else:
        timm = _require("timm", "timm")
        args.update({k: config[k] for k in ("num_classes", "in_chans") if k in config})
        args.update(kwargs)
        args.pop("pretrained", None)
        net = timm.create_model(arch, pretrained=False, **args)
    if weights is None:
        file = _weights_file(folder)
        if file is None:
            raise InputError(
                f"model: timm:{name}: no model.safetensors or pytorch_model.bin in {folder}"
            )
        from . import load_weights

        load_weights(net, file)
    return net, timm_preprocessing(config.get("pretrained_cfg") or {}, source=str(cfg_path))


def save(
    model: Any,
    folder: str | os.PathLike,
    *,
    architecture: str,
    model_args: Mapping[str, Any] | None = None,
    input_size: tuple[int, int, int] | None = None,
) -> Path:
    """Write ``model`` (an :class:`advx.Classifier`, whose mean and std are recorded) in timm's
    hub layout, so that ``timm:FOLDER`` loads it with its preprocessing: config.json
    (``architecture``: a timm name, an advx built-in or ``pkg.module:factory``; ``model_args``
    for it; ``pretrained_cfg`` with mean, std, input_size) and model.safetensors."""
    from ..models import Classifier

    if not isinstance(model, Classifier):
        raise InputError(
            "model: expected an advx.Classifier (it carries the mean and std to record)"
        )
    if model.bounds != (0.0, 1.0):
        raise InputError(
            f"model: timm's layout assumes inputs in [0, 1]; this model's bounds are {model.bounds}"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    pretrained_cfg: dict[str, Any] = {}
    if model.mean is not None and model.std is not None:
        pretrained_cfg["mean"] = [float(v) for v in model.mean.tolist()]
        pretrained_cfg["std"] = [float(v) for v in model.std.tolist()]
    if input_size is not None:
        pretrained_cfg["input_size"] = [int(v) for v in input_size]
    config: dict[str, Any] = {"architecture": architecture, "pretrained_cfg": pretrained_cfg}
    if model.num_classes is not None:
        config["num_classes"] = model.num_classes
    if model_args is None:
        from . import describe

        model_args = (describe(model.net) or {}).get("kwargs")
    if model_args:
        config["model_args"] = dict(model_args)
    try:
        from safetensors.torch import save_file
    except ImportError:  # the train extra is not installed: timm reads the .bin as well
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _timm_cached(timm: Any, name: str) -> Path:
    """Where timm's pretrained weights for ``name`` lie in the local caches (Hugging Face hub
    cache or torch hub's checkpoints); the not-cached error otherwise."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise InputError(
            f"model: timm:{name} has no pretrained weights; pass --model-arg pretrained=False "
            "and --weights FILE"
        )
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    if cfg.get("file") and Path(cfg["file"]).is_file():
        return Path(cfg["file"])
    searched: list[str] = []
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        try:
            from huggingface_hub import constants, try_to_load_from_cache
        except ImportError:
            pass
        else:
            for fname in ("model.safetensors", "pytorch_model.bin"):
                found = try_to_load_from_cache(hub_id, fname)
                if isinstance(found, str):
                    return Path(found)
            searched.append(
                str(Path(constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}")
            )
    if cfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg["url"])
        if path.is_file():
            return path
        searched.append(str(path))
    fill = "rerun with --download (download=True)"
    if hub_id:
        fill += f", or fetch it with `hf download {hub_id}`"
    raise _not_cached(
        f"timm:{name}'s pretrained weights",
        " and ".join(searched) or "timm's caches",
        fill + ", or pass --weights FILE",
    )


# ---- torchvision ------------------------------------------------------------------------------


def torchvision_preprocessing(weights: Any, *, source: str) -> Preprocessing:
    """The input space from torchvision weights: their ``transforms()`` (mean, std, crop size;
    torchvision's classification transforms scale images to [0, 1] first)."""
    t = weights.transforms()
    crop = getattr(t, "crop_size", None)
    side = int(crop[0] if isinstance(crop, (list, tuple)) else crop) if crop else None
    mean = _floats(getattr(t, "mean", None))
    return Preprocessing(
        bounds=(0.0, 1.0),
        mean=mean,
        std=_floats(getattr(t, "std", None)),
        input_size=(len(mean) if mean else 3, side, side) if side else None,
        source=source,
    )


def _torchvision(name: str, *, download: bool, weights: Any, **kwargs: Any):
    arch, _, wname = name.partition(":")
    tv = _require("torchvision", "torchvision")
    models = tv.models
    available = models.list_models()
    if arch not in available:
        raise InputError(f"model: torchvision has no model {arch!r}{suggest(arch, available)}")
    if not wname:  # an architecture only: random weights, for --weights or a factory's own
        net = models.get_model(arch, weights=None, **kwargs)
        return net, Preprocessing(source=f"torchvision:{arch} (no weights named: no preprocessing)")
    enum = models.get_model_weights(arch)
    names = [w.name for w in enum] + ["DEFAULT"]
    if wname not in names:
        raise InputError(
            f"model: torchvision {arch} has no weights {wname!r}{suggest(wname, names)} "
            f"(available: {', '.join(names)})"
        )
    w = enum[wname] if wname != "DEFAULT" else enum.DEFAULT
    prep = torchvision_preprocessing(w, source=f"torchvision {type(w).__name__}.{w.name}")
    if weights is not None:  # the user's own weights into the architecture; transforms from w
        return models.get_model(arch, weights=None, **kwargs), prep
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    if not cached.is_file() and not download:
        raise _not_cached(
            f"torchvision:{arch}:{w.name}",
            cached,
            "rerun with --download (download=True), or put the file from "
            f"{w.url} there (TORCH_HOME moves the cache)",
        )
    return models.get_model(arch, weights=w, **kwargs), prep


# ---- Hugging Face -----------------------------------------------------------------------------


def hf_preprocessing(cfg: Mapping[str, Any], *, channels: int = 3, source: str) -> Preprocessing:
    """The input space from a Hugging Face image processor config (``preprocessor_config.json``):
    rescaled by ``rescale_factor`` (1/255: pixels in [0, 1]) unless ``do_rescale`` is false
    (pixels in [0, 255]), then normalized by ``image_mean``/``image_std`` if ``do_normalize``."""
    rescale = cfg.get("do_rescale", True)
    factor = float(cfg.get("rescale_factor", 1 / 255)) if rescale else 1.0
    high = 255.0 * factor if rescale else 255.0
    mean = std = None
    if cfg.get("do_normalize", True) and cfg.get("image_mean") is not None:
        mean, std = _floats(cfg.get("image_mean")), _floats(cfg.get("image_std"))
    size = cfg.get("crop_size") if cfg.get("do_center_crop") else cfg.get("size")
    hw: tuple[int, int] | None = None
    if isinstance(size, Mapping):
        if "height" in size and "width" in size:
            hw = (int(size["height"]), int(size["width"]))
        elif "shortest_edge" in size:
            hw = (int(size["shortest_edge"]),) * 2
    elif isinstance(size, int):
        hw = (size, size)
    return Preprocessing(
        bounds=(0.0, round(high, 6)),
        mean=mean,
        std=std,
        input_size=(channels, *hw) if hw else None,
        source=source,
    )


def _hf(name: str, *, download: bool, weights: Any, **kwargs: Any):
    transformers = _require("transformers", "hf")
    opts = {k: kwargs.pop(k) for k in ("cache_dir", "revision") if k in kwargs}
    local = Path(name).is_dir()
    try:
        from transformers.image_processing_utils import ImageProcessingMixin

        cfg, _ = ImageProcessingMixin.get_image_processor_dict(
            name, local_files_only=not download, **opts
        )
        net = transformers.AutoModelForImageClassification.from_pretrained(
            name, local_files_only=not download, **opts, **kwargs
        )
    except OSError as e:
        if local:
            raise InputError(
                f"model: hf:{name}: the folder does not hold a model saved with save_pretrained "
                f"and its image processor ({e})"
            ) from None
        if download:
            raise InputError(f"model: hf:{name}: cannot download it ({e})") from None
        from huggingface_hub import constants

        cache = Path(opts.get("cache_dir") or constants.HF_HUB_CACHE)
        searched = cache / f"models--{name.replace('/', '--')}"
        cached = [p.name[len("models--") :].replace("--", "/") for p in cache.glob("models--*")]
        hint = suggest(name, cached)
        raise _not_cached(
            f"hf:{name}",
            searched,
            f"rerun with --download (download=True), or fetch it with `hf download {name}` "
            f"(HF_HOME moves the cache){hint}",
        ) from None
    channels = int(getattr(net.config, "num_channels", 3) or 3)
    return net, hf_preprocessing(cfg, channels=channels, source=f"image processor config of {name}")


# ---- RobustBench ------------------------------------------------------------------------------


def _rb_choice(value: Any, options: tuple[str, ...], what: str) -> str:
    by_lower = {o.lower(): o for o in options}
    got = by_lower.get(str(value).lower())
    if got is None:
        raise InputError(
            f"--model-arg {what}: RobustBench has no {what} {value!r}; use one of "
            f"{', '.join(options)}{suggest(str(value), options)}"
        )
    return got


def robustbench_preprocessing(entry: Mapping[str, Any], dataset: str, name: str) -> Preprocessing:
    """RobustBench models take images in [0, 1] and normalize inside the model; the input size
    is the data set's, or the crop its ImageNet entry names (``Res256Crop224``)."""
    side = _RB_SIZES[dataset]
    m = re.search(r"Crop(\d+)", str(entry.get("preprocessing") or ""))
    if m:
        side = int(m.group(1))
    return Preprocessing(
        bounds=(0.0, 1.0), input_size=(3, side, side), source=f"RobustBench {dataset} {name}"
    )


def _robustbench(name: str, *, download: bool, weights: Any, **kwargs: Any):
    dataset = _rb_choice(kwargs.pop("dataset", "cifar10"), _RB_DATASETS, "dataset")
    threat = _rb_choice(kwargs.pop("threat", "Linf"), _RB_THREATS, "threat")
    # RobustBench's own default folder and layout: ./models/<dataset>/<threat>/<name>.pt
    model_dir = Path(kwargs.pop("model_dir", "models"))
    if kwargs:
        raise InputError(
            f"--model-arg: RobustBench takes dataset, threat and model_dir, not {', '.join(kwargs)}"
        )
    path = model_dir / dataset / threat / f"{name}.pt"
    try:
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    except Exception:  # not installed: say where the weights would be first, then the extra
        model_dicts = None
    missing = weights is None and not path.is_file() and not download
    not_cached = _not_cached(
        f"robustbench:{name} ({dataset}, {threat})",
        path.resolve(),
        "rerun with --download (download=True), or put the checkpoint there "
        "(--model-arg model_dir=DIR to search another folder)",
    )
    if model_dicts is None:
        if missing:
            raise not_cached
        _require("robustbench", "robustbench")
    entries = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)]
    if name not in entries:
        raise InputError(
            f"model: RobustBench has no {dataset} {threat} model {name!r}{suggest(name, entries)}"
        )
    if missing:
        raise not_cached
    entry = entries[name]
    prep = robustbench_preprocessing(entry, dataset, name)
    if weights is None and not path.is_file():
        from robustbench.utils import load_model

        net = load_model(
            model_name=name, model_dir=str(model_dir), dataset=dataset, threat_model=threat
        )
        return net, prep
    net = entry["model"]()
    if weights is None:
        from . import load_weights

        load_weights(net, path)
    return net, prep
