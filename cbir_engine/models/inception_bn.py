"""BN-Inception (Inception v2; Ioffe & Szegedy 2015, the network of their Figure 5 / Table 1)
and SE-BN-Inception (a squeeze-and-excitation block after every Inception module, Hu et al.
2018), defined here: neither ships in torchvision or timm.

Every convolution is followed by BatchNorm and ReLU. Modules have four branches: 1x1; 1x1 -> 3x3;
1x1 -> 3x3 -> 3x3 (the 5x5 of Inception v1 factorised); pooling -> 1x1 projection. The
stride-2 modules (3c, 4e) drop the 1x1 branch and pass the max-pooled input through.
"""

from __future__ import annotations

import torch
from torch import nn


def _cbr(cin: int, cout: int, k: int, stride: int = 1, pad: int | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2 if pad is None else pad, bias=False),
                         nn.BatchNorm2d(cout, eps=1e-5), nn.ReLU(inplace=True))


class SqueezeExcite(nn.Module):
    """x * sigmoid(W2 relu(W1 mean_hw(x))), with a channel reduction of `reduction`."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        mid = max(8, channels // reduction)
        self.fc1 = nn.Conv2d(channels, mid, 1)
        self.fc2 = nn.Conv2d(mid, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.mean(x, dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class InceptionBN(nn.Module):
    """One module: (c1, c3r, c3, d3r, d3, pool kind, proj) as in the paper's table; c1 = 0 and
    proj = 0 with stride 2 give the grid-reduction modules."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, d3r: int, d3: int, pool: str, proj: int,
                 stride: int = 1, se: bool = False) -> None:
        super().__init__()
        self.b1 = _cbr(cin, c1, 1) if c1 else None
        self.b3 = nn.Sequential(_cbr(cin, c3r, 1), _cbr(c3r, c3, 3, stride))
        self.bd = nn.Sequential(_cbr(cin, d3r, 1), _cbr(d3r, d3, 3), _cbr(d3, d3, 3, stride))
        pool_layer = (nn.MaxPool2d(3, stride, 1) if pool == "max" else
                      nn.AvgPool2d(3, stride, 1, count_include_pad=True))
        self.bp = nn.Sequential(pool_layer, _cbr(cin, proj, 1)) if proj else pool_layer
        self.out_channels = c1 + c3 + d3 + (proj or cin)
        self.se = SqueezeExcite(self.out_channels) if se else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = ([self.b1(x)] if self.b1 is not None else []) + [self.b3(x), self.bd(x), self.bp(x)]
        y = torch.cat(parts, 1)
        return self.se(y) if self.se is not None else y


# (name, c1, c3r, c3, d3r, d3, pool, proj, stride)
_MODULES = [
    ("3a", 64, 64, 64, 64, 96, "avg", 32, 1),
    ("3b", 64, 64, 96, 64, 96, "avg", 64, 1),
    ("3c", 0, 128, 160, 64, 96, "max", 0, 2),
    ("4a", 224, 64, 96, 96, 128, "avg", 128, 1),
    ("4b", 192, 96, 128, 96, 128, "avg", 128, 1),
    ("4c", 160, 128, 160, 128, 160, "avg", 128, 1),
    ("4d", 96, 128, 192, 160, 192, "avg", 128, 1),
    ("4e", 0, 128, 192, 192, 256, "max", 0, 2),
    ("5a", 352, 192, 320, 160, 224, "avg", 128, 1),
    ("5b", 352, 192, 320, 192, 224, "max", 128, 1),
]


class BNInception(nn.Module):
    """BN-Inception for 224x224 inputs: features [N, 1024, 7, 7], then global average pooling,
    dropout and the classifier. `se=True` gives SE-BN-Inception."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, se: bool = False) -> None:
        super().__init__()
        stem = [_cbr(in_chans, 64, 7, 2, 3), nn.MaxPool2d(3, 2, 1), _cbr(64, 64, 1), _cbr(64, 192, 3),
                nn.MaxPool2d(3, 2, 1)]
        cin = 192
        blocks: list[nn.Module] = []
        for _, c1, c3r, c3, d3r, d3, pool, proj, stride in _MODULES:
            m = InceptionBN(cin, c1, c3r, c3, d3r, d3, pool, proj, stride, se)
            blocks.append(m)
            cin = m.out_channels
        self.features = nn.Sequential(*stem, *blocks)
        self.out_channels = cin
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.mean(self.features(x), dim=(2, 3))
        return self.fc(self.dropout(f))
