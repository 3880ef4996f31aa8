"""Metric-learning losses for retrieval embeddings and relaxed hash codes.

Distances are Euclidean (not squared) throughout.
"""

from __future__ import annotations

import torch
from torch import nn

from cbir_engine.errors import ShapeError

_EPS = 1e-12  # inside the square root, so the gradient at d = 0 stays finite


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of x [n, d] -> [n, n]."""
    if x.dim() != 2:
        raise ShapeError(f"embeddings must be [n, d], got {tuple(x.shape)}")
    sq = (x * x).sum(1)
    d2 = sq[:, None] - 2.0 * (x @ x.T) + sq[None, :]
    return torch.sqrt(d2.clamp_min(0.0) + _EPS)


class ContrastiveLoss(nn.Module):
    """L = mean over pairs of  y * d^2 / 2 + (1 - y) * max(0, margin - d)^2 / 2,
    d = ||a - b||, y = 1 for a matching pair and 0 otherwise (Hadsell, Chopra & LeCun 2006,
    with the label convention flipped to y = 1 for matches).

    forward(a, b, y) takes explicit pairs; `batch(x, labels)` uses every pair i < j of a batch.
    """

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be positive, got {margin}")
        self.margin = margin

    def _loss(self, d: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y.to(d.dtype)
        return 0.5 * (y * d.pow(2) + (1 - y) * torch.relu(self.margin - d).pow(2))

    def forward(self, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.dim() != 2 or y.shape != a.shape[:1]:
            raise ShapeError(f"pairs must be [n, d] each with y [n], got {tuple(a.shape)}, "
                             f"{tuple(b.shape)}, {tuple(y.shape)}")
        d = torch.sqrt(((a - b) ** 2).sum(1) + _EPS)
        return self._loss(d, y).mean()

    def batch(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(x)
        y = labels[:, None] == labels[None, :]
        iu = torch.triu_indices(len(x), len(x), offset=1, device=x.device)
        return self._loss(d[iu[0], iu[1]], y[iu[0], iu[1]]).mean()


class TripletLoss(nn.Module):
    """L = mean of max(0, d(a, p) - d(a, n) + margin) over the mined triplets of a batch.

    mining:
      "batch_hard" (Hermans, Beyer & Leibe 2017): for each anchor with a positive and a negative
          in the batch, its farthest positive and nearest negative;
      "semi_hard" (Schroff, Kalenichenko & Philbin 2015): for each (anchor, positive) pair, the
          nearest negative farther than the positive (d(a, n) > d(a, p)); when there is none, the
          farthest negative (as TensorFlow Addons does);
      "all": every valid triplet.
    """

    MINING = ("batch_hard", "semi_hard", "all")

    def __init__(self, margin: float = 0.2, mining: str = "batch_hard") -> None:
        super().__init__()
        if mining not in self.MINING:
            raise ValueError(f"mining must be one of {self.MINING}, got {mining!r}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin, self.mining = margin, mining

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.shape != x.shape[:1]:
            raise ShapeError(f"labels {tuple(labels.shape)} do not match embeddings {tuple(x.shape)}")
        d = pairwise_distances(x)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
        pos, neg = same & ~eye, ~same
        if self.mining == "batch_hard":
            ok = pos.any(1) & neg.any(1)
            if not ok.any():
                return x.sum() * 0.0
            hardest_pos = torch.where(pos, d, torch.zeros_like(d)).amax(1)
            hardest_neg = torch.where(neg, d, torch.full_like(d, float("inf"))).amin(1)
            return torch.relu(hardest_pos - hardest_neg + self.margin)[ok].mean()
        a_idx, p_idx = torch.nonzero(pos, as_tuple=True)
        if len(a_idx) == 0:
            return x.sum() * 0.0
        d_ap = d[a_idx, p_idx]                         # [pairs]
        d_an = d[a_idx]                                # [pairs, n]
        negs = neg[a_idx]
        if self.mining == "all":
            losses = torch.relu(d_ap[:, None] - d_an + self.margin)[negs]
            return losses.mean() if losses.numel() else x.sum() * 0.0
        has_neg = negs.any(1)
        farther = negs & (d_an > d_ap[:, None])
        semi = torch.where(farther, d_an, torch.full_like(d_an, float("inf"))).amin(1)
        easiest = torch.where(negs, d_an, torch.full_like(d_an, -float("inf"))).amax(1)
        chosen = torch.where(farther.any(1), semi, easiest)
        losses = torch.relu(d_ap - chosen + self.margin)[has_neg]
        return losses.mean() if losses.numel() else x.sum() * 0.0
