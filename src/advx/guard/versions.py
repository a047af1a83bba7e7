"""A versioned model directory: every model the guard has served, and which one it serves now.

::

    models/
      current            "v0002": the version served (one line, replaced atomically)
      v0001/             checkpoint.json + model-*.safetensors (advx's checkpoint format),
                         policy.toml (the guard's calibrated policy for these weights),
                         meta.json (provenance: parent, data sha256, audit figures, why)
      v0002/

A version is written whole into a hidden temporary folder and renamed into place, so a reader
never sees half a version; version folders are never changed afterwards. :meth:`ModelDir.promote`
loads a version completely (weights checked against their sha256, the architecture rebuilt
strictly, the policy bound to the weights' fingerprint, one forward pass) before it switches the
``current`` pointer, so a version that cannot be loaded is never made current. The pointer is a
small file written to a temporary name, fsynced and renamed over the old one (``os.replace``):
readers see the old version or the new one, never neither.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import fsync_dir, write_bytes, write_json
from .._provenance import now, versions
from ..errors import InputError
from .guard import Guard
from .policy import Policy

__all__ = ["ModelDir", "ModelVersion", "VersionError", "META_SCHEMA"]

log = logging.getLogger(__name__)

META_SCHEMA = "advx-model-version/1"
POINTER = "current"
_NAME = re.compile(r"v(\d{4,})")


class VersionError(InputError):
    """A version that cannot be loaded (missing, damaged or inconsistent); the message says why."""


@dataclass
class ModelVersion:
    """One loaded version: its ``model`` (an :class:`advx.Classifier`), the ``policy``
    calibrated for it, and its ``meta`` (provenance)."""

    name: str
    path: Path
    model: Any
    policy: Policy
    meta: dict[str, Any] = field(default_factory=dict)

    def guard(self, *, fallback: Any = None, **kw: Any) -> Guard:
        """The guard this version describes; its decisions carry the version's name."""
        kw.setdefault("version", self.name)
        return Guard.from_policy(self.model, self.policy, fallback=fallback, **kw)


class ModelDir:
    """The versions under ``root`` and the pointer to the one served (see the module docs)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"model dir: {self.root} is a file; give a folder")

    def __repr__(self) -> str:
        return f"ModelDir({str(self.root)!r}, current={self.current()!r})"

    # ---- reading ----------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """The versions written, oldest first (``["v0001", "v0002"]``)."""
        if not self.root.is_dir():
            return []
        names = [p.name for p in self.root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
        return sorted(names, key=lambda n: int(n[1:]))

    def current(self) -> str | None:
        """The version served now, or ``None`` before the first promotion."""
        try:
            text = (self.root / POINTER).read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise InputError(f"model dir: cannot read {self.root / POINTER} ({e})") from None
        if not _NAME.fullmatch(text):
            raise InputError(
                f"model dir: {self.root / POINTER} holds {text[:40]!r}, not a version name such "
                "as v0001; promote a version to repair it"
            )
        return text

    def path(self, version: str) -> Path:
        """The folder of ``version`` (checked to be a version's name)."""
        if not isinstance(version, str) or not _NAME.fullmatch(version):
            raise InputError(f"version: expected a name such as v0001, got {version!r}")
        return self.root / version

    def meta(self, version: str) -> dict[str, Any]:
        """A version's provenance (its ``meta.json``)."""
        path = self.path(version) / "meta.json"
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            known = ", ".join(self.versions()) or "none"
            raise VersionError(
                f"model dir: no version {version} in {self.root} (versions: {known})"
            ) from None
        except (OSError, json.JSONDecodeError) as e:
            raise VersionError(f"model dir: {version}'s meta.json cannot be read ({e})") from None
        if not isinstance(meta, dict) or meta.get("schema") != META_SCHEMA:
            raise VersionError(f"model dir: {path} is not a version's meta ({META_SCHEMA})")
        return meta

    def load(
        self, version: str | None = None, *, device: str | torch.device = "cpu"
    ) -> ModelVersion:
        """Load ``version`` (default: the current one) completely, or raise
        :class:`VersionError` saying why it cannot be served."""
        from ..zoo import load as load_checkpoint

        if version is None:
            version = self.current()
            if version is None:
                raise InputError(
                    f"model dir: {self.root} has no current version; create the first with "
                    "`advx guard init --model-dir DIR --model SPEC --data HELDOUT`"
                )
        meta = self.meta(version)
        folder = self.path(version)
        try:
            model = load_checkpoint(folder, device=device)
            policy = Policy.load(folder / "policy.toml")
            fp = model.fingerprint()
            if meta.get("model_fingerprint") not in (None, fp):
                raise InputError(
                    f"the weights' fingerprint {fp[:12]} is not the one recorded when the "
                    f"version was made ({str(meta['model_fingerprint'])[:12]})"
                )
            loaded = ModelVersion(version, folder, model, policy, meta)
            guard = loaded.guard()  # refuses a policy calibrated for other weights
            shape = policy.calibration.get("input_shape") or guard.input_shape
            if shape:
                # one pass: weights that load but cannot run must not be served either
                lo, hi = guard.bounds
                x = torch.full((1, *[int(s) for s in shape]), (lo + hi) / 2)
                with torch.no_grad():
                    out = guard.model.scores(x.to(getattr(guard.model, "device", "cpu")))
                if out.dim() != 2 or not torch.isfinite(out).all():
                    raise InputError(
                        f"the model answered {list(out.shape)} (or non-finite scores) on one "
                        "input; expected finite (1, classes)"
                    )
        except VersionError:
            raise
        except Exception as e:  # any failure means: this version is not servable
            raise VersionError(f"model dir: version {version} cannot be loaded: {e}") from None
        return loaded

    # ---- writing ----------------------------------------------------------------------------
    def add(
        self,
        model: Any,
        policy: Policy,
        *,
        model_spec: str | dict[str, Any] | None = None,
        parent: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> str:
        """Write ``model`` (an :class:`advx.Classifier` or ``nn.Module``) and ``policy`` as a new
        version, not yet current; returns its name. ``model_spec`` rebuilds the architecture
        (read off a built-in one); ``info`` joins the provenance (data sha256, audit figures).
        """
        from .._checkpoint import save_checkpoint, state_dict_cpu
        from ..models.classifier import as_model
        from ..zoo import describe

        clf = as_model(model)
        net = getattr(clf, "net", None)
        if net is None:
            raise InputError(
                f"model dir: only a Classifier over an nn.Module can be saved, got {clf!r}"
            )
        spec = model_spec if model_spec is not None else describe(net)
        if spec is None:
            raise InputError(
                f"model dir: advx cannot rebuild a {type(net).__name__} from weights alone; pass "
                "model_spec= (pkg.module:factory or path/to/file.py:factory)"
            )
        if isinstance(spec, str):
            spec = {"spec": spec, "kwargs": {}}
        fp = clf.fingerprint()
        if policy.model_fingerprint not in (None, fp):
            raise InputError(
                f"model dir: the policy was calibrated for model {policy.model_fingerprint[:12]}, "
                f"not for these weights ({fp[:12]}); recalibrate it first"
            )
        if parent is not None:
            self.meta(parent)  # the parent must exist
        mean, std = getattr(clf, "mean", None), getattr(clf, "std", None)
        ckpt_meta = {
            "model": {
                **copy.deepcopy(spec),
                "class": f"{type(net).__module__}.{type(net).__qualname__}",
                "bounds": list(clf.bounds),
                "mean": None if mean is None else torch.as_tensor(mean).flatten().tolist(),
                "std": None if std is None else torch.as_tensor(std).flatten().tolist(),
            },
            "training": {"epochs_done": 0},
        }
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            save_checkpoint(tmp, state_dict_cpu(net), ckpt_meta, {})
            policy.save(tmp / "policy.toml")
            # the name is chosen last; a concurrent writer that took it first makes us take the
            # next one (renaming onto an existing, non-empty folder fails)
            for _ in range(100):
                existing = self.versions()
                name = f"v{(int(existing[-1][1:]) + 1) if existing else 1:04d}"
                meta = {
                    "schema": META_SCHEMA,
                    "version": name,
                    "parent": parent,
                    "created": now(),
                    "model_fingerprint": fp,
                    "policy_hash": policy.hash,
                    **(info or {}),
                    "versions": versions(),
                }
                write_json(tmp / "meta.json", meta)
                try:
                    os.rename(tmp, self.root / name)
                except OSError:
                    if (self.root / name).exists():
                        continue
                    raise
                fsync_dir(self.root)
                log.info("model dir: wrote %s (parent %s)", name, parent)
                return name
            raise InputError(f"model dir: could not find a free version name in {self.root}")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def promote(self, version: str, *, device: str | torch.device = "cpu") -> ModelVersion:
        """Make ``version`` current, after loading it completely; a version that fails to load
        raises :class:`VersionError` and the pointer is left as it was."""
        loaded = self.load(version, device=device)
        write_bytes(self.root / POINTER, f"{version}\n".encode())
        fsync_dir(self.root)
        log.info("model dir: %s is now current in %s", version, self.root)
        return loaded
