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
    in_chans: int = 3


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


# Networks defined in this package (cbir_engine/models): BN-Inception and SE-BN-Inception (not in
# torchvision or timm), DenseNet-BC in its small-image configurations, and the small 28x28 nets.
ZOO_ADDITIONS: dict[str, SeedNetwork] = {
    n.name: n
    for n in [
        SeedNetwork("bn_inception", "cbir", "bn_inception", 224),
        SeedNetwork("se_bn_inception", "cbir", "bn_inception", 224, (("se", True),)),
        SeedNetwork("densenet_bc_40_12", "cbir", "densenet_bc", 32, (("depth", 40), ("growth", 12))),
        SeedNetwork("densenet_bc_100_24", "cbir", "densenet_bc", 32, (("depth", 100), ("growth", 24))),
        SeedNetwork("densenet_bc_40_12_28px", "cbir", "densenet_bc", 28,
                    (("depth", 40), ("growth", 12), ("in_chans", 1)), in_chans=1),
        SeedNetwork("small_cnn", "cbir", "small_cnn", 28, (), in_chans=1),
        SeedNetwork("small_resnet", "cbir", "small_resnet", 28, (), in_chans=1),
    ]
}


def _build_own(spec: SeedNetwork) -> Any:
    kwargs = dict(spec.kwargs)
    if spec.arch == "bn_inception":
        from cbir_engine.models.inception_bn import BNInception

        return BNInception(**kwargs)
    if spec.arch == "densenet_bc":
        from cbir_engine.models.densenet_bc import DenseNetBC

        return DenseNetBC(**kwargs)
    from cbir_engine.models.small import SmallCNN, SmallResNet

    return {"small_cnn": SmallCNN, "small_resnet": SmallResNet}[spec.arch](**kwargs)


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
    """(module in eval mode with seeded random weights, input size) of a seed network or of a
    zoo addition (`ZOO_ADDITIONS`; its input channels are `ZOO_ADDITIONS[name].in_chans`)."""
    import torch

    spec = SEED_NETWORKS.get(name) or ZOO_ADDITIONS.get(name)
    if spec is None:
        raise KeyError(f"unknown seed network {name!r}; known: {', '.join([*SEED_NETWORKS, *ZOO_ADDITIONS])}")
    torch.manual_seed(seed)
    ctor: Callable[..., Any]
    if spec.source == "torchvision":
        import torchvision

        ctor = getattr(torchvision.models, spec.arch)
        module = ctor(weights=None, **dict(spec.kwargs))
    elif spec.source == "cbir":
        module = _build_own(spec)
    else:
        import timm

        module = timm.create_model(spec.arch, pretrained=False, **dict(spec.kwargs))
    randomize_batchnorm(module, seed)
    return module.eval(), spec.input_size
