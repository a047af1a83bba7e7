"""The recipes as a loss in one's own loop (recipe_loss), and the two spellings of their names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import advx
from advx.errors import InputError
from advx.training import (
    RECIPES,
    fgsm_rs,
    fit,
    pgd_at,
    recipe_loss,
    recipe_name,
    trades,
)


def net_(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))


@pytest.fixture(scope="module")
def data(mnist_train):
    return mnist_train[0][:128], mnist_train[1][:128]


def test_both_spellings_name_one_recipe():
    for a, b in (("fgsm_rs", "fgsm-rs"), ("PGD_AT", "pgd-at"), ("trades", "TRADES")):
        assert recipe_name(a) == recipe_name(b) == b.lower()
        assert RECIPES[a] is RECIPES[b] and a in RECIPES
    assert RECIPES["fgsm_rs"] is fgsm_rs and RECIPES["pgd_at"] is pgd_at
    with pytest.raises(InputError, match="did you mean 'trades'"):
        recipe_name("trade")
    assert "nope" not in RECIPES


def test_a_hand_written_loop_with_recipe_loss_trains_the_weights_fit_does(data):
    """fit over an unshuffled DataLoader numbers the samples as recipe_loss does: the same SGD
    steps give the same weights, bit for bit."""
    x, y = data
    a = net_()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    kw = dict(optimizer="sgd", lr=0.05, monitor=None, overfit_check=False, progress=False)
    fit(a, loader, loss=fgsm_rs(0.1), **kw)

    b = net_()
    opt = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    loss_fn = recipe_loss("fgsm_rs", b, eps=0.1)
    b.train()
    for xb, yb in loader:
        opt.zero_grad()
        loss_fn(xb, yb).backward()
        opt.step()
    assert loss_fn.seen == 128
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_the_loss_is_the_recipes_and_crafting_leaves_the_weights_gradients_alone(data):
    x, y = data[0][:32], data[1][:32]
    net = net_()
    plain = recipe_loss("standard", net)(x, y)
    assert torch.allclose(plain, F.cross_entropy(net(x), y))
    loss_fn = recipe_loss(pgd_at(0.2, steps=5), net, seed=3)
    adv = loss_fn(x, y)
    assert adv > plain  # the crafted points raise the loss
    assert all(p.grad is None for p in net.parameters())  # only backward() fills them
    adv.backward()
    assert all(p.grad is not None for p in net.parameters())
    assert loss_fn.last is not None and loss_fn.last.adv_logits.shape == (32, 10)
    # the same seed and the same samples seen: the same random starts
    again = recipe_loss("pgd-at", net, eps=0.2, steps=5, seed=3)
    assert torch.equal(again(x, y), adv.detach())


def test_trades_switches_to_eval_to_craft_and_back(data):
    x, y = data[0][:16], data[1][:16]
    net = nn.Sequential(net_(), nn.Dropout(0.5))
    net.train()
    modes = []
    net[1].register_forward_pre_hook(lambda m, i: modes.append(m.training))
    recipe_loss(trades(0.1, steps=2), net)(x, y)
    assert modes[0] is False and modes[-1] is True and net.training


def test_a_classifier_brings_its_bounds_and_normalization(data):
    x, y = data[0][:16], data[1][:16]
    net = net_()
    clf = advx.Classifier(net, bounds=(0, 1), mean=0.5, std=0.25)
    got = recipe_loss("standard", clf)(x, y)
    assert torch.allclose(got, F.cross_entropy(net((x - 0.5) / 0.25), y))


def test_bad_uses_are_refused(data):
    x, y = data
    with pytest.raises(InputError, match="eps must be in"):
        recipe_loss("fgsm_rs", net_(), eps=2.0)
    with pytest.raises(InputError, match="go with a recipe's name"):
        recipe_loss(fgsm_rs(0.1), net_(), eps=0.1)
    with pytest.raises(InputError, match="nn.Module or an advx.Classifier"):
        recipe_loss("standard", "net")
    with pytest.raises(InputError, match="loss\\(x, y\\)"):
        recipe_loss("standard", net_())((x, y), None)
    with pytest.raises(InputError, match="did you mean"):
        recipe_loss("pgd", net_(), eps=0.1)
