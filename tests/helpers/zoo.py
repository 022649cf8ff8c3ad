"""Models with a known diagnosis. ``ZOO`` is the public zoo the rules were designed against;
``HELD_OUT`` models were never used to tune a threshold: they check that the rules generalise."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

WIDTH = 256


def mlp(act: type[nn.Module], depth: int = 20, width: int = WIDTH, init=None, head: int = 10):
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        if init is not None:
            init(lin)
        layers += [lin, act()]
    layers.append(nn.Linear(width, head))
    return nn.Sequential(*layers)


def he(lin: nn.Linear) -> None:
    nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
    nn.init.zeros_(lin.bias)


def xavier(lin: nn.Linear) -> None:
    nn.init.xavier_normal_(lin.weight)
    nn.init.zeros_(lin.bias)


def too_large(lin: nn.Linear) -> None:
    nn.init.normal_(lin.weight, std=3 / math.sqrt(lin.in_features))
    nn.init.zeros_(lin.bias)


class ResidualSigmoid(nn.Module):
    """20 blocks x + sigmoid(Linear(x)): the identity path keeps the signal."""

    def __init__(self, depth: int = 20, width: int = WIDTH) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        for block in self.blocks:
            x = x + torch.sigmoid(block(x))
        return self.head(x)


def classification_batch(n: int = 128, width: int = WIDTH, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g), torch.randint(0, classes, (n,), generator=g)


def salary_batch(n: int = 256, seed: int = 0):
    """Raw salaries around 1e5 and a label that depends on them: logistic regression's trap."""
    g = torch.Generator().manual_seed(seed)
    salary = 1e5 + 3e4 * torch.randn(n, 1, generator=g)
    return salary, (salary > 1e5).float()


class DeadReLU(nn.Module):
    """A hidden ReLU layer whose large negative bias switches every unit off."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, 10)
        with torch.no_grad():
            self.fc1.bias.fill_(-50.0)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


# -- held-out models ------------------------------------------------------------------------------


def cnn_bn_pool():
    convs = []
    for c_in, c_out in [(3, 32), (32, 32), (32, 64)]:
        convs += [
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
    convs.append(nn.MaxPool2d(2))
    for _ in range(3):
        convs += [nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU()]
    convs += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*convs)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """ResNet-style, functional ReLU, a strided stage change and global average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.layer1 = nn.Sequential(*[Block(16) for _ in range(4)])
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.layer2 = nn.Sequential(*[Block(32) for _ in range(4)])
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer2(self.down(self.layer1(F.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class TokenTransformer(nn.Module):
    def __init__(self, layers: int = 6, norm_first: bool = False, activation: str = "relu") -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 128)
        layer = nn.TransformerEncoderLayer(
            128, 4, 512, dropout=0.0, batch_first=True, norm_first=norm_first, activation=activation
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(128, 100)

    def forward(self, tokens):
        return self.head(self.encoder(self.emb(tokens)))


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, 128, 2, batch_first=True)
        self.head = nn.Linear(128, 5)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class FunctionalTanhBN(nn.Module):
    def __init__(self, depth: int = 8, width: int = 64) -> None:
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.bns = nn.ModuleList(nn.BatchNorm1d(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        for fc, bn in zip(self.fcs, self.bns):
            x = torch.tanh(bn(fc(x)))
        return self.head(x)


class FunctionalSigmoidNet(nn.Module):
    """Held-out pathology: a deep sigmoid net written with torch.sigmoid in forward."""

    def __init__(self, depth: int = 16, width: int = 128) -> None:
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, 4)

    def forward(self, x):
        for fc in self.hidden:
            x = torch.sigmoid(fc(x))
        return self.out(x)


def deep_relu_cnn_default(depth: int = 12):
    """Held-out pathology: a plain (no BN, no skip) ReLU CNN with PyTorch's default init."""
    layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)]
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """As ``torchvision.ops.SqueezeExcitation``: a ReLU over one globally pooled vector per sample."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


def se_cnn(squeeze_div: int = 4):
    """Held out: a MobileNetV3-style CNN with squeeze-and-excitation blocks and its init
    (Kaiming fan-out convolutions, zero biases)."""

    def block(ci, co, stride):
        return nn.Sequential(
            nn.Conv2d(ci, co, 3, stride, 1, bias=False),
            nn.BatchNorm2d(co),
            nn.Hardswish(),
            SqueezeExcitation(co, max(8, co // squeeze_div)),
        )

    model = nn.Sequential(
        block(3, 16, 2), block(16, 24, 2), block(24, 40, 2), block(40, 80, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(80, 10),
    )  # fmt: skip
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


# -- plain stacks across stages (VGG), and vision models of others ----------------------------------

VGG_STAGES = {  # torchvision's configurations: channels, "M" for a 2x2 max-pooling
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def vgg(depth: int = 16, init: str = "torchvision", width: float = 0.25, bn: bool = False):
    """A VGG as torchvision builds it (convolutions 3x3 + ReLU in five stages separated by
    max-pooling, then three Linear layers), ``width`` times the channels, for 32x32 inputs.
    ``init``: "torchvision" (its default: Kaiming fan-out convolutions, N(0, 0.01) Linear
    layers, zero biases), "he" (Kaiming fan-in), "normal" (every weight N(0, 0.01): the
    original recipe without its staged pre-training) or "pytorch" (the layers' own default)."""
    layers: list[nn.Module] = []
    c = 3
    for v in VGG_STAGES[depth]:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        v = max(8, int(v * width))
        layers.append(nn.Conv2d(c, v, 3, padding=1))
        layers += [nn.BatchNorm2d(v)] if bn else []
        layers.append(nn.ReLU(inplace=True))
        c = v
    hidden = max(16, int(4096 * width / 16))
    model = nn.Sequential(
        nn.Sequential(*layers),
        nn.Flatten(),
        nn.Linear(c, hidden), nn.ReLU(True), nn.Linear(hidden, hidden), nn.ReLU(True),
        nn.Linear(hidden, 10),
    )  # fmt: skip
    for m in model.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or init == "pytorch":
            continue
        if init == "normal" or (init == "torchvision" and isinstance(m, nn.Linear)):
            nn.init.normal_(m.weight, 0, 0.01)
        else:
            mode = "fan_out" if init == "torchvision" else "fan_in"
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
        nn.init.zeros_(m.bias)
    return model


def alexnet(width: float = 0.25):
    """AlexNet as torchvision builds it (PyTorch's default init), at ``width`` and for 64x64."""
    c = [max(8, int(x * width)) for x in (64, 192, 384, 256, 256)]
    return nn.Sequential(
        nn.Conv2d(3, c[0], 11, 4, 2), nn.ReLU(True), nn.MaxPool2d(3, 2),
        nn.Conv2d(c[0], c[1], 5, padding=2), nn.ReLU(True), nn.MaxPool2d(3, 2),
        nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(True),
        nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(True),
        nn.Conv2d(c[3], c[4], 3, padding=1), nn.ReLU(True), nn.MaxPool2d(3, 2),
        nn.Flatten(), nn.Linear(c[4], 64), nn.ReLU(True), nn.Linear(64, 10),
    )  # fmt: skip
