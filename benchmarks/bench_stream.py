"""Streaming audit (issue 12): a `fast` audit of CIFAR-10 test images against the ResNet-20,
through a DataLoader that reads the images from disk, against the same audit on in-memory
tensors. Each run is its own process, so its peak resident memory (ru_maxrss) is its own.

    python benchmarks/bench_stream.py --n 1000 10000 --write

Memory: the loader run holds the model, a few chunks and per-sample numbers, so its peak should
not grow with N; the tensor run holds all N images as float32 (12 KB each) besides.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SHARED, write_section

NPZ = SHARED / "data" / "cifar10" / "cifar10_test.npz"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_s() -> float:
    """CPU seconds of this process, all threads (less sensitive to the machine's load than the
    wall time: what the run itself computed)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def parse_suite(text: str):
    """A built-in name, or a JSON list of attack specs such as '[{"name": "fgsm"}]'."""
    return json.loads(text) if text.lstrip().startswith("[") else text


def child(mode: str, n: int, raw: str, suite: str, out: str, light: bool = False) -> None:
    """One audit in this process; its numbers as JSON to ``out``."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    torch.set_num_threads(1)
    from _common import resnet20_normalized

    import advx

    net = resnet20_normalized()
    idx = np.arange(0, 10000, 10000 // n)[:n]  # class-balanced (the file is sorted by class)
    labels = np.load(raw + ".y.npy")[idx]
    row = 3 * 32 * 32

    class OnDisk(Dataset):
        """CIFAR-10 images read from a raw uint8 file one row at a time (pread: nothing stays
        mapped), made float in [0, 1] per batch."""

        def __init__(self) -> None:
            self.fd = os.open(raw, os.O_RDONLY)

        def __len__(self) -> int:
            return n

        def __getitems__(self, rows):
            buf = b"".join(os.pread(self.fd, row, int(idx[r]) * row) for r in rows)
            x = torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(len(rows), 3, 32, 32)
            return x.float().div_(255.0), torch.from_numpy(labels[rows])

        def __getitem__(self, r):
            x, y = self.__getitems__([r])
            return x[0], y[0]

    warm_x = torch.rand(8, 3, 32, 32)
    advx.PGD(advx.Linf(8 / 255), steps=1)(net, warm_x, torch.zeros(8, dtype=torch.long))
    before = rss_mb()
    t0 = time.perf_counter()
    cpu0 = cpu_s()
    if mode == "tensors":
        ds = OnDisk()
        x, y = ds.__getitems__(list(range(n)))  # all N images in memory, float32
        data: tuple = (x, y)
    else:
        data = (DataLoader(OnDisk(), batch_size=256, shuffle=False, collate_fn=lambda b: b),)
    kw: dict = {"eps_curve": None, "checks": False} if light else {}
    report = advx.audit(net, *data, advx.Linf(8 / 255), suite=parse_suite(suite), **kw)
    wall = time.perf_counter() - t0
    cpu = cpu_s() - cpu0
    Path(out).write_text(
        json.dumps(
            {
                "mode": mode,
                "n": n,
                "wall_s": wall,
                "cpu_s": cpu,
                "cascade_s": report.totals.seconds.cascade,
                "rss_before_mb": before,
                "peak_rss_mb": rss_mb(),
                "clean": report.clean_accuracy,
                "robust": report.robust_accuracy,
                "samples": report.samples.robust,
                "broken_by": report.samples.broken_by,
            }
        )
    )


def run_one(mode: str, n: int, raw: str, suite: str, light: bool = False, env=None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--child", mode, "--n", str(n), "--raw", raw, "--suite", suite]
    cmd += ["--light"] if light else []
    subprocess.run(
        [*cmd, "--out", out], check=True, env={**os.environ, "ADVX_QUIET": "1", **(env or {})}
    )
    r = json.loads(Path(out).read_text())
    os.unlink(out)
    print(
        f"{mode:8s} n={n:6d} wall {r['wall_s']:8.2f}s cpu {r['cpu_s']:8.2f}s "
        f"peak RSS {r['peak_rss_mb']:7.1f} MB "
        f"(before the audit {r['rss_before_mb']:.1f}) robust {r['robust']:.4f}",
        flush=True,
    )
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--suite", default="fast")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each mode per N, interleaved")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--child", default=None)
    ap.add_argument("--raw", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="loader runs only, no eps curve or checks, each N with glibc's default malloc and "
        "with MALLOC_MMAP_THRESHOLD_=131072 (a fixed threshold: no heap growth from the "
        "dynamic one); written as the stream-memory section",
    )
    ap.add_argument("--light", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.n[0], args.raw, args.suite, args.out, light=args.light)
        return
    if args.memory_only:
        memory_only(args)
        return

    tmp = tempfile.mkdtemp()
    raw = os.path.join(tmp, "cifar10_test.u8")
    with np.load(NPZ) as z:  # HWC uint8 -> a raw CHW file the loader reads row by row
        np.ascontiguousarray(z["x"].transpose(0, 3, 1, 2)).tofile(raw)
        np.save(raw + ".y.npy", z["y"].astype(np.int64))
    start = (time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), uptime())
    print(start[1], flush=True)
    rows, pairs, same = [], [], {}
    for n in args.n:
        got: dict[str, list[dict]] = {"tensors": [], "loader": []}
        for i in range(args.repeats):
            for mode in ("tensors", "loader"):  # interleaved: the load drifts over both alike
                got[mode].append(run_one(mode, n, raw, args.suite))
            t, lo = got["tensors"][-1], got["loader"][-1]
            pairs.append(
                [
                    n,
                    i + 1,
                    round(t["wall_s"], 1),
                    round(lo["wall_s"], 1),
                    round(lo["wall_s"] / t["wall_s"], 3),
                    round(t["cpu_s"], 1),
                    round(lo["cpu_s"], 1),
                    round(lo["cpu_s"] / t["cpu_s"], 3),
                    round(t["peak_rss_mb"], 1),
                    round(lo["peak_rss_mb"], 1),
                ]
            )
            same[n] = all(
                a["samples"] == b["samples"] and a["broken_by"] == b["broken_by"]
                for a in got["loader"]
                for b in got["tensors"]
            )
            wall = {m: statistics.median(r["wall_s"] for r in got[m]) for m in got}
            cpu = {m: statistics.median(r["cpu_s"] for r in got[m]) for m in got}
            rows[:] = [r for r in rows if r[1] != n]  # this N's rows so far, rewritten
            for mode in ("tensors", "loader"):
                rs = got[mode]
                rows.append(
                    [
                        mode,
                        n,
                        round(wall[mode], 1),
                        round(wall[mode] / wall["tensors"], 3),
                        round(cpu[mode], 1),
                        round(cpu[mode] / cpu["tensors"], 3),
                        round(statistics.median(r["peak_rss_mb"] for r in rs), 1),
                        round(max(r["peak_rss_mb"] for r in rs), 1),
                        round(statistics.median(r["rss_before_mb"] for r in rs), 1),
                        f"{rs[0]['clean']:.2%}",
                        f"{rs[0]['robust']:.2%}",
                    ]
                )
            report_so_far(args, rows, pairs, same, start)  # after every pair: nothing lost


def memory_only(args) -> None:
    tmp = tempfile.mkdtemp()
    raw = os.path.join(tmp, "cifar10_test.u8")
    with np.load(NPZ) as z:
        np.ascontiguousarray(z["x"].transpose(0, 3, 1, 2)).tofile(raw)
        np.save(raw + ".y.npy", z["y"].astype(np.int64))
    load = os.getloadavg()
    rows = []
    for malloc in ("default", "fixed"):
        env = {"MALLOC_MMAP_THRESHOLD_": "131072"} if malloc == "fixed" else {}
        for n in args.n:
            r = run_one("loader", n, raw, args.suite, light=True, env=env)
            rows.append(
                [
                    malloc,
                    n,
                    round(r["wall_s"], 1),
                    round(r["peak_rss_mb"], 1),
                    round(r["rss_before_mb"], 1),
                    f"{r['robust']:.2%}",
                ]
            )
            header = ["malloc", "N", "wall s", "peak RSS MB", "RSS before the audit MB", "robust"]
            table = "\n".join(
                ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
            )
            print(table, flush=True)
            if args.write:
                write_section(
                    "stream-memory",
                    "## Streaming audit: peak memory against N (issue 12)\n\n"
                    f"ResNet-20, CIFAR-10 test images through the DataLoader of the section "
                    f"above, suite `{args.suite}`, no eps curve, no checks (a cheaper cascade, "
                    f"so that N = 10,000 fits on this machine), 1 torch thread, each run its own "
                    f"process. `fixed`: MALLOC_MMAP_THRESHOLD_=131072. Load average at the "
                    f"start: {load[0]:.2f}; now {os.getloadavg()[0]:.2f} (2 shared cores).\n\n"
                    f"Command: `python benchmarks/bench_stream.py --memory-only --suite "
                    f"'{args.suite}' --n {' '.join(map(str, args.n))} --write`\n\n{table}\n",
                )


def report_so_far(args, rows, pairs, same, start) -> None:
    header = [
        "input",
        "N",
        "wall s (median)",
        "wall vs tensors",
        "CPU s (median)",
        "CPU vs tensors",
        "peak RSS MB (median)",
        "peak RSS MB (max)",
        "RSS before the audit MB",
        "clean",
        "robust",
    ]
    per_pair = [
        "N",
        "pair",
        "tensors wall s",
        "loader wall s",
        "loader / tensors (wall)",
        "tensors CPU s",
        "loader CPU s",
        "loader / tensors (CPU)",
        "tensors peak RSS MB",
        "loader peak RSS MB",
    ]
    table = _table(header, rows)
    pair_table = _table(per_pair, pairs)
    print(table, pair_table, sep="\n\n")
    print("same per-sample results, loader vs tensors:", same)
    if args.write:
        body = (
            f"`fast` audit (checks and eps curve included), ResNet-20 (undefended), CIFAR-10 "
            f"test images (class-balanced: every (10000 // N)-th), Linf 8/255, 1 torch thread, "
            f"each run its own process. The loader reads uint8 rows from a raw file with pread "
            f"(batch 256, num_workers=0); the tensor run holds all N images as float32. Runs "
            f"interleaved: tensors, loader, tensors, loader, ... CPU s: user + system time of "
            f"the run's process (all threads). 2 cores shared with other helpers. Started "
            f"{start[0]}; `uptime` at the start: `{start[1]}`; at this write: `{uptime()}`.\n\n"
            f"Command: `python benchmarks/bench_stream.py --n "
            f"{' '.join(map(str, args.n))} --suite {args.suite} --repeats {args.repeats} "
            f"--write`\n\n{table}\n\nEach pair:\n\n{pair_table}\n\nSame per-sample results "
            f"(robust, broken_by) from the loader and the tensors: {same}.\n"
        )
        write_section(
            "stream-overlap",
            "## Streaming audit: DataLoader vs tensors with read-ahead (issue 12)\n\n" + body,
        )


def _table(header, rows) -> str:
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    )


if __name__ == "__main__":
    main()
