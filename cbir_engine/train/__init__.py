"""Training in torch: metric-learning losses, CNNH hash learning, and the hash-network trainer."""

from cbir_engine.train.cnnh import learn_codes
from cbir_engine.train.losses import ContrastiveLoss, TripletLoss, pairwise_distances
from cbir_engine.train.trainer import METHODS, HashNet, embed, train_classifier, train_hashing

__all__ = [
    "METHODS", "ContrastiveLoss", "HashNet", "TripletLoss", "embed", "learn_codes",
    "pairwise_distances", "train_classifier", "train_hashing",
]
