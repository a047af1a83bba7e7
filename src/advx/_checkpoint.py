"""Checkpoints: safetensors weights, a JSON sidecar, and the state for an exact resume.

A checkpoint folder holds::

    checkpoint.json                      the sidecar (the commit point, see below)
    model-e0003-1a2b3c4d.safetensors     the weights (the sidecar's metadata is in its header too)
    state-e0003-5e6f7a8b.pt              optimizer, schedule step, best weights, history

The sidecar names the weights and the state file and their sha256, and records what made them:
the recipe and its parameters, the threat model, the data's sha256, the epochs done, the
metrics, the advx and torch versions and the model spec that rebuilds the architecture.

Saving is atomic. Each file is written to a temporary file, fsynced and renamed into place; the
weights and the state go to new names (epoch and content hash), so the files of the previous
checkpoint are untouched until the new sidecar has replaced the old one. A failure at any point
before that rename leaves the previous checkpoint whole; after it, the new one is whole. Files
no longer named by the sidecar are removed last.

The state file holds only tensors, numbers and strings: it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import fsync_dir, sha256_bytes, sha256_file, write_bytes
from ._provenance import now, versions
from .errors import InputError

__all__ = [
    "SCHEMA",
    "SIDECAR",
    "save_checkpoint",
    "read_sidecar",
    "load_state",
    "find_checkpoint",
    "require_safetensors",
    "state_dict_cpu",
]

log = logging.getLogger("advx")

SCHEMA = "advx-checkpoint/1"
SIDECAR = "checkpoint.json"
_META_KEY = "advx"


def require_safetensors():
    """The safetensors module, or a clear error saying how to get it."""
    try:
        import safetensors.torch as st
    except ImportError:
        raise InputError(
            "checkpoints are saved as safetensors, which is not installed: "
            "pip install 'advx[train]' (or pip install safetensors)"
        ) from None
    return st


def state_dict_cpu(net: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as independent, contiguous CPU tensors (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}


def _dump_state(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_checkpoint(
    folder: str | os.PathLike,
    weights: dict[str, torch.Tensor],
    meta: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write a checkpoint into ``folder`` atomically; returns the sidecar's path.

    ``meta`` is the sidecar's content (what made the weights); ``state`` what an exact resume
    needs. Both must be JSON-able / weights_only-loadable respectively.
    """
    st = require_safetensors()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    epoch = int(meta.get("training", {}).get("epochs_done", 0))
    header = {k: v for k, v in meta.items() if k != "metrics"}
    blob = st.save(weights, metadata={_META_KEY: json.dumps(header, default=str)})
    w_sha = sha256_bytes(blob)
    state_blob = _dump_state(state)
    s_sha = sha256_bytes(state_blob)
    w_name = f"model-e{epoch:04d}-{w_sha[:8]}.safetensors"
    s_name = f"state-e{epoch:04d}-{s_sha[:8]}.pt"
    write_bytes(folder / w_name, blob)
    write_bytes(folder / s_name, state_blob)
    sidecar = {
        "schema": SCHEMA,
        "created": now(),
        "weights": w_name,
        "weights_sha256": w_sha,
        "state": s_name,
        "state_sha256": s_sha,
        **meta,
        "versions": versions(),
    }
    write_bytes(
        folder / SIDECAR, (json.dumps(sidecar, indent=2, default=str) + "\n").encode()
    )  # the commit
    fsync_dir(folder)
    for old in list(folder.glob("model-e*.safetensors")) + list(folder.glob("state-e*.pt")):
        if old.name not in (w_name, s_name):
            try:
                old.unlink()
            except OSError as e:  # pragma: no cover - a stale file is harmless
                log.warning("could not remove the stale checkpoint file %s (%s)", old, e)
    return folder / SIDECAR


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The sidecar for a checkpoint folder, a sidecar file, or a weights file."""
    path = Path(path)
    if path.is_dir():
        side = path / SIDECAR
        if not side.exists():
            raise InputError(
                f"checkpoint: {path} holds no {SIDECAR}; is it an advx training output folder?"
            )
        return side
    if not path.exists():
        raise InputError(f"checkpoint: no file or folder {path}")
    if path.suffix == ".json":
        return path
    if path.suffix == ".safetensors":
        return path  # read_sidecar takes the metadata from its header
    raise InputError(
        f"checkpoint: expected a folder, its {SIDECAR} or a .safetensors file, got {path}"
    )


def read_sidecar(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """(sidecar, weights path) for a checkpoint folder, sidecar or .safetensors file. The weights'
    sha256 is checked against the sidecar."""
    side = find_checkpoint(path)
    if side.suffix == ".safetensors":
        require_safetensors()
        from safetensors import safe_open

        try:
            with safe_open(str(side), framework="pt") as f:
                header = (f.metadata() or {}).get(_META_KEY)
        except Exception as e:
            raise InputError(f"checkpoint: cannot read {side} ({type(e).__name__}: {e})") from None
        beside = side.parent / SIDECAR
        if beside.exists():
            meta = json.loads(beside.read_text())
            if meta.get("weights") == side.name:
                return _checked(meta, side)
        if header is None:
            raise InputError(
                f"checkpoint: {side} has no advx metadata and no {SIDECAR} beside it; "
                "load it with advx.zoo.build(spec, weights=...) instead"
            )
        return json.loads(header), side
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"checkpoint: cannot read {side} ({e})") from None
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise InputError(f"checkpoint: {side} is not an advx checkpoint sidecar (schema {SCHEMA})")
    return _checked(meta, side.parent / meta["weights"])


def _checked(meta: dict[str, Any], weights: Path) -> tuple[dict[str, Any], Path]:
    if not weights.exists():
        raise InputError(
            f"checkpoint: the weights file {weights.name} named by the sidecar is missing"
        )
    want = meta.get("weights_sha256")
    if want:
        if sha256_file(weights) != want:
            raise InputError(
                f"checkpoint: {weights.name} does not match the sha256 in its sidecar; the file "
                "was changed after it was saved"
            )
    return meta, weights


def load_state(sidecar: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The resume state named by a sidecar (weights_only: no arbitrary objects unpickled)."""
    path = sidecar.parent / meta["state"]
    if not path.exists():
        raise InputError(f"resume: the state file {path.name} named by {sidecar} is missing")
    data = path.read_bytes()
    if meta.get("state_sha256") and sha256_bytes(data) != meta["state_sha256"]:
        raise InputError(f"resume: {path.name} does not match the sha256 in {sidecar.name}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
