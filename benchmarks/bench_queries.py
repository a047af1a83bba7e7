"""Stateful query-attack detection (advx.guard.queries): detection of advx's own black-box
attacks, false positives on clean and near-duplicate streams, adaptive attacks, and cost.

The detector sits in the model's query path: the model is wrapped in a BlackBox whose function
calls ``QueryDetector.observe(client, batch)`` on every query batch before answering, as the
service does (the library object directly, not over HTTP). Detection runs record every query's
flag without changing the answers, so one run gives the attack's trajectory with the defense in
reject mode up to the first detection: "success with the defense (reject)" counts an attack
that succeeded before its first flagged query (a flagged query gets no answer and ends it).

Model: the demo LeNet trained 4 epochs on the embedded digits (as bench_decision.py); attacked
images: correctly classified MNIST test images from index 5000 on (../shared/data/mnist),
disjoint from the embedded digits the model was trained on. One detector per attack, shared by
all its images (a fresh client id per image).

    python benchmarks/bench_queries.py --n 100 --adaptive-n 40
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from _common import SHARED, load, machine, table, versions, write_section

import advx
from advx.attacks.square import p_schedule
from advx.guard.queries import QueryDetector
from advx.models import BlackBox

torch.set_num_threads(1)
EPS_ADAPTIVE = 0.15


def lenet(seed: int = 0) -> torch.nn.Module:
    x, y = load("mnist-demo", split="train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = advx.zoo.build("lenet")
    advx.training.fit(net, x, y, epochs=4, batch_size=64, lr=2e-3, seed=seed, progress=False)
    return net.eval()


def attacked_images(net, n: int):
    x, y = load(SHARED / "data" / "mnist", split="test")
    x, y = x[5000:], y[5000:]
    with torch.no_grad():
        ok = net(x[: 4 * n + 100]).argmax(1) == y[: 4 * n + 100]
    return x[: 4 * n + 100][ok][:n], y[: 4 * n + 100][ok][:n]


def pct(values, q):
    return float(np.percentile(values, q)) if values else math.nan


# ---------------------------------------------------------------------------------------------
# detection of the non-adaptive attacks


def run_detection(name: str, attack, net, x, y) -> dict:
    det = QueryDetector(spec="mnist")
    rows = []
    for i in range(len(x)):
        log: list = []
        client = f"{name}-{i}"

        def fn(q, log=log, client=client):
            log.extend(det.observe(client, q))
            with torch.no_grad():
                z = net(q)
            return z if attack.access == "scores" else z.argmax(1)

        r = attack.with_seed(i)(BlackBox(fn, kind=attack.access), x[i : i + 1], y[i : i + 1])
        first = next((k + 1 for k, (f, _) in enumerate(log) if f), None)
        used = int(r.queries[0])
        after = log[first - 1 :] if first else []
        rows.append(
            {
                "queries": used,
                "success": bool(r.success[0]),
                "first": first,
                "coverage": sum(f for f, _ in after) / len(after) if after else None,
            }
        )
    firsts = [r["first"] for r in rows if r["first"] is not None]
    succ = [r for r in rows if r["success"]]
    return {
        "attack": name,
        "n": len(rows),
        "detected": len(firsts) / len(rows),
        "first_median": pct(firsts, 50),
        "first_p90": pct(firsts, 90),
        "queries_median": pct([r["queries"] for r in rows], 50),
        "success": len(succ) / len(rows),
        "detected_before_success": (
            sum(r["first"] is not None and r["first"] <= r["queries"] for r in succ) / len(succ)
            if succ
            else math.nan
        ),
        "success_with_defense": sum(
            r["success"] and (r["first"] is None or r["first"] > r["queries"]) for r in rows
        )
        / len(rows),
        "coverage_median": pct([r["coverage"] for r in rows if r["coverage"] is not None], 50),
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# false positives


def stream(det: QueryDetector, x: torch.Tensor, client: str, batch: int = 100) -> list[bool]:
    out: list[bool] = []
    for i in range(0, len(x), batch):
        out += [f for f, _ in det.observe(client, x[i : i + batch])]
    return out


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    out = []
    for img in x:
        arr = (img[0].numpy() * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255
        out.append(torch.from_numpy(back)[None])
    return torch.stack(out)


def false_positives(n_near: int) -> dict:
    x, _ = load(SHARED / "data" / "mnist", split="test")
    det = QueryDetector(spec="mnist")
    t0 = time.perf_counter()
    flags = stream(det, x, "benign")
    seconds = time.perf_counter() - t0
    distinct = {"queries": len(flags), "flagged": sum(flags), "seconds": seconds}
    base = x[:n_near]
    variants = {
        "shifted 1 px right": torch.roll(base, shifts=1, dims=3),
        "shifted 1 px down": torch.roll(base, shifts=1, dims=2),
        "brightened +0.05": (base + 0.05).clamp(0, 1),
        "brightened x1.1": (base * 1.1).clamp(0, 1),
        "JPEG q=90": jpeg(base, 90),
        "JPEG q=75": jpeg(base, 75),
    }
    near = {}
    for name, v in variants.items():
        d = QueryDetector(spec="mnist")
        stream(d, base, "benign")  # the originals first, then their variants
        near[name] = sum(stream(d, v, "benign")) / len(v)
    return {"distinct": distinct, "near": near, "n_near": n_near}


# ---------------------------------------------------------------------------------------------
# adaptive attacks


def blinded(net, det, client, transform, log, gen) -> BlackBox:
    """Query blinding: every query is randomly transformed before it is sent."""

    def fn(q):
        q = transform(q, gen)
        log.extend(det.observe(client, q))
        with torch.no_grad():
            return net(q)

    return BlackBox(fn)


def noise_blind(q, gen):
    return (q + (torch.rand(q.shape, generator=gen) * 2 - 1) * 0.1).clamp(0, 1)


def shift_blind(q, gen):
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    b = float(torch.rand((), generator=gen)) * 0.1 - 0.05
    return (torch.roll(q, shifts=(dy, dx), dims=(2, 3)) + b).clamp(0, 1)


def run_plain(net, x, y, eps, queries) -> dict:
    """The non-adaptive Square on the same images, for comparison."""
    return run_blinding("no blinding (non-adaptive)", lambda q, gen: q, net, x, y, eps, queries)


def run_blinding(name, transform, net, x, y, eps, queries) -> dict:
    det = QueryDetector(spec="mnist")
    rows = []
    attack = advx.Square(advx.Linf(eps), queries=queries)
    for i in range(len(x)):
        log: list = []
        gen = torch.Generator().manual_seed(i)
        box = blinded(net, det, f"{name}-{i}", transform, log, gen)
        r = attack.with_seed(i)(box, x[i : i + 1], y[i : i + 1])
        first = next((k + 1 for k, (f, _) in enumerate(log) if f), None)
        with torch.no_grad():
            real = bool(net(r.x_adv).argmax(1)[0] != y[i])
        rows.append(
            {
                "queries": int(r.queries[0]),
                "first": first,
                "flags": sum(f for f, _ in log),
                "success": real,
                "success_with_defense": real and (first is None or first > int(r.queries[0])),
            }
        )
    return summarize_adaptive(f"Square + {name}", rows)


def oars_square(net, fallback, det, client, x0, y0, eps, budget, mode, gen) -> dict:
    """An OARS-style Square: the defense's rejections steer the search.

    Each proposal sets ``k`` random squares (side from Square's schedule) of the current point to
    x0 +- eps. ``explicit``: a rejected proposal is answered with an error; the attacker doubles
    ``k`` (a bigger move, less like what it sent before) and tries again, and halves it after an
    accepted one. ``silent``: a flagged query is answered by the fallback model, so the attacker
    sees no rejection and goes on with answers that are not the model's.
    """
    c, h, w = x0.shape[1:]
    queries = rejections = 0
    first: int | None = None
    k, kmax = 1, 64

    def ask(q):
        nonlocal queries, rejections, first
        queries += 1
        [(flagged, _)] = det.observe(client, q)
        if flagged:
            rejections += 1
            first = first or queries
            if mode == "explicit":
                return None
            with torch.no_grad():
                return fallback(q)[0]
        with torch.no_grad():
            return net(q)[0]

    def margin(z):
        other = z.clone()
        other[y0] = -math.inf
        return float(z[y0] - other.max())

    stripes = torch.randint(0, 2, (1, c, 1, w), generator=gen).float() * 2 - 1
    cur = (x0 + eps * stripes).clamp(0, 1)
    z = None
    while z is None and queries < budget:
        z = ask(cur)
        if z is None:
            stripes = torch.randint(0, 2, (1, c, 1, w), generator=gen).float() * 2 - 1
            cur = (x0 + eps * stripes).clamp(0, 1)
    best = margin(z) if z is not None else math.inf
    it = 0
    while best >= 0 and queries < budget:
        p = p_schedule(0.8, it, budget)
        s = max(1, min(h - 1, round(math.sqrt(p * h * w))))
        cand = cur.clone()
        for _ in range(k):
            r0, c0 = (int(v) for v in torch.randint(0, h - s + 1, (2,), generator=gen))
            sign = torch.randint(0, 2, (c, 1, 1), generator=gen).float() * 2 - 1
            cand[0, :, r0 : r0 + s, c0 : c0 + s] = (
                x0[0, :, r0 : r0 + s, c0 : c0 + s] + eps * sign
            ).clamp(0, 1)
        z = ask(cand)
        if z is None:
            k = min(kmax, 2 * k)
            continue
        it += 1
        k = max(1, k // 2)
        m = margin(z)
        if m < best:
            best, cur = m, cand
    with torch.no_grad():
        real = bool(net(cur).argmax(1)[0] != y0)
    return {"queries": queries, "rejections": rejections, "success": real, "first": first}


def run_oars(mode, net, fallback, x, y, eps, budget) -> dict:
    det = QueryDetector(spec="mnist")
    rows = []
    for i in range(len(x)):
        gen = torch.Generator().manual_seed(1000 + i)
        rows.append(
            oars_square(
                net, fallback, det, f"oars-{i}", x[i : i + 1], int(y[i]), eps, budget, mode, gen
            )
        )
    return summarize_adaptive(f"OARS-style Square, {mode} rejection", rows)


def summarize_adaptive(name: str, rows: list[dict]) -> dict:
    def med(key):
        return pct([r[key] for r in rows], 50)

    succ_def = [r.get("success_with_defense", r["success"]) for r in rows]
    return {
        "attack": name,
        "n": len(rows),
        "success": sum(r["success"] for r in rows) / len(rows),
        "success_with_defense": sum(succ_def) / len(rows),
        "queries_median": med("queries"),
        "rejections_median": pct([r.get("rejections", r.get("flags", 0)) for r in rows], 50),
        "first_median": pct([r["first"] for r in rows if r.get("first")], 50),
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# cost


def cost(n_fill: int, redis_url: str | None, n_redis: int) -> dict:
    xtr, _ = load(SHARED / "data" / "mnist", split="train")
    xte, _ = load(SHARED / "data" / "mnist", split="test")
    pool = torch.cat([xtr, xte, (xtr * 0.8), (xtr.flip(3))])[:n_fill]  # distinct inputs
    det = QueryDetector(spec="mnist", capacity=n_fill, client_capacity=1000)
    t0 = time.perf_counter()
    for i in range(0, n_fill, 500):
        det.observe(f"filler{i // 5000}", pool[i : i + 500])
    fill = time.perf_counter() - t0
    mem = det.state.memory
    out = {
        "remembered": len(mem),
        "bytes_per_query": mem.nbytes / len(mem),
        "fill_seconds": fill,
    }
    probes = det.fingerprinter(xte[:1000] * 0.9)
    lat = []
    for fp in probes:
        fp = fp[fp != 0]
        t = time.perf_counter()
        mem.best(fp)
        lat.append(time.perf_counter() - t)
    out["lookup_us_median"] = pct(lat, 50) * 1e6
    out["lookup_us_p99"] = pct(lat, 99) * 1e6
    obs = []
    for i in range(500):
        t = time.perf_counter()
        det.observe("probe", xte[i : i + 1] * 0.7)
        obs.append(time.perf_counter() - t)
    out["observe_us_median"] = pct(obs, 50) * 1e6
    out["observe_us_p99"] = pct(obs, 99) * 1e6
    if redis_url:
        out["redis"] = redis_cost(pool, xte, redis_url, n_fill, n_redis)
    return out


def redis_cost(pool, xte, redis_url: str, capacity: int, n_redis: int) -> dict:
    """Redis: bytes per remembered query (used_memory growth) and observe() latency."""
    import redis

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    before = int(r.info("memory")["used_memory"])
    rd = QueryDetector(spec="mnist", state=redis_url, capacity=capacity, client_capacity=1000)
    t0 = time.perf_counter()
    for i in range(0, n_redis, 500):
        rd.observe(f"filler{i // 5000}", pool[i : i + 500])
    rfill = time.perf_counter() - t0
    used = int(r.info("memory")["used_memory"]) - before
    robs = []
    for i in range(300):
        t = time.perf_counter()
        rd.observe("probe", xte[i : i + 1] * 0.7)
        robs.append(time.perf_counter() - t)
    return {
        "remembered": n_redis,
        "bytes_per_query": used / n_redis,
        "fill_us_per_query": rfill / n_redis * 1e6,
        "observe_us_median": pct(robs, 50) * 1e6,
        "observe_us_p99": pct(robs, 99) * 1e6,
        "note": "used_memory includes the per-client memories of the 1000-query clients",
    }


def lookup_latency(n_fill: int) -> dict:
    """Lookup alone in a Memory of ``n_fill`` real MNIST fingerprints: per probe, the first time
    and the best of 5 (the best of 5 takes out the pauses a loaded machine adds)."""
    from advx.guard.queries import PRESETS, Fingerprinter, Memory

    xtr, _ = load(SHARED / "data" / "mnist", split="train")
    xte, _ = load(SHARED / "data" / "mnist", split="test")
    pool = torch.cat([xtr, xte, (xtr * 0.8), (xtr.flip(3))])[:n_fill]
    fpr = Fingerprinter(PRESETS["mnist"])
    mem = Memory(n_fill)
    t0 = time.perf_counter()
    for i in range(0, n_fill, 1000):
        for fp in fpr(pool[i : i + 1000]):
            mem.add(fp[fp != 0])
    fill = time.perf_counter() - t0
    first, best = [], []
    for fp in fpr(xte[:1000] * 0.9):
        fp = fp[fp != 0]
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            mem.best(fp)
            ts.append(time.perf_counter() - t)
        first.append(ts[0])
        best.append(min(ts))
    return {
        "remembered": len(mem),
        "bytes_per_query": mem.nbytes / len(mem),
        "fill_seconds": fill,
        "first_us_median": pct(first, 50) * 1e6,
        "first_us_p99": pct(first, 99) * 1e6,
        "best5_us_median": pct(best, 50) * 1e6,
        "best5_us_p99": pct(best, 99) * 1e6,
    }


def service_latency(net, n: int, redis_url: str | None) -> dict:
    """p50/p99 of POST /predict (one distinct digit per request, one client) with detection off,
    on (in process) and on with Redis: the servers run side by side and requests alternate."""
    import contextlib
    import socket
    import threading

    import httpx
    import uvicorn

    from advx.guard import Guard
    from advx.guard.service import create_app
    from advx.models import Classifier

    @contextlib.contextmanager
    def served(app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        th.start()
        while not server.started:
            time.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/predict"
        finally:
            server.should_exit = True
            th.join(10)
            sock.close()

    guard = Guard(Classifier(net, bounds=(0, 1)), input_shape=(1, 28, 28))
    setups = {"off": None, "on (in process)": QueryDetector(spec="mnist")}
    if redis_url:
        setups["on (Redis)"] = QueryDetector(spec="mnist", state=redis_url, prefix="svc:")
    x, _ = load(SHARED / "data" / "mnist", split="test")
    times: dict[str, list[float]] = {k: [] for k in setups}
    with contextlib.ExitStack() as stack:
        urls = {
            k: stack.enter_context(
                served(create_app(guard, name="m", queries=q, batch_window_ms=0))
            )
            for k, q in setups.items()
        }
        client = httpx.Client(headers={"X-Client-Id": "bench"}, timeout=30)
        for i in range(n + 20):
            body = {"inputs": x[i : i + 1].tolist()}
            for k, url in urls.items():
                t = time.perf_counter()
                r = client.post(url, json=body)
                dt = time.perf_counter() - t
                assert r.status_code == 200, r.text
                if i >= 20:  # warm-up
                    times[k].append(dt)
    return {
        k: {"p50_ms": pct(v, 50) * 1e3, "p99_ms": pct(v, 99) * 1e3, "n": len(v)}
        for k, v in times.items()
    }


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--adaptive-n", type=int, default=40)
    ap.add_argument("--near-n", type=int, default=2000)
    ap.add_argument("--fill", type=int, default=100_000)
    ap.add_argument("--redis", default=None, help="redis:// URL for the Redis cost figures")
    ap.add_argument("--redis-n", type=int, default=20_000)
    ap.add_argument("--service-n", type=int, default=1000)
    ap.add_argument("--parts", default="detect,fpr,adaptive,cost,service")
    ap.add_argument("--out", default="benchmarks/queries.json")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    out_path = Path(a.out)
    res: dict = json.loads(out_path.read_text()) if out_path.exists() else {}
    res["machine"] = machine()
    res["versions"] = versions()
    net = lenet(0)
    x, y = attacked_images(net, max(a.n, a.adaptive_n))
    if "detect" in parts:
        attacks = {
            "Square Linf eps=0.3, 1000 queries": advx.Square(advx.Linf(0.3), queries=1000),
            "Square Linf eps=0.15, 1000 queries": advx.Square(advx.Linf(0.15), queries=1000),
            "HopSkipJump L2 eps=3, 2000 queries": advx.HopSkipJump(advx.L2(3.0), max_queries=2000),
            "Boundary L2 eps=3, 1000 queries": advx.Boundary(advx.L2(3.0), max_queries=1000),
        }
        res["detect"] = []
        for name, atk in attacks.items():
            t0 = time.perf_counter()
            d = run_detection(name, atk, net, x[: a.n], y[: a.n])
            d["seconds"] = time.perf_counter() - t0
            print(name, {k: v for k, v in d.items() if k != "rows"}, flush=True)
            res["detect"].append(d)
    if "fpr" in parts:
        res["fpr"] = false_positives(a.near_n)
        print(res["fpr"], flush=True)
    if "adaptive" in parts:
        xa, ya = x[: a.adaptive_n], y[: a.adaptive_n]
        fallback = lenet(1)
        res["adaptive"] = [
            run_plain(net, xa, ya, EPS_ADAPTIVE, 1000),
            run_blinding(
                "noise blinding (U[-0.1, 0.1])", noise_blind, net, xa, ya, EPS_ADAPTIVE, 1000
            ),
            run_blinding("shift+brightness blinding", shift_blind, net, xa, ya, EPS_ADAPTIVE, 1000),
            run_oars("explicit", net, fallback, xa, ya, EPS_ADAPTIVE, 1000),
            run_oars("silent", net, fallback, xa, ya, EPS_ADAPTIVE, 1000),
        ]
        for d in res["adaptive"]:
            print({k: v for k, v in d.items() if k != "rows"}, flush=True)
    if "cost" in parts:
        res["cost"] = cost(a.fill, a.redis, a.redis_n)
        print(res["cost"], flush=True)
    if "redis" in parts:
        xtr, _ = load(SHARED / "data" / "mnist", split="train")
        xte, _ = load(SHARED / "data" / "mnist", split="test")
        res["redis"] = redis_cost(xtr, xte, a.redis, a.fill, a.redis_n)
        print(res["redis"], flush=True)
    if "lookup" in parts:
        res["lookup"] = lookup_latency(a.fill)
        print(res["lookup"], flush=True)
    if "service" in parts:
        res["service"] = service_latency(net, a.service_n, a.redis)
        print(res["service"], flush=True)
    out_path.write_text(json.dumps(res, indent=1))
    if not a.no_write:
        write_section("queries", render(res, a))


def render(res: dict, a) -> str:
    lines = [
        "## Guard: query-attack detection (issue 14)",
        "",
        "advx.guard.QueryDetector (Blacklight-style: MNIST preset, window 50, quantization 50, "
        "top 50 hashes, flag at > 25 shared) in the query path of the demo LeNet (4 epochs on the "
        "embedded digits), as a library object wrapped around the model (not over HTTP). Attacked "
        "images: correctly classified MNIST test images from index 5000 on. One detector per row, "
        "shared by its images; a fresh client id per image.",
        "",
        f"Command: `python benchmarks/bench_queries.py --n {a.n} --adaptive-n {a.adaptive_n}"
        + (" --redis URL" if a.redis else "")
        + "`",
        "",
        f"{res['machine']}; {res['versions']}; 2-core machine shared with other jobs.",
    ]
    if "detect" in res:
        lines += [
            "",
            "### Detection (non-adaptive attacks)",
            "",
            "Queries to first detection count every query of the attack, its clean check "
            "included. *Detected before success*: share of the successful attacks whose first "
            "flag came at or before the query that succeeded. *Success with the defense*: reject "
            "mode, the attack ends at its first flagged query. *Coverage*: share of the queries "
            "flagged from the first detection on.",
            "",
            table(
                [
                    "attack",
                    "images",
                    "detected",
                    "queries to detection, median",
                    "p90",
                    "attack queries, median",
                    "success without defense",
                    "detected before success",
                    "success with defense (reject)",
                    "coverage, median",
                ],
                [
                    [
                        d["attack"],
                        d["n"],
                        f"{d['detected']:.0%}",
                        d["first_median"],
                        d["first_p90"],
                        d["queries_median"],
                        f"{d['success']:.0%}",
                        f"{d['detected_before_success']:.0%}",
                        f"{d['success_with_defense']:.0%}",
                        f"{d['coverage_median']:.0%}",
                    ]
                    for d in res["detect"]
                ],
            ),
        ]
    if "fpr" in res:
        f = res["fpr"]
        dist = f["distinct"]
        rate = dist["flagged"] / dist["queries"]
        upper = (3 / dist["queries"]) if dist["flagged"] == 0 else math.nan
        lines += [
            "",
            "### False positives",
            "",
            f"Distinct clean images: all {dist['queries']:,} MNIST test images streamed by one "
            f"client in batches of 100: **{dist['flagged']} flagged ({rate:.3%} per query)**"
            + (f" (95% upper bound {upper:.2%})" if dist["flagged"] == 0 else "")
            + f"; {dist['seconds']:.1f} s for the stream.",
            "",
            f"Benign near-duplicates: the first {f['n_near']:,} test images, then one variant of "
            "each (a fresh detector per variant); share of the variants flagged. Blacklight's "
            "hashes do not depend on where a window sits, so a shifted copy shares nearly all "
            "its windows: shifted near-duplicates are flagged, as in Blacklight (its authors "
            "report 0.37% on crawled near-duplicate benign images; a service that expects "
            "re-sent, re-cropped images must budget for this or whitelist such clients).",
            "",
            table(
                ["variant", "flagged"],
                [[k, f"{v:.1%}"] for k, v in f["near"].items()],
            ),
        ]
    if "adaptive" in res:
        lines += [
            "",
            "### Adaptive attacks",
            "",
            f"Square Linf eps={EPS_ADAPTIVE} with 1000 queries, on the first "
            f"{res['adaptive'][0]['n']} attacked images. Blinding: each query randomly "
            "transformed before it is sent (success read on the model at the attack's point). "
            "OARS-style: the attack reads a rejection as an oracle (explicit: after a rejection "
            "it doubles the number of squares it changes and tries again; silent: flagged "
            "queries are answered by a second LeNet trained with another seed, the attacker "
            "cannot tell). *Rejections*: flagged queries per attack (explicit: refused).",
            "",
            table(
                [
                    "attack",
                    "images",
                    "success (model fooled)",
                    "success with defense",
                    "queries, median",
                    "rejections / flags, median",
                    "queries to first flag, median",
                ],
                [
                    [
                        d["attack"],
                        d["n"],
                        f"{d['success']:.0%}",
                        f"{d['success_with_defense']:.0%}",
                        d["queries_median"],
                        d["rejections_median"],
                        d["first_median"],
                    ]
                    for d in res["adaptive"]
                ],
            ),
        ]
    if "cost" in res:
        c = res["cost"]
        lines += [
            "",
            "### Cost",
            "",
            f"In process: {c['remembered']:,} distinct MNIST queries remembered (the 60,000 "
            "training and 10,000 test images, then darkened and mirrored training images): "
            f"**{c['bytes_per_query']:.0f} bytes per remembered query** (index of 50 "
            "(hash, sequence) pairs of 16 bytes; Blacklight reports 1.6 KB); filling took "
            f"{c['fill_seconds']:.1f} s. Lookup at {c['remembered']:,} remembered: "
            f"**median {c['lookup_us_median']:.0f} us, p99 {c['lookup_us_p99']:.0f} us**; one "
            f"observe() of a single query (fingerprint, both lookups, insert): median "
            f"{c['observe_us_median']:.0f} us, p99 {c['observe_us_p99']:.0f} us.",
        ]
        if "redis" in res or "redis" in c:
            r = res.get("redis") or c["redis"]
            lines += [
                "",
                f"Redis (redis-server 7.0 on the same machine, no persistence): "
                f"{r['remembered']:,} queries remembered, {r['bytes_per_query']:.0f} bytes per "
                "query (used_memory growth, per-client memories included), filling "
                f"{r['fill_us_per_query']:.0f} us per query in batches of 500; one observe() of "
                f"a single query: median {r['observe_us_median']:.0f} us, p99 "
                f"{r['observe_us_p99']:.0f} us.",
            ]
    if "lookup" in res:
        lk = res["lookup"]
        lines += [
            "",
            f"Lookup alone (a Memory filled with {lk['remembered']:,} real MNIST fingerprints in "
            f"{lk['fill_seconds']:.1f} s, {lk['bytes_per_query']:.0f} bytes per query; 1,000 "
            f"probes): first try median {lk['first_us_median']:.0f} us, p99 "
            f"{lk['first_us_p99']:.0f} us; best of 5 tries per probe (the loaded machine's "
            f"pauses taken out) median {lk['best5_us_median']:.0f} us, p99 "
            f"{lk['best5_us_p99']:.0f} us.",
        ]
    if "service" in res:
        lines += [
            "",
            "Service latency, POST /predict of one distinct digit per request (one client, "
            "servers side by side in one process, requests alternating, no dynamic batching): "
            + "; ".join(
                f"detection {k}: p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms (n={v['n']})"
                for k, v in res["service"].items()
            )
            + ".",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
