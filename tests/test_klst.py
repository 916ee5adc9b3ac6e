"""KL-ST training (dmr.klst): class weights, balanced accuracy, windows, and that it learns."""
from __future__ import annotations

import polars as pl
import pytest
import torch

from dmr import klst
from dmr.router import RouterNet


def test_class_weights_are_inverse_frequency():
    w = klst.class_weights([0, 0, 0, 1])
    assert w.tolist() == pytest.approx([4 / 6, 2.0])
    counts = torch.tensor([3.0, 1.0])
    assert (w * counts).tolist() == pytest.approx([2.0, 2.0])  # each class weighs the same in total
    assert klst.class_weights([1, 1, 0, 0]).tolist() == pytest.approx([1.0, 1.0])
    assert klst.class_weights([1, 1]).tolist() == pytest.approx([0.0, 0.5])  # absent class: weight 0


def test_balanced_accuracy():
    assert klst.balanced_accuracy([1, 1, 1, 1], [0, 1, 1, 1]) == pytest.approx(0.5)  # majority guess
    assert klst.balanced_accuracy([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx((1 + 2 / 3) / 2)


def test_windows_stay_inside_their_episode():
    df = pl.DataFrame({"task": ["a"] * 4 + ["b"] * 3, "step": [0, 1, 2, 3, 0, 1, 2],
                       "step_type": ["action", "action", "think", "action", "action", "action", "action"]})
    wins, rows = klst.windows(df, 2, ["action"])
    assert rows == [0, 1, 3, 4, 5, 6]  # the 'think' step is no example, but stays in later windows
    assert wins == [[0], [0, 1], [2, 3], [4], [4, 5], [5, 6]]


def test_weighted_training_learns_a_rare_class(windowed_pool):
    """A rare positive class marked by one step's embedding: plain accuracy would ignore it."""
    n_eps, L, D = 80, 6, 16
    emb, wins, y = windowed_pool(n_eps, L, D, lambda e, t: (0, 0) if (e % 7 == 0 and t == L - 1) else (1, None))
    idx = list(range(len(wins)))
    net = RouterNet(in_dim=D, d_model=32, layers=1, heads=2, ff=32, window=L, dropout=0.0)
    fit = klst.train(net, emb, wins, y, idx, idx, epochs=30, bs=64, lr=3e-3, seed=0, progress=False)
    assert fit["class_weights"][0] > 5 * fit["class_weights"][1]
    pred = klst.predict(net, emb, wins).argmax(-1)
    assert klst.balanced_accuracy(pred, y) > 0.9
