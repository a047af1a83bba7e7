"""``advx guard status`` and ``advx guard canary``: watch a served guard from outside.

``status`` reads ``/health`` (versions, recent rates, the anytime-valid drift verdicts) and exits
1 when a drift alarm is up, so a cron job or a CI step can act on it. ``canary`` attacks the live
``/predict`` with advx's own black-box attacks and reports how many of the adversarial examples
that fool the model the guard still refuses to accept: a measured detection rate, taken against
the deployment as it runs.
"""

from __future__ import annotations

import time
from typing import Any

import click

from .._io import check_writable, write_json
from .._provenance import now
from ..errors import InputError, ModelError
from ..models._base import Access
from ._common import emit_json, info
from .guard import guard_group

_DEFAULT_THREAT = {"square": "linf:0.3", "hopskipjump": "l2:3", "boundary": "l2:3"}
_ACCESS: dict[str, Access] = {"square": "scores", "hopskipjump": "labels", "boundary": "labels"}


def _base(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise InputError(f"--url: expected http://HOST:PORT, got {url!r}")
    for suffix in ("/predict", "/health"):
        url = url.removesuffix(suffix)
    return url


def _headers(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in pairs:
        k, sep, v = p.partition(":")
        if not sep or not k.strip():
            raise InputError(f"--header: expected 'Name: value', got {p!r}")
        out[k.strip()] = v.strip()
    return out


def _get_json(client: Any, url: str) -> dict[str, Any]:
    import httpx

    try:
        r = client.get(url)
    except httpx.HTTPError as e:
        raise InputError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        raise InputError(f"{url} answered {r.status_code}: {r.text[:200]}")
    try:
        return r.json()
    except ValueError:
        raise InputError(f"{url} did not answer JSON: {r.text[:200]!r}") from None


@guard_group.command("status")
@click.option("--url", required=True, help="The served guard, e.g. http://127.0.0.1:8000.")
@click.option("--header", "headers", multiple=True, help="Extra header, 'Name: value'.")
@click.option("--timeout", type=click.FloatRange(0.1, 600), default=10.0, show_default=True)
def status_cmd(url: str, headers: tuple[str, ...], timeout: float) -> None:
    """Health, versions and drift verdicts of a served guard (exit 1 on a drift alarm)."""
    import httpx

    base = _base(url)
    with httpx.Client(timeout=timeout, headers=_headers(headers)) as client:
        health = _get_json(client, f"{base}/health")
    drift = health.get("drift") or {}
    alarms = sorted(k for k, v in drift.items() if v.get("drift"))
    info(
        f"{health.get('model')}: {health.get('status')}, model {health.get('model_version')}, "
        f"policy {health.get('policy_hash')}"
    )
    for k, v in sorted(drift.items()):
        obs = v.get("observed_rate")
        info(
            f"  {k} rate: {'n/a' if obs is None else f'{obs:.3g}'} in this epoch "
            f"(calibrated {v.get('expected_rate'):.3g}); e-value {v.get('evalue'):.3g} of "
            f"{v.get('threshold'):.3g} -> {'DRIFT' if v.get('drift') else 'ok'}"
        )
    if not drift:
        info("  no drift test: the policy states no calibrated rate")
    emit_json({"url": base, "health": health, "drift_alarms": alarms})
    if alarms:
        raise SystemExit(1)


@guard_group.command("canary")
@click.option("--url", required=True, help="The served guard, e.g. http://127.0.0.1:8000.")
@click.option("--data", default="mnist-demo", show_default=True, help="Clean inputs to attack.")
@click.option("--split", default="test", show_default=True)
@click.option(
    "--attack",
    "attack_name",
    type=click.Choice(sorted(_ACCESS)),
    default="square",
    show_default=True,
)
@click.option(
    "-n",
    "--n",
    "n",
    type=click.IntRange(1, 10_000),
    default=20,
    show_default=True,
    help="Clean inputs to start from.",
)
@click.option(
    "--threat",
    "threat_spec",
    default=None,
    help="NORM:EPS (default: linf:0.3 for square, l2:3 for the decision attacks).",
)
@click.option(
    "--queries",
    type=click.IntRange(1),
    default=500,
    show_default=True,
    help="Query budget per input.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--header",
    "headers",
    multiple=True,
    help="Extra header, 'Name: value' (e.g. 'Authorization: Bearer KEY').",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the report here (JSON, with the time): keep one per run to follow the "
    "detection rate over time.",
)
@click.option(
    "--fail-under",
    type=click.FloatRange(0, 1),
    default=None,
    help="Exit 1 when the share caught is below this.",
)
def canary_cmd(
    url, data, split, attack_name, n, threat_spec, queries, seed, headers, out, fail_under
) -> None:
    """Attack the live guard with advx's black-box attacks; report how many it still catches."""
    import httpx
    import torch

    from .. import attacks
    from ..data import load
    from ..models import BlackBox
    from ..threat import parse_threat

    base = _base(url)
    if out is not None:
        check_writable(out, name="out")
    hdrs = {"X-Client-Id": "advx-canary", **_headers(headers)}
    threat = parse_threat(threat_spec or _DEFAULT_THREAT[attack_name])
    budget = {"square": {"queries": queries}}.get(attack_name, {"max_queries": queries})
    attack = attacks.create(attack_name, threat, seed=seed, **budget)
    x, y = load(data, split=split, n=n)

    client = httpx.Client(timeout=60, headers=hdrs)

    def ask(xs: torch.Tensor) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for chunk in xs.split(64):
            try:
                r = client.post(f"{base}/predict", json={"inputs": chunk.tolist()})
            except httpx.HTTPError as e:
                raise InputError(f"cannot reach {base}/predict: {e}") from None
            if r.status_code != 200:
                raise InputError(f"{base}/predict answered {r.status_code}: {r.text[:200]}")
            out.extend(r.json()["decisions"])
        return out

    t0 = time.perf_counter()
    clean = ask(x)
    # only inputs the guard accepts and labels correctly are worth attacking: the rest are
    # already refused or already wrong
    keep = torch.tensor(
        [d["action"] == "accept" and d["label"] == int(t) for d, t in zip(clean, y, strict=True)]
    )
    xa, ya = x[keep], y[keep]
    report: dict[str, Any] = {
        "url": base,
        "attack": attack_name,
        "threat": str(threat_spec or _DEFAULT_THREAT[attack_name]),
        "queries_per_input": queries,
        "n": len(x),
        "clean_accepted_correct": int(keep.sum()),
        "fooled_model": 0,
        "caught": 0,
        "evaded": 0,
        "caught_rate": None,
        "by_action": {},
        "stopped_by_service": None,
    }
    if len(xa):
        box = BlackBox.from_http(
            f"{base}/predict", kind=_ACCESS[attack_name], headers=hdrs, timeout=60, retries=1
        )
        info(f"canary: {attack_name} on {len(xa)} accepted inputs, {queries} queries each ...")
        try:
            res = attack(box, xa, ya)
        except ModelError as e:  # the service refused the attacker (budget, query detection)
            report["stopped_by_service"] = str(e)[:300]
            res = None
        if res is not None:
            fooled = res.success
            report["fooled_model"] = int(fooled.sum())
            report["median_queries"] = float(res.queries.float().median())
            if bool(fooled.any()):
                verdicts = ask(res.x_adv[fooled])
                by: dict[str, int] = {}
                for d in verdicts:
                    by[d["action"]] = by.get(d["action"], 0) + 1
                yf = ya[fooled]
                evaded = sum(
                    d["action"] == "accept" and d["label"] != int(t)
                    for d, t in zip(verdicts, yf, strict=True)
                )
                report["by_action"] = by
                report["caught"] = sum(d["action"] != "accept" for d in verdicts)
                report["evaded"] = int(evaded)
                report["caught_rate"] = report["caught"] / len(verdicts)
    client.close()
    report["seconds"] = round(time.perf_counter() - t0, 2)
    rate = report["caught_rate"]
    if report["stopped_by_service"]:
        info(f"canary: the service stopped the attack: {report['stopped_by_service'][:120]}")
    else:
        info(
            f"canary: {report['fooled_model']} of {report['clean_accepted_correct']} fooled the "
            f"model; the guard caught {report['caught']}"
            + ("" if rate is None else f" ({rate:.0%}), {report['evaded']} evaded it")
        )
    report["time"] = now()
    emit_json(report)
    if out is not None:
        write_json(out, report)
    if fail_under is not None and rate is not None and rate < fail_under:
        raise SystemExit(1)
