#!/usr/bin/env bash
# Issue 15's GPU figures in one prepared run, for a session lent a GPU (about 8 minutes on an
# H100; never run in CI). Run from the repository root, with ../shared's data and models
# reachable (ADVX_SHARED=<folder> where the checkout has no ../shared), torchattacks 3.5.1
# installed, and OUT set to the folder the results go to:
#
#     OUT=$OUT bash benchmarks/gpu_issue15.sh
#
# 1. TRADES SmallCNN, 1,000 MNIST points: torchattacks' AutoAttack, the same cascade at the
#    paper's 100 steps, advx `standard` and `fast` at the device's settings, and both again with
#    issue 15's items 3 and 4 off (compaction every step, targets one at a time);
# 2. CIFAR-10 ResNet-20, 1,000 points: AutoAttack, `standard`, `fast`;
# 3. a cProfile of `standard` on the SmallCNN.
# Each part stops at its --deadline; the markdown and JSON land in $OUT/<part>/.
set -u
OUT=${OUT:-gpu-results}
python benchmarks/bench_gpu.py --n 1000 --parts audit --deadline 200 \
  --audit-variants standard,fast,ta100,standard-eager,fast-eager --out "$OUT/trades"
python benchmarks/bench_gpu.py --n 1000 --model resnet20 --parts audit --deadline 150 \
  --audit-variants standard,fast --out "$OUT/resnet20"
python benchmarks/bench_gpu.py --n 1000 --parts profile --deadline 60 --out "$OUT/profile"
cat "$OUT"/*/gpu.md
