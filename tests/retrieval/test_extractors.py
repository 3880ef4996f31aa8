"""Seed-network trunks are the networks' own convolutional prefixes: the network's pooling and
classifier applied to the trunk output give the network's output."""

from __future__ import annotations

import pytest
import torch

from cbir_engine.models import build
from cbir_engine.models.extractors import trunk_of

EXACT = 1e-5


def _head(name: str, model: torch.nn.Module, f: torch.Tensor) -> torch.Tensor:
    if name.startswith("resnet"):
        return model.fc(torch.flatten(model.avgpool(f), 1))
    if name in ("googlenet", "inception_v3"):
        return model.fc(torch.flatten(model.dropout(model.avgpool(f)), 1))
    if name == "densenet121":
        return model.classifier(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(f, 1), 1))
    if name in ("alexnet", "vgg16"):
        return model.classifier(torch.flatten(model.avgpool(f), 1))
    return model.forward_head(f)  # timm


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "googlenet", "inception_v3", "densenet121", "alexnet",
                                  "seresnet50"])
def test_trunk_is_the_networks_prefix(name):
    model, size = build(name, seed=0)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
        via = _head(name, model, trunk_of(name, model)(x))
    assert float((full - via).abs().max() / full.abs().max()) <= EXACT
