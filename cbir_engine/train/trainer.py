"""Training hash networks and descriptor trunks on small images (Python API).

    from cbir_engine.train import train_hashing
    net = train_hashing("triplet", images, labels, bits=48, epochs=4)
    codes = net.codes(images)                        # torch, {-1, 1}
    engine = cbir_engine.from_torch(net.export_module(), example)   # sign head, runs in the engine

Methods:
  "cnnh":        stage 1 learns codes H from the label similarity; stage 2 regresses the network's
                 tanh outputs onto H (squared error).
  "cnnh+":       as "cnnh", plus a classification layer beside the hash layer trained with
                 cross-entropy on the labels (the CNNH+ variant).
  "triplet":     TripletLoss on the tanh outputs, semi-hard mining (batch-hard collapsed to one code
                 from a classification-trained trunk in our runs), classes balanced per batch.
  "contrastive": ContrastiveLoss over every pair of each batch, classes balanced per batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbir_engine.data.datasets import to_float
from cbir_engine.errors import ShapeError
from cbir_engine.models.small import SmallCNN
from cbir_engine.retrieval.heads import GeM, HashLayer
from cbir_engine.train.cnnh import learn_codes
from cbir_engine.train.losses import ContrastiveLoss, TripletLoss

METHODS = ("cnnh", "cnnh+", "triplet", "contrastive")


class HashNet(nn.Module):
    """trunk -> GeM -> hash layer (tanh in training, sign in eval); an optional classifier on the
    pooled feature (CNNH+ and the descriptor baseline)."""

    def __init__(self, bits: int, n_classes: int = 0, trunk: nn.Module | None = None) -> None:
        super().__init__()
        self.trunk = trunk if trunk is not None else SmallCNN()
        c = int(getattr(self.trunk, "out_channels", 128))
        self.pool = GeM(p=3.0)
        self.hash = HashLayer(c, bits) if bits else None
        self.classifier = nn.Linear(c, n_classes) if n_classes else None
        self.bits = bits

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.trunk(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hash is None:
            raise ShapeError("this network has no hash layer (bits=0)")
        return self.hash(self.features(x))

    def export_module(self, binarize: bool = True) -> nn.Module:
        """image -> codes (sign, or the pre-sign values when binarize=False), in eval mode."""
        if self.hash is None:
            raise ShapeError("this network has no hash layer (bits=0)")
        head = HashLayer(self.hash.fc.in_features, self.bits, binarize=binarize)
        head.fc.load_state_dict(self.hash.fc.state_dict())
        return _Seq(self.trunk, self.pool, head).eval()


class _Seq(nn.Module):
    def __init__(self, trunk: nn.Module, pool: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk, self.pool, self.head = trunk, pool, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.trunk(x)), 1))


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _balanced_batches(labels: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """An epoch of batches with (about) the same number of items from each class, so that every
    anchor has positives and negatives in its batch."""
    classes = np.unique(labels)
    per = max(2, batch_size // len(classes))
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    n_batches = min(len(p) for p in pools) // per
    batches = []
    for b in range(n_batches):
        idx = np.concatenate([p[b * per:(b + 1) * per] for p in pools])
        batches.append(rng.permutation(idx))
    return [batches[i] for i in rng.permutation(len(batches))]


def _shuffled_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def _fit(net: nn.Module, x: torch.Tensor, batches_fn: Callable[[], list[np.ndarray]],
         step_loss: Callable[[np.ndarray], torch.Tensor], epochs: int, lr: float, progress: bool,
         desc: str) -> TrainLog:
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    epoch_batches = [batches_fn() for _ in range(epochs)]
    total = sum(len(b) for b in epoch_batches)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1), pct_start=0.15)
    log = TrainLog()
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, leave=False)
    net.train()
    for batches in epoch_batches:
        for idx in batches:
            loss = step_loss(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            log.losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(log.losses[-20:]):.4f}")
    if bar is not None:
        bar.close()
    net.eval()
    log.seconds = time.perf_counter() - t0
    return log


def default_margin(method: str, bits: int) -> float:
    """Margins on tanh outputs: codes live in [-1, 1]^bits, where two codes that differ in a
    quarter of their bits are sqrt(bits) apart."""
    return 0.5 * math.sqrt(bits) if method == "triplet" else math.sqrt(bits)


def train_hashing(method: str, images: np.ndarray, labels: np.ndarray, bits: int, *, epochs: int = 4,
                  batch_size: int = 100, lr: float = 3e-3, margin: float | None = None, seed: int = 0,
                  trunk: nn.Module | None = None, progress: bool = True,
                  quantization: float = 0.01, mining: str = "semi_hard") -> tuple[HashNet, TrainLog]:
    """Trains a HashNet on uint8 images [n, 28, 28] with integer labels; returns it in eval mode
    with its training log. `quantization` weights a term pulling tanh outputs to +-1 (triplet
    and contrastive; CNNH's targets are already +-1)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    labels = np.asarray(labels)
    if images.shape[0] != labels.shape[0]:
        raise ShapeError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_classes = int(labels.max()) + 1
    net = HashNet(bits, n_classes if method == "cnnh+" else 0, trunk)
    x = torch.from_numpy(to_float(images))
    y = torch.from_numpy(labels.astype(np.int64))

    if method in ("cnnh", "cnnh+"):
        targets = torch.from_numpy(learn_codes(bits, labels=labels, seed=seed, progress=progress)
                                   .astype(np.float32))

        def step(idx: np.ndarray) -> torch.Tensor:
            f = net.features(x[idx])
            out = net.hash(f)  # type: ignore[misc]
            loss = F.mse_loss(out, targets[idx])
            if net.classifier is not None:
                loss = loss + F.cross_entropy(net.classifier(f), y[idx])
            return loss

        def batches() -> list[np.ndarray]:
            return _shuffled_batches(len(labels), batch_size, rng)
    else:
        m = default_margin(method, bits) if margin is None else margin
        crit: nn.Module = TripletLoss(m, mining) if method == "triplet" else ContrastiveLoss(m)

        def step(idx: np.ndarray) -> torch.Tensor:
            out = net(x[idx])
            yi = y[idx]
            loss = crit(out, yi) if method == "triplet" else crit.batch(out, yi)  # type: ignore[operator]
            # Scale-free: losses in units of bits; the quantisation term pulls |tanh| to 1.
            return loss / bits + quantization * (1 - out.abs()).pow(2).mean()

        def batches() -> list[np.ndarray]:
            return _balanced_batches(labels, batch_size, rng)

    log = _fit(net, x, batches, step, epochs, lr, progress, f"{method} {bits} bits")
    return net, log


def train_classifier(images: np.ndarray, labels: np.ndarray, *, epochs: int = 3, batch_size: int = 100,
                     lr: float = 3e-3, seed: int = 0, progress: bool = True,
                     trunk: nn.Module | None = None) -> tuple[HashNet, TrainLog]:
    """A trunk trained by classification (GeM -> linear, cross-entropy): the float-descriptor
    baseline and the feature extractor for LSH and ITQ."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    net = HashNet(0, int(labels.max()) + 1, trunk)
    x = torch.from_numpy(to_float(images))
    y = torch.from_numpy(labels.astype(np.int64))

    def step(idx: np.ndarray) -> torch.Tensor:
        return F.cross_entropy(net.classifier(net.features(x[idx])), y[idx])  # type: ignore[misc]

    log = _fit(net, x, lambda: _shuffled_batches(len(labels), batch_size, rng), step, epochs, lr,
               progress, "classifier")
    return net, log


@torch.no_grad()
def embed(module: nn.Module, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Runs `module` (eval mode) over uint8 images in batches with torch."""
    module.eval()
    out = [module(torch.from_numpy(to_float(images[i:i + batch_size]))).numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)
