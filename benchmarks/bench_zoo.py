"""Zoo target: the CIFAR-10 ResNet-20 saved in timm's hub layout (config.json with its
pretrained_cfg beside model.safetensors) and loaded back with ``--model timm:DIR`` gives the same
logits as the hand-declared Classifier, with the preprocessing read from the config.

    python benchmarks/bench_zoo.py
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from _common import (
    CIFAR_MEAN,
    CIFAR_STD,
    SHARED,
    advx,
    build,
    cifar_balanced,
    machine,
    write_section,
)

from advx.zoo import hub

N = int(os.environ.get("ZOO_N", "10000"))  # ZOO_N=1000: every 10th test image


def logits(clf, x, batch=500):
    return torch.cat([clf(x[i : i + batch]) for i in range(0, len(x), batch)])


def main() -> None:
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # a shared 2-core machine: a second thread only waits
    x, y = cifar_balanced(N)
    net = build("resnet20", weights=SHARED / "models" / "akamaster_cifar10_resnet20.th")
    hand = advx.Classifier(net, mean=CIFAR_MEAN, std=CIFAR_STD, batch_size=250)
    with tempfile.TemporaryDirectory() as tmp:
        folder = hub.save(
            hand, Path(tmp) / "resnet20", architecture="resnet20", input_size=(3, 32, 32)
        )
        config = json.loads((folder / "config.json").read_text())
        zoo = build(f"timm:{folder}")  # what --model timm:DIR builds: no --mean/--std typed
        zoo.batch_size = 250
        prep = hub.preprocessing_of(zoo.net)
        a, b = logits(hand, x), logits(zoo, x)
    same = torch.equal(a, b)
    diff = float((a - b).abs().max())
    acc_hand = float((a.argmax(1) == y).float().mean())
    acc_zoo = float((b.argmax(1) == y).float().mean())
    elapsed = time.perf_counter() - t0
    load_after = os.getloadavg()
    subset = (
        f"all {len(x):,} CIFAR-10 test images"
        if len(x) == 10000
        else f"{len(x):,} CIFAR-10 test images (every {10000 // len(x)}th)"
    )
    md = f"""## Zoo: the ResNet-20 from a timm-layout folder, preprocessing read from its config

`python benchmarks/bench_zoo.py` ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC,
{machine()}, load {load_before[0]:.1f} before / {load_after[0]:.1f} after, {elapsed:.0f} s).
`../shared/models/akamaster_cifar10_resnet20.th` as the hand-declared
`Classifier(net, mean={CIFAR_MEAN}, std={CIFAR_STD})`, written with `advx.zoo.hub.save` as
config.json (`"architecture": "resnet20"`, `pretrained_cfg` =
{json.dumps(config["pretrained_cfg"])}) plus model.safetensors, and loaded back with
`build("timm:DIR")` (what `--model timm:DIR` does; the input space it reported: bounds
{prep.bounds}, mean {prep.mean}, std {prep.std}, input size {prep.input_size}).

| {subset} | value |
|---|---|
| logits identical (`torch.equal`) | {same} |
| max abs logit difference | {diff:.3g} |
| clean accuracy, hand-declared | {acc_hand:.4f} |
| clean accuracy, from the config | {acc_zoo:.4f} |

timm itself is not importable on this machine (no CPU build of torchvision for torch 2.13.0 is
available here: the only wheel, 0.28.0+cu130, needs libc10_cuda.so, and timm imports
torchvision), so the folder names an advx architecture, which advx builds without timm; a folder
naming a timm architecture goes through `timm.create_model` with the same config reading.
"""
    write_section("bench_zoo", md)
    print(md)


if __name__ == "__main__":
    main()
