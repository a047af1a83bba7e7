"""Building models from specs and loading weights safely."""

from __future__ import annotations

import pytest
import torch

import advx
from advx.errors import InputError
from advx.zoo import build, load_weights

from ..conftest import shared_path


def test_builtins_build_and_run():
    for name, shape in (
        ("smallcnn", (2, 1, 28, 28)),
        ("lenet", (2, 1, 28, 28)),
        ("resnet20", (2, 3, 32, 32)),
    ):
        net = build(name).eval()
        assert net(torch.rand(*shape)).shape == (2, 10)


def test_weights_round_trip_with_module_prefix(tmp_path):
    net = build("lenet")
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "w.pt"
    )
    other = load_weights(build("lenet"), tmp_path / "w.pt")
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values())
    )


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_keys(tmp_path):
    torch.save(build("smallcnn").state_dict(), tmp_path / "small.pt")
    with pytest.raises(InputError, match=r"does not fit LeNet: missing \['conv1.bias'"):
        load_weights(build("lenet"), tmp_path / "small.pt")


def test_factory_from_a_file(tmp_path):
    (tmp_path / "mymodel.py").write_text(
        "import torch, advx\n"
        "def make():\n"
        "    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))\n"
        "    return advx.Classifier(net, bounds=(0, 255))\n"
    )
    clf = build(f"{tmp_path / 'mymodel.py'}:make")
    assert isinstance(clf, advx.Classifier) and clf.bounds == (0.0, 255.0)
    with pytest.raises(InputError, match="no attribute"):
        build(f"{tmp_path / 'mymodel.py'}:nope")
    with pytest.raises(InputError, match="cannot import"):
        build("no_such_package_xyz.models:make")
    with pytest.raises(InputError, match="pkg.module:factory"):
        build("not-a-spec")


def test_not_a_state_dict_is_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(InputError, match="cannot read"):
        load_weights(build("lenet"), tmp_path / "junk.pt")


@pytest.mark.slow
def test_published_models_load_and_reach_their_clean_accuracy():
    from advx.data import load

    net = build("smallcnn", weights=shared_path("models", "trades_mnist_smallcnn.pt"))
    x, y = load(shared_path("data", "mnist"), split="test", n=2000)
    assert advx.Classifier(net).accuracy(x, y) > 0.99
    res = build("resnet20", weights=shared_path("models", "akamaster_cifar10_resnet20.th"))
    xc, yc = load(shared_path("data", "cifar10", "cifar10_test.npz"))
    clf = advx.Classifier(res, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert abs(clf.accuracy(xc, yc) - 0.9173) < 1e-4  # the published 8.27% error, exactly
