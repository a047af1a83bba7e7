"""Files and names: atomic writes, sha256 of files, bytes and tensors, importing ``pkg.mod:attr``.

Every file advx writes goes through :func:`atomic_open`, so that a failed or killed run leaves
the previous file whole or no file at all, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "atomic_open",
    "write_json",
    "write_bytes",
    "fsync_dir",
    "check_writable",
    "sha256_bytes",
    "sha256_file",
    "sha256_tensors",
    "tensor_bytes",
    "import_object",
]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path`` and move it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); the result should get the mode any new file
        # gets (0644 under the usual umask), as it would from a plain open()
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_jsonable)
        f.write("\n")


def read_json(path: str | os.PathLike, *, name: str) -> Any:
    """The JSON document in ``path``; an unreadable or malformed file is an InputError naming
    ``name`` and the path."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{name}: cannot read {path} as JSON ({e})") from None


def _jsonable(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return repr(obj)


def check_writable(path: str | os.PathLike, *, name: str = "out") -> Path:
    """Fail now, not after an hour of attacking, when ``path`` cannot be written."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise InputError(f"{name}: {path} is a folder; give a file name")
    parent = path.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{name}: cannot write to {parent} (not a writable folder)")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{name}: {path} exists and is not writable")
    return path


# ---- fingerprints ---------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tensors(*tensors: Tensor) -> str:
    """sha256 of the tensors' bytes, in order, as stored (cast first to fix the dtype)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(tensor_bytes(t))
    return h.hexdigest()


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of a tensor's values, on the CPU, in row-major order."""
    import torch

    # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


# ---- names ----------------------------------------------------------------------------------
def import_object(spec: str, *, name: str = "spec") -> Any:
    """The object named by ``pkg.module:attr`` or ``path/to/file.py:attr``.

    Errors name the argument (``name``) and what could not be found.
    """
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not attr or not module_name:
        raise InputError(f"{name}: expected pkg.module:attr or path/to/file.py:attr, got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.exists():
            raise InputError(f"{name}: no file {module_name}")
        mod_spec = importlib.util.spec_from_file_location(f"_advx_user_{path.stem}", path)
        if mod_spec is None or mod_spec.loader is None:
            raise InputError(f"{name}: cannot import {module_name} as a Python file")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise InputError(
                f"{name}: cannot import {module_name!r} ({e}); is it installed or on PYTHONPATH?"
            ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise InputError(f"{name}: {module_name} has no attribute {attr!r}") from None


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable (fsync the folder itself)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
