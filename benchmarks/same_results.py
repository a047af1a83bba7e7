"""One row per area, run on the source tree given, to show that a refactor changed no result.

    git archive REV src benchmarks | tar -x -C /tmp/REV   # for each revision to compare
    python benchmarks/same_results.py /tmp/REV            # prints one JSON line

PGD-40, APGD-CE, Square-300 and FAB-L2 on the first 200 MNIST test images against the TRADES
SmallCNN (../shared), then a `fast` audit of the first 100: robust accuracy, the sha256 of
``x_adv`` (its first 16 hex digits) and the passes spent. Equal lines: the same bits.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import torch


def main() -> None:
    tree = sys.argv[1]
    sys.path[:0] = [tree + "/src", tree + "/benchmarks"]
    torch.set_num_threads(1)
    from _common import mnist_test, trades_smallcnn

    import advx

    model = advx.Classifier(trades_smallcnn(), bounds=(0, 1))
    x, y = mnist_test(200)
    out: dict[str, dict] = {}
    attacks = {
        "pgd40": advx.PGD(advx.Linf(0.3), steps=40, step_size=0.01),
        "apgd_ce": advx.APGD(advx.Linf(0.3), steps=100),
        "square300": advx.Square(advx.Linf(0.3), queries=300),
        "fab_l2": advx.FAB(advx.L2(2.0), steps=20),
    }
    for name, attack in attacks.items():
        t = time.perf_counter()
        r = attack(model, x, y)
        digest = hashlib.sha256(r.x_adv.detach().cpu().contiguous().numpy().tobytes())
        out[name] = {
            "robust": float((~r.success).float().mean()),
            "x_adv": digest.hexdigest()[:16],
            "queries": int(r.queries.sum()),
            "grads": int(r.grads.sum()),
            "s": round(time.perf_counter() - t, 1),
        }
    t = time.perf_counter()
    rep = advx.audit(
        model, x[:100], y[:100], advx.Linf(0.3), suite="fast", checks=False, eps_curve=None
    )
    data = rep.to_dict() if hasattr(rep, "to_dict") else dict(rep.data)
    out["audit_fast"] = {
        "robust": data.get("robust_accuracy"),
        "s": round(time.perf_counter() - t, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
