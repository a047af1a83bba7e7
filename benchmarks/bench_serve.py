"""Serving load and fuzzing of the guard's HTTP service (issue 13).

Load: the demo CNN (``advx.zoo.build("lenet")``, untrained weights: the answer does not matter
for load) served by uvicorn in its own process; a bounded asyncio client (raw HTTP/1.1,
kept-alive) with 16 concurrent connections on loopback sends one input per request through
both protocols (advx ``/predict`` JSON; Open Inference Protocol v2 with a binary tensor, as
tritonclient sends it). Configurations: the guard on (feature squeezing + a confidence floor)
or off (validation only), dynamic batching on (window 2 ms, up to 64) or off (one request per
model pass).

Fuzzing: schemathesis (positive and negative cases from /openapi.json) plus hand-written
hostile bodies and random mutations of valid ones; counts of every status, 5xx must be 0, and
the server must still answer /health and a valid request afterwards.

    python benchmarks/bench_serve.py --requests 1600 --write
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

SHAPE = (1, 28, 28)


# -- the server side (a subprocess) ---------------------------------------------------------------


def build_app(guard_on: str, max_batch: int, window_ms: float):
    import torch

    import advx
    from advx.defenses import FeatureSqueezing
    from advx.guard import Guard, Policy
    from advx.guard.registry import build_detector
    from advx.guard.service import create_app
    from advx.models import Classifier

    torch.manual_seed(0)
    # one intra-op thread: the load generator shares the two cores (and so do other jobs)
    torch.set_num_threads(1)
    model = Classifier(advx.zoo.build("lenet").eval(), bounds=(0, 1))
    if guard_on == "on":
        guard = Guard(
            model,
            detectors=[FeatureSqueezing(model)],
            policy=Policy(thresholds={"feature_squeezing": 0.5}, min_confidence=0.5),
            input_shape=SHAPE,
        )
    elif guard_on == "energy":  # a detector of the logits: one more forward pass, no squeezing
        guard = Guard(
            model,
            detectors={"energy": build_detector("energy", model)},
            policy=Policy(thresholds={"energy": 0.0}, min_confidence=0.5),
            input_shape=SHAPE,
        )
    else:  # validation only: shape, NaN/Inf, bounds; no detector, no abstention
        guard = Guard(model, policy=Policy(min_confidence=0.0), input_shape=SHAPE)
    return create_app(guard, name="lenet", max_batch=max_batch, batch_window_ms=window_ms)


def run_server(args) -> None:
    import uvicorn

    app = build_app(args.guard, args.max_batch, args.window_ms)
    # uvloop and httptools when installed (uvicorn's "auto"), as advx serve runs
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, guard: str, max_batch: int, window_ms: float = 2.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            __file__,
            "serve",
            "--port",
            str(self.port),
            "--guard",
            guard,
            "--max-batch",
            str(max_batch),
            "--window-ms",
            str(window_ms),
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)

    def __enter__(self) -> Server:
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode())
        raise RuntimeError("server did not start")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- load ---------------------------------------------------------------------------------------


def bodies(protocol: str, n: int = 64) -> list[tuple[str, bytes, dict[str, str]]]:
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        x = rng.random((1, *SHAPE), dtype=np.float32)
        if protocol == "predict":
            out.append(
                (
                    "/predict",
                    json.dumps({"inputs": x.tolist()}).encode(),
                    {"content-type": "application/json"},
                )
            )
        else:  # v2 with the binary tensor extension, as tritonclient sends it by default
            raw = x.astype("<f4").tobytes()
            head = json.dumps(
                {
                    "inputs": [
                        {
                            "name": "input",
                            "shape": list(x.shape),
                            "datatype": "FP32",
                            "parameters": {"binary_data_size": len(raw)},
                        }
                    ],
                    "parameters": {"binary_data_output": True},
                }
            ).encode()
            out.append(
                (
                    "/v2/models/lenet/infer",
                    head + raw,
                    {
                        "Inference-Header-Content-Length": str(len(head)),
                        "content-type": "application/octet-stream",
                    },
                )
            )
    return out


async def _post(reader, writer, request: bytes) -> int:
    """One HTTP/1.1 request on a kept-alive connection; returns the status (body read whole)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def load(url: str, protocol: str, total: int, clients: int) -> dict:
    """``clients`` kept-alive connections, each sending its requests one after another until
    ``total`` are done. A hand-rolled HTTP/1.1 client: on two loaded cores httpx's own CPU cost
    capped the measurement (about 90 trivial GETs per second), not the server."""
    host, port = url.removeprefix("http://").split(":")
    reqs = []
    for path, body, headers in bodies(protocol):
        lines = [
            f"POST {path} HTTP/1.1",
            f"Host: {host}:{port}",
            f"Content-Length: {len(body)}",
        ] + [f"{k}: {v}" for k, v in headers.items()]
        reqs.append(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    lat: list[float] = []
    failed: dict[str, int] = {}
    counter = iter(range(total))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            await _post(reader, writer, reqs[0])  # warm-up, not counted
            await ready.wait()
            for i in counter:
                t0 = time.perf_counter()
                try:
                    code = await _post(reader, writer, reqs[i % len(reqs)])
                except (OSError, asyncio.IncompleteReadError) as e:
                    failed[type(e).__name__] = failed.get(type(e).__name__, 0) + 1
                    reader, writer = await asyncio.open_connection(host, int(port))
                    continue
                if code == 200:
                    lat.append(time.perf_counter() - t0)
                else:
                    failed[str(code)] = failed.get(str(code), 0) + 1
        finally:
            writer.close()

    ready = asyncio.Event()
    tasks = [asyncio.create_task(worker()) for _ in range(clients)]
    await asyncio.sleep(0.5)  # connections open and warmed
    t0 = time.perf_counter()
    ready.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "requests": total,
        "ok": len(lat),
        "failed": failed,
        "rps": len(lat) / wall,
        "p50_ms": 1000 * statistics.median(lat) if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "seconds": wall,
    }


def batch_stats(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"{url}/metrics").text
    vals = {}
    for line in text.splitlines():
        for k in ("advx_batch_size_count", "advx_batch_size_sum"):
            if line.startswith(k + " "):
                vals[k] = float(line.split()[1])
    return vals.get("advx_batch_size_count", 0), vals.get("advx_batch_size_sum", 0)


def run_load(args) -> list[dict]:
    configs = [("on", 64), ("off", 64), ("energy", 64), ("on", 1)]
    rows = []
    # repeats outermost: a burst of load from other jobs then hits every configuration alike
    for rep in range(args.repeats):
        for protocol in ("predict", "v2"):
            for guard, max_batch in configs:
                with Server(guard, max_batch) as srv:
                    res = asyncio.run(load(srv.url, protocol, args.requests, args.clients))
                    passes, inputs = batch_stats(srv.url)
                res.update(
                    protocol=protocol,
                    guard=guard,
                    batching=max_batch > 1,
                    rep=rep,
                    mean_batch=inputs / passes if passes else None,
                )
                print(json.dumps(res), flush=True)
                rows.append(res)
    return rows


# -- fuzzing ------------------------------------------------------------------------------------

HOSTILE: list[tuple[bytes, str | None]] = [
    (b"", "application/json"),
    (b"{", "application/json"),
    (b'{"inputs": [[[0.1, 0.2', "application/json"),
    (b"[1, 2, 3]", "application/json"),
    (b'{"inputs": "x"}', "application/json"),
    (b'{"inputs": {"a": 1}}', "application/json"),
    (b'{"inputs": []}', "application/json"),
    (b'{"inputs": [[[[[[1]]]]]]}', "application/json"),
    (b'{"inputs": [[1e309]]}', "application/json"),
    (b'{"inputs": [[NaN]]}', "application/json"),
    (b'{"inputs": [[Infinity]]}', "application/json"),
    (b'{"inputs": [[' + b"9" * 5000 + b"]]}", "application/json"),
    (b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "application/json"),
    (b'{"inputs": [' + b",".join([b"[0]"] * 20_000) + b"]}", "application/json"),
    (b'{"inputs": [[0.5]]}', "text/plain"),
    (b"\xff\xfe\xfa\x00", "application/json"),
    ('{"inputs": [[0.5]]}'.encode("utf-16"), "application/json"),
    (b"null", "application/json"),
    (b'{"inputs": [["a"]]}', "application/json"),
    (b'{"inputs": [[true]]}', None),
]


def mutations(valid: bytes, rng: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        kind = rng.randrange(4)
        b = bytearray(valid)
        if kind == 0:  # truncate
            b = b[: rng.randrange(len(b))]
        elif kind == 1:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == 2:  # splice in junk
            i = rng.randrange(len(b))
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        else:  # duplicate a slice (nesting and lengths go wrong)
            i, j = sorted(rng.sample(range(len(b)), 2))
            b[i:i] = b[i:j]
        out.append(bytes(b))
    return out


def run_fuzz(args) -> dict:
    import httpx
    import numpy as np
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    counts: dict[str, dict[int, int]] = {
        "schemathesis": {},
        "hostile": {},
        "mutations": {},
        "v2 mutations": {},
    }

    def note(src: str, code: int) -> None:
        counts[src][code] = counts[src].get(code, 0) + 1

    with Server("on", 64) as srv:
        url = srv.url
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        for result in schema.get_all_operations():
            op = result.ok()
            for mode in schemathesis.GenerationMode:

                @given(case=op.as_strategy(generation_mode=mode))
                @settings(
                    max_examples=args.fuzz_examples,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
                def one(case):
                    note("schemathesis", case.call(base_url=url, timeout=30).status_code)

                try:
                    one()
                except Unsatisfiable:
                    pass
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(args.hostile_rounds):
                for body, ctype in HOSTILE:
                    h = {} if ctype is None else {"content-type": ctype}
                    note("hostile", client.post("/predict", content=body, headers=h).status_code)
            rng = random.Random(0)
            x = np.random.default_rng(0).random((2, *SHAPE)).round(3)
            valid = json.dumps({"inputs": x.tolist()}).encode()
            for body in mutations(valid, rng, args.mutations):
                r = client.post(
                    "/predict", content=body, headers={"content-type": "application/json"}
                )
                note("mutations", r.status_code)
            path, vbody, vh = bodies("v2", 1)[0]
            for body in mutations(vbody, rng, args.mutations):
                note("v2 mutations", client.post(path, content=body, headers=vh).status_code)
            health = client.get("/health").status_code
            after = client.post(
                "/predict", content=valid, headers={"content-type": "application/json"}
            ).status_code
    total = sum(sum(c.values()) for c in counts.values())
    server_errors = sum(v for c in counts.values() for k, v in c.items() if k >= 500)
    return {
        "counts": counts,
        "total": total,
        "server_errors": server_errors,
        "health_after": health,
        "valid_after": after,
    }


# -- report -------------------------------------------------------------------------------------


def report(rows: list[dict], fuzz: dict | None, args) -> str:
    from _common import machine, table, versions

    def med(protocol, guard, batching, key):
        vals = [
            r[key]
            for r in rows
            if r["protocol"] == protocol
            and r["guard"] == guard
            and r["batching"] == batching
            and r[key] is not None
        ]
        return statistics.median(vals) if vals else float("nan")

    lines = ["## Guard: serving load and fuzzing (issue 13)", ""]
    lines.append(
        f'The demo CNN (`advx.zoo.build("lenet")`, untrained weights) served by `create_app` '
        f"under uvicorn (uvloop, httptools) in its own process; a bounded asyncio HTTP/1.1 client "
        f"(hand-rolled, kept-alive connections: httpx's own CPU cost capped the figures), "
        f"{args.clients} "
        f"concurrent connections on loopback, {args.requests} requests of one input each per "
        f"run, median of {args.repeats} run(s), server and client on the same machine "
        f"({machine()}; shared with other jobs, so absolute figures are noisy). Guard on: "
        "FeatureSqueezing (1-bit, 2x2 median; three extra model passes) + confidence floor "
        "0.5, or the energy OOD score (one extra pass) + the floor; off: validation only "
        "(shape, NaN/Inf, bounds). The server process runs torch with one intra-op thread. "
        "Batching: window 2 ms, up to 64 inputs per pass; without: "
        "one request per pass. v2 requests carry a binary FP32 tensor (tritonclient's default)."
    )
    lines += [
        "",
        f"Command: `python benchmarks/bench_serve.py --requests {args.requests} "
        f"--repeats {args.repeats} --write`",
        "",
    ]
    hdr = ["protocol", "guard", "batching", "req/s", "p50 ms", "p99 ms", "mean batch", "failed"]
    trs = []
    for protocol in ("predict", "v2"):
        for guard, batching in (("off", True), ("energy", True), ("on", True), ("on", False)):
            sel = [
                r
                for r in rows
                if r["protocol"] == protocol and r["guard"] == guard and r["batching"] == batching
            ]
            failed = sum(sum(r["failed"].values()) for r in sel)
            trs.append(
                [
                    protocol,
                    guard,
                    "yes" if batching else "no",
                    med(protocol, guard, batching, "rps"),
                    med(protocol, guard, batching, "p50_ms"),
                    med(protocol, guard, batching, "p99_ms"),
                    med(protocol, guard, batching, "mean_batch"),
                    failed,
                ]
            )
    lines.append(table(hdr, trs))
    lines.append("")
    rat = []
    for protocol in ("predict", "v2"):
        off = med(protocol, "off", True, "rps")
        over = off / med(protocol, "on", True, "rps")
        over_e = off / med(protocol, "energy", True, "rps")
        over_p50 = med(protocol, "on", True, "p50_ms") / med(protocol, "off", True, "p50_ms")
        gain = med(protocol, "on", True, "rps") / med(protocol, "on", False, "rps")
        rat.append([protocol, over, over_e, over_p50, gain])
    lines.append(
        table(
            [
                "protocol",
                "guard overhead, squeezing (req/s off / on; target <= 1.3)",
                "guard overhead, energy",
                "p50 squeezing / off",
                "batching gain (req/s, squeezing guard; target >= 2)",
            ],
            rat,
        )
    )
    total_failed = sum(sum(r["failed"].values()) for r in rows)
    total_req = sum(r["requests"] for r in rows)
    lines += ["", f"Requests lost or failed: {total_failed} of {total_req}."]
    if fuzz is not None:
        lines += [
            "",
            "Fuzzing (guard on, batching on): schemathesis "
            f"({args.fuzz_examples} examples per operation and mode, positive and "
            f"negative), {len(HOSTILE)} hostile bodies x {args.hostile_rounds}, "
            f"{args.mutations} random mutations of a valid /predict body and of a valid "
            "binary v2 body.",
            "",
        ]
        frows = []
        for src, c in fuzz["counts"].items():
            frows.append(
                [
                    src,
                    sum(c.values()),
                    ", ".join(f"{k}: {v}" for k, v in sorted(c.items())),
                    sum(v for k, v in c.items() if k >= 500),
                ]
            )
        lines.append(table(["source", "requests", "statuses", "5xx"], frows))
        lines += [
            "",
            f"Total {fuzz['total']} requests, {fuzz['server_errors']} server errors; "
            f"afterwards /health answered {fuzz['health_after']} and a valid request "
            f"{fuzz['valid_after']}.",
        ]
    lines += ["", f"Versions: {versions('uvicorn', 'starlette', 'httpx', 'schemathesis')}."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--guard", choices=["on", "energy", "off"], default="on")
    s.add_argument("--max-batch", type=int, default=64)
    s.add_argument("--window-ms", type=float, default=2.0)
    p.add_argument("--requests", type=int, default=1600)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--fuzz-examples", type=int, default=150)
    p.add_argument("--hostile-rounds", type=int, default=25)
    p.add_argument("--mutations", type=int, default=1000)
    p.add_argument("--no-fuzz", action="store_true")
    p.add_argument("--no-load", action="store_true")
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    if args.cmd == "serve":
        run_server(args)
        return
    rows = [] if args.no_load else run_load(args)
    fuzz = None if args.no_fuzz else run_fuzz(args)
    if fuzz is not None:
        print(json.dumps({k: v for k, v in fuzz.items()}, default=str), flush=True)
    md = report(rows, fuzz, args)
    print(md)
    if args.write:
        from _common import write_section

        write_section("guard-serve", md)


if __name__ == "__main__":
    main()
