"""The update loop on the embedded digits, and what a reload costs the requests in flight
(issue 14).

1. A small MLP trained on mnist-demo's train split (2 epochs) becomes v0001 of a model directory
   (guard: feature squeezing + energy, calibrated to 5% false positives on test digits 400-999).
2. PGD (Linf 0.1, 10 steps) on 300 training digits; what the v0001 guard does not accept is the
   "reviewed" set, labelled with the digits' true labels.
3. ``advx.guard.update.update``: FGSM-RS fine-tune (1 epoch, 2,000 training digits + the reviewed
   items), audits of both models on test digits 0-399 (PGD-10 at Linf 0.1), gate, recalibration,
   promotion. Timed per phase.
4. ``advx serve --model-dir`` in its own process; 4 client threads send one digit per request
   for a baseline window, then during a window of reloads (the pointer switched between v0001
   and v0002, then ``POST /admin/reload``). Reported: requests, failures, latency percentiles in
   each window, and the reload call's duration.

    OMP_NUM_THREADS=1 python benchmarks/bench_update_loop.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "guard"))

import httpx  # noqa: E402
import torch  # noqa: E402

import advx  # noqa: E402
from advx.guard.update import init, update  # noqa: E402
from advx.guard.versions import ModelDir  # noqa: E402
from advx.training import fit  # noqa: E402

SPEC = f"{ROOT / 'tests' / 'guard' / '_loop_model.py'}:mlp"
TOKEN = "bench"
FIGURES = ("clean_accuracy", "robust_accuracy", "reviewed_accuracy")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client(threading.Thread):
    def __init__(self, url: str, row: list, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.row, self.stop = url, row, stop
        self.log: list[tuple[float, float, int, str | None]] = []  # (start, seconds, status, v)

    def run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = http.post(f"{self.url}/predict", json={"inputs": [self.row]})
                    status = r.status_code
                    version = r.json().get("model_version") if status == 200 else None
                except httpx.HTTPError:
                    status, version = -1, None
                self.log.append((t0, time.perf_counter() - t0, status, version))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=float, default=10.0, help="seconds per serving window")
    ap.add_argument("--reloads", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    out: dict = {"torch_threads": torch.get_num_threads()}
    xs, ys = advx.data.load("mnist-demo", split="train")
    xt, yt = advx.data.load("mnist-demo", split="test")
    root = Path(tempfile.mkdtemp(prefix="advx-bench-loop-"))
    md = ModelDir(root / "models")

    t0 = time.perf_counter()
    net = advx.zoo.build(SPEC)
    fit(net, xs, ys, epochs=2, batch_size=64, lr=3e-3, progress=False)
    model = advx.Classifier(net.eval(), bounds=(0, 1))
    out["train_v1_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    v1 = init(md, model, data=(xt[400:], yt[400:]), model_spec=SPEC)
    out["init_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    x_adv = advx.PGD(advx.Linf(0.1), steps=10)(model, xs[:300], ys[:300]).x_adv
    held = torch.tensor([d.action != "accept" for d in v1.guard()(x_adv)])
    reviewed = (x_adv[held], ys[:300][held])
    out["reviewed"] = int(held.sum())
    out["flag_s"] = time.perf_counter() - t0

    result = update(
        md,
        reviewed=reviewed,
        train_data=(xs[300:2300], ys[300:2300]),
        audit_data=(xt[:400], yt[:400]),
        calib_data=(xt[400:], yt[400:]),
        threat="linf:0.1",
        epochs=1,
    )
    out["update"] = {
        "promoted": result.promoted,
        "reason": result.reason,
        "seconds": result.seconds,
        "train_s": result.training["seconds"],
        "old": {
            k: result.old[k] for k in ("clean_accuracy", "robust_accuracy", "reviewed_accuracy")
        },
        "new": {
            k: result.new[k] for k in ("clean_accuracy", "robust_accuracy", "reviewed_accuracy")
        },
        "robust_delta_interval": result.comparison["robust_delta_interval"],
    }
    print(json.dumps(out, indent=2), flush=True)
    if not result.promoted:
        raise SystemExit("the update was refused; nothing to reload")
    md.promote("v0001")  # the service starts on v0001

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ADVX_ADMIN_TOKEN": TOKEN}
    server = subprocess.Popen(
        [sys.executable, "-m", "advx", "serve", "--model-dir", str(md.root), "--port", str(port),
         "--log-level", "warning", "--detect-queries", "off", "--store", "off"],
        env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        stop = threading.Event()
        clients = [Client(url, xt[i].tolist(), stop) for i in range(args.clients)]
        for c in clients:
            c.start()
        time.sleep(1.0)  # warm
        base_start = time.perf_counter()
        time.sleep(args.window)
        reload_start = time.perf_counter()
        reload_s, answers = [], []
        for k in range(args.reloads):
            md.promote("v0002" if k % 2 == 0 else "v0001")
            t0 = time.perf_counter()
            r = httpx.post(
                f"{url}/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
            )
            reload_s.append(time.perf_counter() - t0)
            answers.append(r.json())
            time.sleep(max(0.0, args.window / args.reloads - reload_s[-1]))
        reload_end = time.perf_counter()
        stop.set()
        for c in clients:
            c.join(timeout=30)
    finally:
        server.terminate()
        server.wait(timeout=30)

    log = [e for c in clients for e in c.log]

    def window(a: float, b: float) -> dict:
        rows = [e for e in log if a <= e[0] < b]
        lat = [e[1] * 1000 for e in rows if e[2] == 200]
        return {
            "requests": len(rows),
            "failed": sum(e[2] != 200 for e in rows),
            "p50_ms": _pct(lat, 0.5),
            "p99_ms": _pct(lat, 0.99),
            "max_ms": max(lat) if lat else float("nan"),
            "versions": sorted({str(e[3]) for e in rows}),
        }

    out["serve"] = {
        "clients": args.clients,
        "baseline": window(base_start, reload_start),
        "reloading": window(reload_start, reload_end),
        "reloads": len(answers),
        "reloads_ok": sum(bool(a.get("ok") and a.get("changed")) for a in answers),
        "reload_call_median_s": statistics.median(reload_s),
        "reload_call_max_s": max(reload_s),
    }
    print(json.dumps(out["serve"], indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
