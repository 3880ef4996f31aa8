"""Small-image networks (28x28 grey inputs) that train in minutes on a CPU: a plain CNN and a
small ResNet, each as a conv trunk whose feature map feeds a retrieval head."""

from __future__ import annotations

import torch
from torch import nn


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """conv32 -> pool -> conv64 -> pool -> conv128 (conv-BN-ReLU each):
    [N, 1, 28, 28] -> [N, 128, 7, 7], about 7.5M multiply-adds per image."""

    def __init__(self, in_chans: int = 1, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        a, b, c = widths
        self.out_channels = c
        self.features = nn.Sequential(
            _cbr(in_chans, a), nn.MaxPool2d(2),
            _cbr(a, b), nn.MaxPool2d(2),
            _cbr(b, c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_cbr(cin, cout, 3, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class SmallResNet(nn.Module):
    """A ResNet of basic blocks for 28x28 inputs (the CIFAR-style ResNet-6n+2 with n=`blocks`):
    [N, 1, 28, 28] -> [N, 4 * width, 7, 7]."""

    def __init__(self, in_chans: int = 1, width: int = 16, blocks: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [_cbr(in_chans, width)]
        cin = width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks):
                layers.append(_Basic(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.out_channels = cin
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)
