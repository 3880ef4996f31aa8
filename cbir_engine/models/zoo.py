"""Seed networks with seeded random weights.

ImageNet weights are not available offline, so the engine is tested on the real architectures
with random weights; BatchNorm statistics are randomised too, or BN folding would be checked
only against the identity transform.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SeedNetwork:
    name: str
    source: str  # "torchvision" or "timm"
    arch: str
    input_size: int
    kwargs: tuple[tuple[str, Any], ...] = ()


SEED_NETWORKS: dict[str, SeedNetwork] = {
    n.name: n
    for n in [
        SeedNetwork("alexnet", "torchvision", "alexnet", 224),
        SeedNetwork("vgg16", "torchvision", "vgg16", 224),
        SeedNetwork("vgg19_bn", "torchvision", "vgg19_bn", 224),
        SeedNetwork("googlenet", "torchvision", "googlenet", 224,
                    (("aux_logits", False), ("init_weights", True))),
        SeedNetwork("inception_v3", "torchvision", "inception_v3", 299,
                    (("aux_logits", False), ("init_weights", True))),
        SeedNetwork("resnet18", "torchvision", "resnet18", 224),
        SeedNetwork("resnet50", "torchvision", "resnet50", 224),
        SeedNetwork("resnet152", "torchvision", "resnet152", 224),
        SeedNetwork("densenet121", "torchvision", "densenet121", 224),
        SeedNetwork("inception_v4", "timm", "inception_v4", 299),
        SeedNetwork("inception_resnet_v2", "timm", "inception_resnet_v2", 299),
        SeedNetwork("seresnet50", "timm", "seresnet50", 224),
    ]
}


def randomize_batchnorm(module: Any, seed: int = 0) -> Any:
    """Gives every BatchNorm random affine parameters and running statistics (kept moderate so
    deep networks stay finite)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    return module


def build(name: str, seed: int = 0) -> tuple[Any, int]:
    """(module in eval mode with seeded random weights, input size) of a seed network."""
    import torch

    spec = SEED_NETWORKS.get(name)
    if spec is None:
        raise KeyError(f"unknown seed network {name!r}; known: {', '.join(SEED_NETWORKS)}")
    torch.manual_seed(seed)
    ctor: Callable[..., Any]
    if spec.source == "torchvision":
        import torchvision

        ctor = getattr(torchvision.models, spec.arch)
        module = ctor(weights=None, **dict(spec.kwargs))
    else:
        import timm

        module = timm.create_model(spec.arch, pretrained=False, **dict(spec.kwargs))
    randomize_batchnorm(module, seed)
    return module.eval(), spec.input_size
