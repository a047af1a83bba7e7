"""Shared pieces of the benchmarks: the real models and data of ../shared, timing, peers'
versions, and writing a section of RESULTS.md. Not part of the package or the test run."""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ADVX_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

sys.path.insert(0, str(ROOT / "src"))
import advx  # noqa: E402
from advx.data import load  # noqa: E402
from advx.zoo import build  # noqa: E402

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)


class Normalized(torch.nn.Module):
    """For peers without built-in normalization: the ResNet-20 with its normalization inside."""

    def __init__(self, net: torch.nn.Module, mean, std) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def trades_smallcnn() -> torch.nn.Module:
    return build("smallcnn", weights=SHARED / "models" / "trades_mnist_smallcnn.pt").eval()


def resnet20_normalized() -> torch.nn.Module:
    """The akamaster ResNet-20 with normalization inside: input in [0, 1], for every library."""
    net = build("resnet20", weights=SHARED / "models" / "akamaster_cifar10_resnet20.th").eval()
    return Normalized(net, CIFAR_MEAN, CIFAR_STD).eval()


def mnist_test(n: int):
    return load(SHARED / "data" / "mnist", split="test", n=n)


def cifar_balanced(n: int):
    """Every (10000 // n)-th image of the class-sorted CIFAR-10 test set: n/10 per class."""
    x, y = load(SHARED / "data" / "cifar10" / "cifar10_test.npz")
    idx = torch.arange(0, 10000, 10000 // n)[:n]
    return x[idx], y[idx]


def median_time(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, list[float], Any]:
    """Median wall time over ``repeats`` runs; returns (median, all times, last result)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def versions(*packages: str) -> dict[str, str]:
    found = {
        "advx": advx.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for name in packages:
        try:
            mod = importlib.import_module(name)
            found[name] = getattr(mod, "__version__", "?")
        except Exception as e:
            found[name] = f"not importable ({type(e).__name__})"
    return found


def machine() -> str:
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} cores, torch {torch.__version__}"
    )


def write_section(key: str, markdown: str) -> None:
    """Replace (or append) the section between <!-- key --> markers in RESULTS.md."""
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(RESULTS)


def table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
