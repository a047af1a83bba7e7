"""Small architectures, written from their published descriptions.

``SmallCNN`` matches the state-dict keys of the TRADES MNIST checkpoint (Zhang et al., 2019) and
``ResNet20`` those of the CIFAR-10 ResNets of akamaster/pytorch_resnet_cifar10, so their
published weights load into them. ``LeNet`` is a small, fast CNN for the demo and the tests.
``WongCNN`` is the MNIST network of Wong, Rice & Kolter (2020), "Fast is better than free".

Each keeps its constructor's arguments in ``config``, so that a checkpoint of one records how to
rebuild it (:func:`advx.zoo.describe`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SmallCNN", "LeNet", "ResNet20", "WongCNN", "smallcnn", "lenet", "resnet20", "wong_cnn"]


class SmallCNN(nn.Module):
    """Four 3x3 convolutions, two max-pools, three linear layers (TRADES' MNIST model)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, drop: float = 0.5) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "drop": drop}
        self.feature_extractor = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(in_channels, 32, 3)),
                    ("relu1", nn.ReLU()),
                    ("conv2", nn.Conv2d(32, 32, 3)),
                    ("relu2", nn.ReLU()),
                    ("maxpool1", nn.MaxPool2d(2, 2)),
                    ("conv3", nn.Conv2d(32, 64, 3)),
                    ("relu3", nn.ReLU()),
                    ("conv4", nn.Conv2d(64, 64, 3)),
                    ("relu4", nn.ReLU()),
                    ("maxpool2", nn.MaxPool2d(2, 2)),
                ]
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc1", nn.Linear(64 * 4 * 4, 200)),
                    ("relu1", nn.ReLU()),
                    ("drop", nn.Dropout(drop)),
                    ("fc2", nn.Linear(200, 200)),
                    ("relu2", nn.ReLU()),
                    ("fc3", nn.Linear(200, num_classes)),
                ]
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        features = self.feature_extractor(x)  # (N, 1, 28, 28) -> (N, 64, 4, 4)
        return self.classifier(features.flatten(1))  # (N, 1024) -> (N, classes)


class LeNet(nn.Module):
    """Two 5x5 convolutions with max-pooling and two linear layers; trains in seconds on a CPU."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "width": width}
        self.conv1 = nn.Conv2d(in_channels, width, 5, padding=2)
        self.conv2 = nn.Conv2d(width, 2 * width, 5, padding=2)
        self.fc1 = nn.LazyLinear(128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, C, H, W) -> (N, w, H/2, W/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # -> (N, 2w, H/4, W/4)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class WongCNN(nn.Module):
    """The small MNIST CNN of Wong, Rice & Kolter (2020, "Fast is better than free: revisiting
    adversarial training", ICLR): conv 16 4x4 stride 2, conv 32 4x4 stride 2 (both padding 1),
    a linear layer of 100 units and the output layer, ReLU between them."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, size: int = 28) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "size": size}
        self.conv1 = nn.Conv2d(in_channels, 16, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 4, stride=2, padding=1)
        side = size // 4
        self.fc1 = nn.Linear(32 * side * side, 100)
        self.fc2 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))  # (N, C, 28, 28) -> (N, 16, 14, 14)
        x = F.relu(self.conv2(x))  # -> (N, 32, 7, 7)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))  # (N, 32*7*7) -> (N, classes)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if (stride != 1 or cin != cout) else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad is None:
            short = x
        else:
            # "option A": subsample and zero-pad the channels, no parameters
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class ResNet20(nn.Module):
    """The CIFAR ResNet of He et al. (2016) with n=3: 16-32-64 channels, option-A shortcuts."""

    # set with setattr below (their names are the published checkpoints' keys)
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential

    def __init__(self, num_classes: int = 10, n: int = 3) -> None:
        super().__init__()
        self.config = {"num_classes": num_classes, "n": n}
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for i, (cout, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = []
            for b in range(n):
                blocks.append(_BasicBlock(cin, cout, stride if b == 0 else 1))
                cin = cout
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))  # (N, 64, 8, 8)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (N, 64, 8, 8) -> (N, 64)
        return self.linear(out)


def smallcnn(**kw) -> SmallCNN:
    return SmallCNN(**kw)


def lenet(**kw) -> LeNet:
    net = LeNet(**kw)
    net(torch.zeros(1, kw.get("in_channels", 1), 28, 28))  # materialize the lazy layer for 28x28
    return net


def resnet20(**kw) -> ResNet20:
    return ResNet20(**kw)


def wong_cnn(**kw) -> WongCNN:
    return WongCNN(**kw)
