"""Data-parallel training: K processes train the weights one process would."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from advx.cli import cli
from advx.training.distributed import Group, batches
from advx.zoo import load


@pytest.mark.parametrize("n, batch, world", [(103, 20, 2), (10, 8, 4), (64, 16, 4), (7, 3, 3)])
def test_the_ranks_shares_make_up_the_single_process_batches(n, batch, world):
    single = list(batches(Group(0, 1), n, batch, seed=5, epoch=2))
    shares = [list(batches(Group(r, world), n, batch, seed=5, epoch=2)) for r in range(world)]
    assert all(len(s) == len(single) for s in shares)  # every rank joins every step
    for t, (rows, size) in enumerate(single):
        parts = [s[t][0] for s in shares]
        assert all(s[t][1] == size == rows.numel() for s in shares)
        assert torch.equal(
            torch.cat(parts).sort().values, rows.sort().values
        )  # no repeats, none lost


def test_an_uneven_batch_size_is_refused():
    from advx.errors import InputError

    with pytest.raises(InputError, match="multiple of 3"):
        list(batches(Group(0, 3), 10, 8, seed=0, epoch=0))


FACTORY = "import advx\ndef make():\n    return advx.zoo.build('wong_cnn').double()\n"
ARGS = [
    "train",
    "-n",
    "230",
    "--recipe",
    "fgsm-rs",
    "--threat",
    "linf:0.1",
    "--epochs",
    "2",
    "--batch-size",
    "20",
    "--lr",
    "2e-3",
    "--lr-schedule",
    "cyclic",
    "--audit-n",
    "0",
    "--seed",
    "3",
]


def test_torchrun_with_two_processes_trains_the_weights_of_one(tmp_path):
    """230 samples, 23 held out for the monitor: 207 to train on, so the last global batch (7)
    does not split evenly and the sampler pads -- the padding must not count.

    In float64, so that the comparison is exact up to rounding: in float32 the two runs differ
    by rounding in the gradients (the processes sum them in another order), and FGSM's sign()
    turns a rounding difference in a near-zero gradient component into a whole step, which
    training then amplifies (measured: 2e-3 after 120 steps in float32, 5e-15 in float64)."""
    (tmp_path / "net.py").write_text(FACTORY)
    args = [*ARGS, "--model", f"{tmp_path / 'net.py'}:make"]
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "one")], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADVX_PROGRESS": "0"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "advx",
        *args,
        "--out",
        str(tmp_path / "two"),
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = load(tmp_path / "one").net.state_dict(), load(tmp_path / "two").net.state_dict()
    for k in one:
        assert one[k].dtype == torch.float64
        assert torch.allclose(one[k], two[k], atol=1e-12, rtol=0), (
            k,
            float((one[k] - two[k]).abs().max()),
        )
    import json

    side = json.loads((tmp_path / "two" / "checkpoint.json").read_text())
    assert side["training"]["processes"] == 2
    h1 = json.loads((tmp_path / "one" / "checkpoint.json").read_text())["metrics"]
    # the monitor is split across the processes and summed: the same numbers
    assert [e["monitor_adv_accuracy"] for e in side["metrics"]] == [
        e["monitor_adv_accuracy"] for e in h1
    ]
