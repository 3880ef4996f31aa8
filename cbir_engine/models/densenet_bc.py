"""DenseNet-BC for small images (Huang et al. 2017, the CIFAR configuration): three dense blocks
of (depth - 4) / 6 bottleneck layers each (BN-ReLU-1x1 conv to 4k channels, BN-ReLU-3x3 conv to k),
transitions BN-ReLU-1x1 conv (compression 0.5)-2x2 average pooling, a first 3x3 conv to 2k
channels, and BN-ReLU-global average pooling before the classifier.

    densenet_bc(40, 12)   # DenseNet-BC, k = 12, depth 40 (0.18 M parameters)
    densenet_bc(100, 24)  # DenseNet-BC, k = 24, depth 100 (3.0 M parameters)
"""

from __future__ import annotations

import torch
from torch import nn


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, k: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, 4 * k, 1, bias=False),
            nn.BatchNorm2d(4 * k), nn.ReLU(inplace=True), nn.Conv2d(4 * k, k, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class DenseNetBC(nn.Module):
    def __init__(self, depth: int = 40, growth: int = 12, num_classes: int = 10, in_chans: int = 3,
                 compression: float = 0.5) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        c = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(in_chans, c, 3, padding=1, bias=False)]
        for block in range(3):
            for _ in range(n):
                layers.append(_Bottleneck(c, growth))
                c += growth
            if block < 2:
                out = int(c * compression)
                layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, out, 1, bias=False),
                           nn.AvgPool2d(2)]
                c = out
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.out_channels = c
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.mean(self.features(x), dim=(2, 3)))


def densenet_bc(depth: int = 40, growth: int = 12, **kwargs: int) -> DenseNetBC:
    return DenseNetBC(depth, growth, **kwargs)
