"""`cbir train` end to end on MNIST-5k with tiny settings: the exported model runs in the engine
and gives the same codes as the trained torch network."""

from __future__ import annotations

import numpy as np
import torch

import cbir_engine
from cbir_engine.data import mnist5k, to_float
from cbir_engine.train import HashNet, train_hashing
from cbir_engine.train.cli import main


def test_cli_trains_exports_and_evaluates(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    rc = main(["--dataset", "mnist5k", "--method", "cnnh", "--bits", "16", "--n-train", "500",
               "--pretrain-epochs", "0", "--epochs", "1", "--out", str(out), "--evaluate", "--no-progress",
               "--threads", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mAP@all" in text
    m_ap = float(text.split("mAP@all")[1].split()[0])
    assert 0.1 <= m_ap <= 1.0
    x = to_float(mnist5k()[0][:8])
    codes = cbir_engine.load(str(out))(x)
    assert codes.shape == (8, 16) and set(np.unique(codes)) <= {-1.0, 1.0}


def test_trained_codes_beat_chance_and_match_torch():
    x, y = mnist5k()  # sorted by class: draw a mixed sample
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    net, log = train_hashing("cnnh+", x[:1000], y[:1000], 16, epochs=2, progress=False)
    assert isinstance(net, HashNet) and log.losses[-1] < log.losses[0]
    module = net.export_module(binarize=True)
    engine = cbir_engine.from_torch(module, torch.zeros(1, 1, 28, 28), threads=1)
    xt = to_float(x[1000:1200])
    with torch.no_grad():
        pre = net.export_module(binarize=False)(torch.from_numpy(xt)).numpy()
    codes = engine(xt)
    assert not ((codes != np.sign(pre)) & (np.abs(pre) >= 1e-5)).any()
    # same-class pairs agree on more bits than different-class pairs
    same = y[1000:1200, None] == y[None, 1000:1200]
    agree = (codes @ codes.T) / 16
    assert agree[same].mean() > agree[~same].mean() + 0.2
