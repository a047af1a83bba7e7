"""The audit: cascade semantics, determinism, resume, suites, sanity checks, the report."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import advx
from advx.audit import load_suite
from advx.audit.checks import check_curve
from advx.errors import InputError

EPS = 0.1


def small_suite():
    # the last stage is gated (only the surviving samples closest to the boundary): the batch-size,
    # resume and report tests below then cover the margins too
    return [
        advx.FGSM(advx.Linf(EPS)),
        advx.PGD(advx.Linf(EPS), steps=10),
        {"name": "pgd", "steps": 20, "loss": "margin", "closest": 0.5},
    ]


@pytest.fixture(scope="module")
def data(mnist_test):
    x, y = mnist_test
    return x[:120], y[:120]


@pytest.fixture(scope="module")
def report(trained_mlp, data):
    x, y = data
    return advx.audit(
        trained_mlp, x, y, advx.Linf(EPS), suite=small_suite(), eps_curve=[0.05, 0.1, 0.2]
    )


def test_cascade_numbers_add_up(report, trained_mlp, data):
    x, y = data
    s = report.samples
    clean = torch.tensor(s.clean_correct)
    robust = torch.tensor(s.robust)
    broken = torch.tensor(s.broken_by)
    with torch.no_grad():
        assert torch.equal(clean, trained_mlp(x).argmax(1) == y)
    assert report.clean_accuracy == pytest.approx(float(clean.float().mean()))
    assert report.robust_accuracy == pytest.approx(float(robust.float().mean()))
    assert torch.equal(robust, clean & (broken < 0))
    assert not bool((broken[~clean] >= 0).any())  # misclassified points are never attacked
    after = [stage.robust_accuracy_after for stage in report.cascade]
    assert after == sorted(after, reverse=True) and after[-1] == report.robust_accuracy
    assert sum(stage.broke for stage in report.cascade) == int((broken >= 0).sum())
    assert report.totals.queries == sum(s.queries) and report.totals.grads == sum(s.grads)
    assert 0 < report.robust_accuracy < report.clean_accuracy  # the MLP breaks at 0.1, partly
    assert sum(c.n for c in report.per_class) == len(y)


def test_report_is_versioned_json_with_provenance(report, tmp_path):
    d = json.loads(report.to_json())
    assert d["schema"] == "advx-report/2"
    for key in ("advx", "torch", "python", "device", "seed"):
        assert key in d["provenance"]
    assert len(d["model"]["sha256"]) == 64 and len(d["data"]["sha256"]) == 64
    assert d["eps_curve"]["eps"] == [0.05, 0.1, 0.2] and d["eps_curve"]["large_eps"] == 1.0
    assert d["eps_curve"]["robust_accuracy_large_eps"] == 0.0
    path = report.save(tmp_path / "r.json")
    assert advx.Report.load(path).to_dict() == report.to_dict()
    assert d["examples"] and d["examples"][0]["clean"].startswith("data:image/png;base64,")
    assert report.examples[0].pixels()[0].shape == (1, 28, 28)


def test_the_cascade_only_attacks_what_is_still_robust(trained_mlp, data):
    x, y = data
    r = advx.audit(
        trained_mlp, x, y, advx.Linf(EPS), suite=small_suite(), eps_curve=None, checks=False
    )
    broken = torch.tensor(r.samples.broken_by)
    grads = torch.tensor(r.samples.grads)
    # a point FGSM broke never paid for PGD's gradient steps
    assert int(grads[broken == 0].max()) == 1
    assert int(grads[broken == 1].min()) >= 2


def test_per_sample_results_do_not_depend_on_the_batch_size(trained_mlp, data):
    x, y = data
    a = advx.audit(
        trained_mlp,
        x,
        y,
        advx.Linf(EPS),
        suite=small_suite(),
        eps_curve=None,
        checks=False,
        batch_size=500,
    )
    b = advx.audit(
        trained_mlp,
        x,
        y,
        advx.Linf(EPS),
        suite=small_suite(),
        eps_curve=None,
        checks=False,
        batch_size=7,
    )
    for key in ("broken_by", "robust", "queries", "grads"):
        assert getattr(a.samples, key) == getattr(b.samples, key)


class _Interrupting:
    """Raises KeyboardInterrupt on the k-th attack call, as a Ctrl-C would."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.k:
            raise KeyboardInterrupt


@pytest.mark.parametrize("kill_at", [1, 3, 6])
def test_a_killed_audit_resumes_to_the_same_result(
    trained_mlp, data, tmp_path, monkeypatch, kill_at
):
    x, y = data
    kw = dict(suite=small_suite(), eps_curve=None, checks=False, batch_size=25)
    whole = advx.audit(trained_mlp, x, y, advx.Linf(EPS), **kw)
    state = tmp_path / "state.pt"
    from advx.audit import runner

    monkeypatch.setattr(runner, "SAVE_EVERY_S", 0.0)  # the state after every chunk, to resume from
    original = runner.Attack.__call__
    trap = _Interrupting(kill_at)

    def interrupted(self, *a, **k):
        trap()
        return original(self, *a, **k)

    monkeypatch.setattr(runner.Attack, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        advx.audit(trained_mlp, x, y, advx.Linf(EPS), state=state, **kw)
    monkeypatch.setattr(runner.Attack, "__call__", original)
    assert state.exists()
    saved = torch.load(state, weights_only=True)["state"]
    assert int(saved["stage_done"].sum()) > 0 or kill_at == 1  # units before the kill are kept
    resumed = advx.audit(trained_mlp, x, y, advx.Linf(EPS), state=state, **kw)
    assert resumed.samples == whole.samples
    assert resumed.robust_accuracy == whole.robust_accuracy


def test_the_state_is_written_every_few_seconds_not_after_every_chunk(
    trained_mlp, data, tmp_path, monkeypatch
):
    x, y = data
    from advx.audit import runner

    writes = []
    real = runner._save_state
    monkeypatch.setattr(runner, "_save_state", lambda *a: (writes.append(1), real(*a)))
    kw = dict(suite=small_suite(), eps_curve=None, checks=False, batch_size=5)
    advx.audit(trained_mlp, x, y, advx.Linf(EPS), state=tmp_path / "a.pt", **kw)
    assert len(writes) == 2  # after the clean pass and at the end: the run took under 5 s
    writes.clear()
    monkeypatch.setattr(runner, "SAVE_EVERY_S", 0.0)
    advx.audit(trained_mlp, x, y, advx.Linf(EPS), state=tmp_path / "b.pt", **kw)
    assert len(writes) > 4  # now after every chunk


def test_a_resume_file_from_another_configuration_is_refused(trained_mlp, data, tmp_path):
    x, y = data
    state = tmp_path / "s.pt"
    advx.audit(
        trained_mlp,
        x,
        y,
        advx.Linf(EPS),
        suite=small_suite(),
        eps_curve=None,
        checks=False,
        state=state,
    )
    with pytest.raises(InputError, match="different data"):
        advx.audit(
            trained_mlp,
            x[:-1],
            y[:-1],
            advx.Linf(EPS),
            suite=small_suite(),
            eps_curve=None,
            checks=False,
            state=state,
        )
    with pytest.raises(InputError, match="different suite"):
        advx.audit(
            trained_mlp,
            x,
            y,
            advx.Linf(EPS),
            suite=small_suite()[:1],
            eps_curve=None,
            checks=False,
            state=state,
        )
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(InputError, match="different model"):
        advx.audit(
            other,
            x,
            y,
            advx.Linf(EPS),
            suite=small_suite(),
            eps_curve=None,
            checks=False,
            state=state,
        )


def test_suites_are_checked_before_any_work(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[attacks]]\nname = "nope"\n')
    with pytest.raises(InputError, match="unknown attack 'nope'"):
        load_suite(bad, advx.Linf(0.1))
    bad.write_text('[[attacks]]\nname = "pgd"\nstepz = 3\n')
    with pytest.raises(InputError, match="parameters are"):
        load_suite(bad, advx.Linf(0.1))
    bad.write_text('[[attacks]]\nname = "pgd"\nsteps = -3\n')
    with pytest.raises(InputError, match="steps must be a positive int"):
        load_suite(bad, advx.Linf(0.1))
    bad.write_text("this is not toml [")
    with pytest.raises(InputError, match="not valid TOML"):
        load_suite(bad, advx.Linf(0.1))
    good = tmp_path / "good.toml"
    good.write_text(
        'name = "mine"\n[[attacks]]\nname = "fgsm"\n[[attacks]]\nname = "pgd"\nsteps = 5\n'
    )
    s = load_suite(good, advx.Linf(0.1))
    assert s.name == "mine" and [a.name for a in s.build(advx.Linf(0.1))] == ["fgsm", "pgd"]


class Noisy(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x + 0.2 * torch.randn_like(x))


class Quantized(nn.Module):
    """Rounds its input to 1 bit: gradients are zero almost everywhere (gradient masking)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x).detach() + 0 * x)


def test_a_randomized_model_is_flagged(trained_mlp, data):
    x, y = data
    r = advx.audit(
        Noisy(trained_mlp), x[:40], y[:40], advx.Linf(EPS), suite=small_suite(), eps_curve=None
    )
    assert "randomized-model" in [f.code for f in r.findings] and not r.reliable


def test_masked_gradients_are_flagged(trained_mlp, data):
    x, y = data
    r = advx.audit(
        Quantized(trained_mlp),
        x[:60],
        y[:60],
        advx.Linf(0.3),
        suite=[advx.PGD(advx.Linf(0.3), steps=10)],
        eps_curve=[0.1, 0.3],
    )
    codes = {f.code for f in r.findings}
    assert "masked-gradients" in codes and "large-eps-not-zero" in codes
    assert not r.reliable


def test_probabilities_are_flagged(trained_mlp, data):
    x, y = data
    net = nn.Sequential(trained_mlp, nn.Softmax(dim=1))
    with pytest.warns(UserWarning):
        r = advx.audit(net, x[:30], y[:30], advx.Linf(EPS), suite=small_suite(), eps_curve=None)
    assert "probability-outputs" in [f.code for f in r.findings]


def test_curve_checks():
    assert [f.code for f in check_curve([0.1, 0.2, 0.3], [0.8, 0.9, 0.5], n=100)] == [
        "accuracy-rises-with-eps"
    ]
    assert check_curve([0.1, 0.2, 0.3], [0.8, 0.805, 0.5], n=100) == []  # within one sample's worth
    assert [f.code for f in check_curve([0.1], [0.5], n=100, large=1.0, acc_large=0.4)] == [
        "large-eps-not-zero"
    ]


def test_a_weak_cascade_is_flagged_as_not_converged(trained_mlp, data):
    x, y = data
    r = advx.audit(
        trained_mlp,
        x,
        y,
        advx.Linf(EPS),
        suite=[advx.PGD(advx.Linf(EPS), steps=1, random_start=False)],
        eps_curve=None,
    )
    assert "not-converged" in [f.code for f in r.findings]


def test_a_cascade_without_white_box_stages_is_checked_too(trained_mlp, data):
    # the convergence check on a model with gradients, after score-based stages only
    x, y = data
    r = advx.audit(
        trained_mlp,
        x[:20],
        y[:20],
        advx.Linf(0.02),
        suite=[advx.Square(advx.Linf(0.02), queries=5)],
        eps_curve=None,
    )
    assert [s.attack for s in r.cascade] == ["square"] and r.robust_accuracy > 0


def test_bad_arguments(trained_mlp, data):
    x, y = data
    with pytest.raises(InputError, match="finite eps"):
        advx.audit(trained_mlp, x, y, advx.L2(float("inf")), suite=small_suite())
    with pytest.raises(InputError, match="unknown attack"):
        advx.audit(trained_mlp, x, y, advx.Linf(EPS), suite=[{"name": "nope"}])
    with pytest.raises(InputError, match="neither a built-in suite"):
        advx.audit(trained_mlp, x, y, advx.Linf(EPS), suite="no-such-suite")


def test_a_model_with_batchnorm_is_audited_and_fingerprinted_by_its_buffers(data):
    # BatchNorm keeps 0-dim integer buffers (num_batches_tracked); the fingerprint hashes them too
    x, y = data
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)
    ).eval()
    r = advx.audit(
        net, x[:16], y[:16], advx.Linf(EPS), suite=small_suite(), eps_curve=None, checks=False
    )
    assert 0 <= r.robust_accuracy <= r.clean_accuracy
    before = advx.Classifier(net).fingerprint()
    net[1].num_batches_tracked += 1
    assert advx.Classifier(net).fingerprint() != before


def test_a_gated_stage_attacks_only_the_samples_closest_to_the_boundary(trained_mlp, data):
    import math

    from advx.audit.runner import run_cascade

    x, y = data
    clf = advx.Classifier(trained_mlp)
    stages = [advx.FGSM(advx.Linf(0.05)), advx.PGD(advx.Linf(0.05), steps=10, seed=3)]
    st = run_cascade(clf, x, y, stages, closest=[None, 0.3])
    alive = st.clean_correct & (st.broken_by != 0)  # what the gated stage could have attacked
    assert 10 < int(alive.sum()) < len(y)
    margins = st.margin[0]
    assert bool(torch.isfinite(margins[alive]).all()) and bool(torch.isinf(margins[~alive]).all())
    # they are the margins at FGSM's points (FGSM is deterministic)
    fgsm = stages[0](clf, x[alive], y[alive])
    z = clf(fgsm.x_adv)
    true = z.gather(1, y[alive].view(-1, 1)).view(-1)
    other = z.scatter(1, y[alive].view(-1, 1), float("-inf")).amax(1)
    assert torch.allclose(margins[alive], (true - other).double(), atol=1e-5)
    k = math.ceil(0.3 * int(alive.sum()))
    cut = margins[alive].sort().values[k - 1]
    attacked = st.queries[2] > 0
    assert torch.equal(attacked, alive & (margins <= cut))
    assert float(st.gate[1]) == float(cut) and bool(torch.isnan(st.gate[0]))
    # and nothing the gate left out is counted as broken by the gated stage
    assert not bool((st.broken_by == 1)[~attacked].any())


def test_a_bad_gate_is_refused_before_any_work(trained_mlp, data):
    x, y = data
    for bad in (0, 1.5, "half", True):
        with pytest.raises(InputError, match="closest"):
            advx.audit(trained_mlp, x, y, advx.Linf(EPS), suite=[{"name": "fgsm", "closest": bad}])


@pytest.mark.parametrize(
    "gained, left, severity",
    [(2, 10, "warning"), (6, 913, "warning"), (50, 779, "error"), (3, 100, "error")],
)
def test_a_black_box_stage_that_beats_the_white_box_ones_is_an_error_only_beyond_a_small_share(
    gained, left, severity
):
    from advx.audit.checks import check_blackbox_gain

    stages = [advx.PGD(advx.Linf(EPS)), advx.Square(advx.Linf(EPS), queries=10)]
    n = left + 20
    broken_by = torch.full((n,), -1)
    broken_by[:20] = 0  # broken by the white-box stage
    broken_by[20 : 20 + gained] = 1  # then by Square
    (finding,) = check_blackbox_gain(broken_by, stages, torch.ones(n, dtype=torch.bool))
    assert finding.code == "blackbox-beats-whitebox" and finding.severity == severity
    assert f"{gained} point" in finding.message
    assert not check_blackbox_gain(
        torch.where(broken_by == 1, -1, broken_by), stages, torch.ones(n, dtype=torch.bool)
    )


def test_inputs_that_are_not_images_give_no_example_pictures(trained_mlp, data, tmp_path):
    x, y = data
    flat = x[:40].flatten(1)  # rows of 784 features: no (C, H, W) to draw
    r = advx.audit(
        trained_mlp,
        flat,
        y[:40],
        advx.Linf(EPS),
        suite=[advx.FGSM(advx.Linf(EPS))],
        eps_curve=None,
        checks=False,
    )
    assert r.cascade[0].broke > 0 and r.examples == []
    assert advx.Report.load(r.save(tmp_path / "r.json")).examples == []
