"""Each seed network as a feature extractor: its conv trunk, image -> last conv feature map
[N, C, h, w], the input a retrieval head (MAC, GeM, R-MAC, NetVLAD, ...) pools."""

from __future__ import annotations

import torch
from torch import nn

from cbir_engine.models.zoo import SEED_NETWORKS, ZOO_ADDITIONS, build


class _ForwardFeatures(nn.Module):
    """A timm model's `forward_features` (conv trunk without pooling and classifier)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)  # type: ignore[operator]


class _ReluAfter(nn.Sequential):
    """DenseNet's trunk: its `features` end in a BN whose ReLU lives in forward()."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def _children(m: nn.Module, names: list[str]) -> nn.Sequential:
    return nn.Sequential(*[getattr(m, n) for n in names])


def trunk_of(name: str, module: nn.Module) -> nn.Module:
    """The conv trunk of seed network `name` built as `module`."""
    if name in ("alexnet", "vgg16", "vgg19_bn"):
        return module.features  # type: ignore[return-value]
    if name.startswith("resnet"):
        return nn.Sequential(*list(module.children())[:-2])
    if name == "googlenet":
        return _children(module, ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a",
                                  "inception3b", "maxpool3", "inception4a", "inception4b", "inception4c",
                                  "inception4d", "inception4e", "maxpool4", "inception5a", "inception5b"])
    if name == "inception_v3":
        return _children(module, ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
                                  "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c",
                                  "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                                  "Mixed_7a", "Mixed_7b", "Mixed_7c"])
    if name in ZOO_ADDITIONS:
        return module if ZOO_ADDITIONS[name].arch.startswith("small") else module.features  # type: ignore[return-value]
    if name == "densenet121":
        return _ReluAfter(*module.features.children())  # type: ignore[union-attr]
    if hasattr(module, "forward_features"):
        return _ForwardFeatures(module)
    raise KeyError(f"no trunk rule for {name!r}")


def trunk(name: str, seed: int = 0) -> tuple[nn.Module, int, int]:
    """(trunk in eval mode, input size, channels of its feature map) of a seed network or of a
    zoo addition (see `cbir_engine.models.build`)."""
    module, size = build(name, seed)
    t = trunk_of(name, module).eval()
    chans = (SEED_NETWORKS.get(name) or ZOO_ADDITIONS[name]).in_chans
    with torch.no_grad():
        c = int(t(torch.zeros(1, chans, size, size)).shape[1])
    return t, size, c


def extractor(name: str, head: nn.Module | None = None, seed: int = 0) -> tuple[nn.Module, int]:
    """(trunk -> head module, input size); default head GeM(p=3)."""
    from cbir_engine.retrieval.heads import Descriptor, GeM

    t, size, _ = trunk(name, seed)
    return Descriptor(t, head if head is not None else GeM()).eval(), size


__all__ = ["trunk", "trunk_of", "extractor"]
